"""LoRA / QLoRA (dsv3.lora): adapters start as a no-op, a few steps lower the loss, the merge equals
base + adapter (checked against W + scale * B A built by hand), save/load round trips in PEFT's layout,
peft loads our adapter onto transformers' model with equal logits, and `dsv3 sft --lora-rank` trains,
resumes bit for bit, merges (`dsv3 merge-lora`) and serves (`dsv3.LLM(base, adapter=...)`)."""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import dsv3
from dsv3 import Transformer
from dsv3.lora import (LoRAError, LoRAExperts, LoRALinear, apply_lora, load_adapter, lora_modules, lora_parameters,
                       lora_state_dict, merge_adapter, merge_lora, save_adapter, saved_modules)
from dsv3.quant.int_weights import dequantize_int8, quantize_int8

ALL = "q,kv,o,shared,experts"


def tiny_model(seed: int = 0, **over) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**over))
    with torch.no_grad():  # a routing bias that matters, so routing is exercised as in a trained model
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.uniform_(0, 0.3)
    return model.eval()


def tokens(vocab: int = 96, batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def randomize_b_(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every adapter a non-zero B (a fresh one is zero, i.e. a no-op), and move the embedding and
    head when they are trained whole (as training them would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.abs().sum() == 0:
                p.copy_(std * torch.randn(p.shape, generator=g))
        for s in saved_modules(model):
            w = getattr(model, {"embed": "embed_tokens", "head": "lm_head"}[s]).weight
            w.add_(std * torch.randn(w.shape, generator=g))


@pytest.mark.parametrize("q_lora", [True, False])
def test_fresh_adapters_are_a_noop(q_lora):
    over = {} if q_lora else {"q_lora_rank": None}
    model = tiny_model(**over)
    x = tokens()
    with torch.no_grad():
        ref = model(x)
    names = apply_lora(model, 4, targets=ALL)
    assert any(n.endswith(".q_a_proj" if q_lora else ".q_proj") for n in names)
    assert not any(n.startswith("mtp.") for n in names)          # transformers' model has no MTP layers
    with torch.no_grad():
        assert torch.equal(model(x), ref)                            # B = 0: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or "_lora_" in n for n in trainable)
    # the fp32 base keeps the very Parameters (by reference) under the same state-dict names
    assert all(k in model.state_dict() for k in ("layers.1.self_attn.kv_b_proj.weight",
                                                  "layers.1.mlp.experts.gate_proj"))


@pytest.mark.parametrize("base_dtype", ["int8", "bf16"])
def test_compact_base_equals_the_rounded_weights(base_dtype):
    """A QLoRA-style base computes with its rounded weights: the same logits as a plain model whose
    adapted weights were rounded the same way by hand."""
    model = tiny_model()
    ref = tiny_model()

    def rounded(w):
        if base_dtype == "bf16":
            return w.to(torch.bfloat16).float()
        q, s = quantize_int8(w.reshape(-1, w.shape[-1]))
        return dequantize_int8(q, s).view(w.shape)
    apply_lora(model, 4, targets=ALL, base_dtype=base_dtype)
    with torch.no_grad():
        for name, m in lora_modules(model):
            if isinstance(m, LoRALinear):
                w = ref.get_submodule(name).weight
                w.copy_(rounded(w))
            else:
                for p in ("gate_proj", "up_proj", "down_proj"):
                    w = getattr(ref.get_submodule(name), p)
                    w.copy_(rounded(w))
        x = tokens()
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)
    lin = model.layers[1].self_attn.o_proj
    assert lin.weight.dtype == (torch.int8 if base_dtype == "int8" else torch.bfloat16)


@pytest.mark.parametrize("base_dtype", ["fp32", "int8"])
def test_a_few_steps_lower_the_loss_and_touch_only_adapters(base_dtype):
    model = tiny_model().train()
    apply_lora(model, 8, targets=ALL, base_dtype=base_dtype)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = tokens(batch=4, seq=32)
    losses = []
    for _ in range(8):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())     # the base is untouched
    experts = model.layers[1].mlp.experts
    assert isinstance(experts, LoRAExperts) and experts.gate_proj_lora_B.abs().sum() > 0


def test_merge_equals_base_plus_adapter():
    model = tiny_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, 4, alpha=6.0, targets=ALL)
    randomize_b_(model)
    lora = {n: {k: p.detach().clone() for k, p in m.named_parameters(recurse=False) if "lora_" in k}
            for n, m in lora_modules(model)}
    x = tokens()
    with torch.no_grad():
        with_adapter = model(x)
    merge_lora(model)
    assert not lora_modules(model) and isinstance(model.layers[1].self_attn.o_proj, torch.nn.Linear)
    merged = model.state_dict()
    assert set(merged) == set(base)
    scale = 6.0 / 4
    # by hand: W + scale * B @ A per Linear, per expert for the stacked experts
    w = base["layers.1.self_attn.o_proj.weight"]
    ab = lora["layers.1.self_attn.o_proj"]
    torch.testing.assert_close(merged["layers.1.self_attn.o_proj.weight"], w + scale * ab["lora_B"] @ ab["lora_A"])
    ex = lora["layers.1.mlp.experts"]
    for e in (0, 5):
        want = base["layers.1.mlp.experts.down_proj"][e] + scale * ex["down_proj_lora_B"][e] @ ex["down_proj_lora_A"][e]
        torch.testing.assert_close(merged["layers.1.mlp.experts.down_proj"][e], want)
    with torch.no_grad():
        torch.testing.assert_close(model(x), with_adapter, rtol=0, atol=1e-5)
        # the absorbed (decode) path reads kv_b_proj.weight directly: after the merge it sees the adapter too
        torch.testing.assert_close(model(x, absorb=True), with_adapter, rtol=0, atol=1e-4)


def test_save_load_round_trip_in_peft_names(tmp_path):
    model = tiny_model()
    apply_lora(model, 4, targets=ALL)
    randomize_b_(model)
    save_adapter(model, tmp_path / "ad", base_model="some/base")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["base_model_name_or_path"] == "some/base"
    keys = set(lora_state_dict(model))
    # PEFT's names over the HF checkpoint's module tree: one pair per expert Linear
    assert "base_model.model.model.layers.1.mlp.experts.7.gate_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.kv_b_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp.shared_experts.down_proj.lora_A.weight" in keys
    assert not any("layers.2." in k for k in keys)                    # MTP (checkpoint layer 2) untouched
    fresh = tiny_model()
    load_adapter(fresh, tmp_path / "ad")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # an adapter of other targets, or for another shape, is refused with the reason
    other = tiny_model()
    apply_lora(other, 4, targets="q")
    with pytest.raises(LoRAError, match="does not fit"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(LoRAError, match="shape"):
        load_adapter(tiny_model(hidden_size=48), tmp_path / "ad")


def test_modules_to_save_train_the_embedding_and_head_whole(tmp_path):
    """modules_to_save: the embedding and head learn (in place), save in PEFT's names and config,
    load back into a fresh model, and stay in the merged model; other weights stay frozen."""
    model = tiny_model().train()
    base = tiny_model()
    apply_lora(model, 4, targets="q,kv,o", modules_to_save="head,embed")
    assert saved_modules(model) == ("embed", "head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"embed_tokens.weight", "lm_head.weight"} <= trainable
    assert all(".lora_" in n for n in trainable - {"embed_tokens.weight", "lm_head.weight"})
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    x = tokens(batch=4, seq=32)
    for _ in range(3):
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    for name in ("embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(model.state_dict()[name], base.state_dict()[name])
    assert torch.equal(model.layers[1].mlp.experts.gate_proj, base.layers[1].mlp.experts.gate_proj)
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    # PEFT's saved form (ModulesToSaveWrapper drops its "modules_to_save.default." infix)
    assert torch.equal(saved["base_model.model.model.embed_tokens.weight"], model.embed_tokens.weight)
    assert torch.equal(saved["base_model.model.lm_head.weight"], model.lm_head.weight)
    model.eval()
    with torch.no_grad():
        want = model(x)
        fresh = load_adapter(tiny_model(), tmp_path / "ad")
        assert saved_modules(fresh) == ("embed", "head")
        assert torch.equal(fresh(x), want)
        merged = merge_adapter(tiny_model(), tmp_path / "ad")
        assert not lora_modules(merged) and not saved_modules(merged)
        torch.testing.assert_close(merged(x), want, rtol=0, atol=1e-5)
    # an adapter with the modules does not fit a model whose LoRA run lacks them, and vice versa
    other = tiny_model()
    apply_lora(other, 4, targets="q,kv,o")
    with pytest.raises(LoRAError, match="does not fit.*missing|does not fit.*unexpected"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(LoRAError, match="modules to save"):
        apply_lora(tiny_model(), 4, modules_to_save="embed,norm")
    with pytest.raises(LoRAError, match="tied"):
        apply_lora(tiny_model(tie_word_embeddings=True), 4, modules_to_save="head")


def test_bad_settings_are_refused():
    with pytest.raises(LoRAError, match="unknown LoRA target"):
        apply_lora(tiny_model(), 4, targets="q,ffn")
    with pytest.raises(LoRAError, match="rank"):
        apply_lora(tiny_model(), 0)
    with pytest.raises(LoRAError, match="base dtype"):
        apply_lora(tiny_model(), 4, base_dtype="int4")
    model = tiny_model()
    apply_lora(model, 2)
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model, 2)


def peft_and_hf_base(base: Path):
    """peft (the test is skipped without it or transformers), transformers' DeepSeek-V3 of test_parity_hf
    at random weights saved in ``base`` (the adapters' base), and an input batch for it."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_parity_hf import build_hf, hf_config_dict, input_ids
    d = hf_config_dict()
    hf = build_hf(d, 0)
    hf.save_pretrained(base)
    return peft, hf, input_ids(d["vocab_size"])


@pytest.mark.parametrize("targets,save", [("q,kv,o", ""), ("shared", ""), (ALL, ""), ("q,kv,o", "embed,head")])
def test_peft_loads_the_adapter_onto_transformers_with_equal_logits(tmp_path, targets, save):
    """Our adapter on our model == peft's PeftModel.from_pretrained(transformers model, adapter);
    with modules_to_save, peft's copies of the embedding and head get our trained weights."""
    peft, hf, x = peft_and_hf_base(tmp_path / "base")
    ours = dsv3.load_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    apply_lora(ours, 4, alpha=8.0, targets=targets, modules_to_save=save)
    randomize_b_(ours)
    save_adapter(ours, tmp_path / "ad", base_model=str(tmp_path / "base"))
    with torch.no_grad():
        base_logits = hf(x).logits
        ours_logits = ours(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # peft's own notes on its v5 expert conversion
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad")).eval()
    with torch.no_grad():
        peft_logits = pm(x).logits
    assert (ours_logits - base_logits).abs().max() > 0.1                # the adapter matters
    torch.testing.assert_close(peft_logits, ours_logits, rtol=0, atol=1e-4)
    if save:  # peft put its wrappers on exactly these two modules, holding our weights
        wrapped = {n.split(".modules_to_save.")[0] for n, _ in pm.named_parameters() if ".modules_to_save." in n}
        assert wrapped == {"base_model.model.model.embed_tokens", "base_model.model.lm_head"}
        torch.testing.assert_close(pm.base_model.model.lm_head.modules_to_save["default"].weight,
                                   ours.lm_head.weight, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- sft, merge, engine
@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    from post_fixtures import tiny_chat_model

    from dsv3.tasks import Arithmetic, problems
    root = tmp_path_factory.mktemp("lora-sft")
    path, tok = tiny_chat_model(root / "base")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(p.sft_record()) + "\n" for p in problems(Arithmetic(max_value=9), 40, 0)))
    return path, tok, data


def test_sft_lora_learns_resumes_exactly_merges_and_serves(chat_setup, tmp_path, capsys):
    from dsv3.checkpoint import load_pretrained
    from dsv3.cli import main
    from dsv3.engine import LLM, SamplingParams
    from dsv3.post.sft import SFTConfig, sft
    path, tok, data = chat_setup
    common = dict(model=str(path), data=[str(data)], batch_size=4, seq_len=64, lr=3e-2, warmup_steps=0,
                  save_every=2, eval_every=0, val_fraction=0.0, progress=False, lora_rank=4,
                  lora_targets="q,kv,o,shared,experts", lora_modules_to_save="")
    a = sft(SFTConfig(out=str(tmp_path / "a"), max_steps=4, **common), log=lambda *m: None)
    final = tmp_path / "a" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)
    assert a["trainable_params"] < 0.5 * sum(p.numel() for p in load_pretrained(path).parameters())
    # interrupted after checkpoint-2: resuming gives the same losses and the same adapter
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    # ...written before --lora-modules-to-save existed (embedding and head frozen): resumes as that run
    states = list((tmp_path / "b").rglob("trainer_state.json"))
    assert states
    for f in states:
        st = json.loads(f.read_text())
        del st["sft_config"]["lora_modules_to_save"]
        f.write_text(json.dumps(st))
    sft(SFTConfig(out=str(tmp_path / "b"), progress=False), resume=True, log=lambda *m: None)

    def losses(d):
        recs = [json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["lm_loss"]) for r in recs if "kind" not in r]
    assert losses("a") == losses("b")
    la = [v for _, v in losses("a")]
    assert all(b < a for a, b in zip(la, la[1:])) and la[-1] < la[0] - 0.05, la   # only adapters learn: slower
    from safetensors.torch import load_file
    wa, wb = load_file(str(final / "adapter_model.safetensors")), load_file(str(tmp_path / "b" / "final" /
                                                                               "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # dsv3 merge-lora BASE ADAPTER OUT: an HF checkpoint equal to base + adapter
    merged_dir = tmp_path / "merged"
    assert main(["merge-lora", str(path), str(final), str(merged_dir)]) == 0
    merged = load_pretrained(merged_dir).eval()
    with_adapter = load_adapter(load_pretrained(path).eval(), final)
    x = tokens(vocab=merged.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), with_adapter(x), rtol=0, atol=1e-5)
    assert (merged_dir / "tokenizer.json").is_file()
    # the run left the routers' bias as the base has it (the adapter is applied to that base)
    assert torch.equal(merged.layers[1].mlp.gate.e_score_correction_bias,
                       load_pretrained(path).layers[1].mlp.gate.e_score_correction_bias)
    # the engine loads base + adapter: the same greedy tokens as the merged checkpoint
    prompt = tok.render_chat([{"role": "user", "content": "What is 1 + 2?"}], thinking=True)
    sp = SamplingParams(temperature=0, max_tokens=6)
    got = LLM(str(path), adapter=str(final), max_num_seqs=1, max_model_len=64).generate([prompt], sp)[0]
    want = LLM(str(merged_dir), max_num_seqs=1, max_model_len=64).generate([prompt], sp)[0]
    assert got.token_ids == want.token_ids
    with pytest.raises(ValueError, match="LoRA adapter"):
        LLM(str(final))                                          # the adapter alone is not a model
    assert main(["generate", "--model", str(path), "--adapter", str(final), "--prompt", "What is 1 + 2?",
                 "--max-tokens", "3", "--temperature", "0"]) == 0
    with pytest.raises(SystemExit):
        main(["merge-lora", str(path), str(tmp_path / "nowhere"), str(tmp_path / "m2")])
    assert "adapter_config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):                            # an adapter given as --model: say what to do
        main(["chat", "--model", str(final)])
    assert f"--model {path} --adapter {final}" in capsys.readouterr().err


def test_sft_lora_modules_to_save_train_embed_head_and_merge_and_serve_them(chat_setup, tmp_path):
    """`dsv3 sft --lora-modules-to-save embed,head`: the adapter holds the trained embedding and head,
    `dsv3 merge-lora` writes them into the checkpoint, and `LLM(base, adapter=)` decodes as the merge."""
    from dsv3.checkpoint import load_pretrained
    from dsv3.cli import main
    from dsv3.engine import LLM, SamplingParams
    from dsv3.post.sft import SFTConfig, sft
    path, tok, data = chat_setup
    s = sft(SFTConfig(model=str(path), data=[str(data)], out=str(tmp_path / "r"), max_steps=2, batch_size=4,
                      seq_len=64, lr=3e-2, warmup_steps=0, save_every=0, eval_every=0, val_fraction=0.0,
                      progress=False, lora_rank=4, lora_targets="q,kv,o", lora_modules_to_save="embed,head"),
            log=lambda *m: None)
    final = tmp_path / "r" / "final"
    base = load_pretrained(path)
    assert s["trainable_params"] == (sum(p.numel() for p in lora_parameters(load_adapter(load_pretrained(path), final))))
    assert s["trainable_params"] > base.embed_tokens.weight.numel() + base.lm_head.weight.numel()
    assert json.loads((final / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert main(["merge-lora", str(path), str(final), str(tmp_path / "merged")]) == 0
    merged = load_pretrained(tmp_path / "merged")
    from safetensors.torch import load_file
    ad = load_file(str(final / "adapter_model.safetensors"))
    for ours, key in (("embed_tokens", "model.embed_tokens"), ("lm_head", "lm_head")):
        w = getattr(merged, ours).weight
        assert torch.equal(w, ad[f"base_model.model.{key}.weight"]) and not torch.equal(w, getattr(base, ours).weight)
    prompt = tok.render_chat([{"role": "user", "content": "What is 1 + 2?"}], thinking=True)
    sp = SamplingParams(temperature=0, max_tokens=6)
    got = LLM(str(path), adapter=str(final), max_num_seqs=1, max_model_len=64).generate([prompt], sp)[0]
    want = LLM(str(tmp_path / "merged"), max_num_seqs=1, max_model_len=64).generate([prompt], sp)[0]
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("save", [None, ["embed_tokens", "lm_head"]])
def test_an_adapter_peft_trained_loads_into_ours(tmp_path, save):
    """The other direction: an attention adapter made and saved by peft on transformers' model gives
    the same logits on our model after load_adapter (also with the embedding and head in
    modules_to_save, peft's copies moved as training would)."""
    peft, hf, x = peft_and_hf_base(tmp_path / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=12, init_lora_weights=False,  # random B: not a no-op
                          target_modules=["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
                          modules_to_save=save)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf, cfg).eval()
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".modules_to_save." in n:
                    p.add_(0.05 * torch.randn_like(p))
        pm.save_pretrained(tmp_path / "ad")
    ours = load_adapter(dsv3.load_pretrained(tmp_path / "base", dtype=torch.float32).eval(), tmp_path / "ad")
    plain = dsv3.load_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        want = pm(x).logits
        assert (want - plain(x)).abs().max() > 0.1                      # the adapter matters
        torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-4)
    assert all(m.rank == 4 and m.scaling == 3.0 for _, m in lora_modules(ours))
