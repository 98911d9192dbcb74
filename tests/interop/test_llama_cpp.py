"""Interop with an unmodified llama.cpp (llama-cpp-python's build): our GGUF export loads and runs
like dsv3, token for token.

Models: tiny checkpoints with the servable latent width (kv_lora_rank 512 + rope 64). For exactness,
random weights far from ties in three router/RoPE flavours: V3 (sigmoid, selection bias, 4 groups
keep 2, q-LoRA, one MTP block), V3 with YaRN, V2 (softmax, no q-LoRA, YaRN with mscale 0.707). For
the tolerances, a V3 model trained for a few steps (a random model's top-1 flips under any rounding:
even dsv3 itself on q8_0-rounded weights agrees with its fp32 on only ~86% of positions). The
reference is dsv3's own forward pass (full recompute, fp32, greedy argmax).

Measured on this machine (AMD EPYC, AVX2, llama-cpp-python 0.3.36, one thread):
  f32, f32 cache, flash attention off: greedy tokens equal on every prompt of every flavour (one
      sequence per call and five per llama_decode); teacher-forced logits within 3.1e-5 of the logit
      range (bound 1e-4).
  llama.cpp defaults (flash attention on, which rounds K/V to f16), trained model, 237 positions:
      type   top-1   median / max |dlogit| (relative to the logit range)   greedy tokens equal (of 16)
      f32    0.996   4.6e-5 / 2.0e-4                                        16 16 16 16 16
      f16    0.996   1.6e-4 / 7.1e-4                                        16 16 16 16 16
      bf16   0.996   1.2e-3 / 9.1e-2                                        16 16 16 16 16
      q8_0   0.987   3.7e-3 / 9.1e-2                                        16 16 16 16 7
  (q8_0 also quantizes the activations inside llama.cpp's matmuls.) Bounds: TOLERANCES.
"""

from __future__ import annotations

import ctypes
import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.interop

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                    "(pip install -c constraints.txt llama-cpp-python)")

import dsv3  # noqa: E402
from conftest import CHAT_TEXT, far_from_ties_, tiny_config  # noqa: E402
from dsv3.bench.peers.llama_cpp import LlamaCppModel, llama_cpp_unavailable, run_llama_cpp  # noqa: E402
from dsv3.export.gguf import export_gguf  # noqa: E402
from dsv3.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
             num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=64, qk_rope_head_dim=64, qk_nope_head_dim=32,
             v_head_dim=32, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             max_position_embeddings=512)
FLAVOURS = {
    "v3": {},
    "v3-yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "v2": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.5, q_lora_rank=None, num_nextn_predict_layers=0,
               rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
}
TEXTS = ["the engine reads a prompt and", "def step(self, batch):\n    for seq in",
         "every position of every sequence so that no key", "writes one token at a time while the latent",
         "Hello, World! 12345 ünïcödé 🙂 and the cache"]
NEW_TOKENS = 16
THREADS = 1  # a shared 2-core machine; the model is tiny


def build(path, **overrides):
    tok = train_tokenizer([CHAT_TEXT], vocab_size=300)
    cfg = tiny_config(**{**SHAPE, "vocab_size": tok.vocab_size, **overrides})
    torch.manual_seed(0)
    model = far_from_ties_(dsv3.Transformer(cfg), router_bias=0.1)
    dsv3.save_pretrained(model, path)
    tok.save(path)
    return model.eval(), tok


@pytest.fixture(scope="module")
def flavours(tmp_path_factory):
    """name -> (model, tokenizer, checkpoint dir, {type: gguf path})."""
    out = {}
    for name, overrides in FLAVOURS.items():
        d = tmp_path_factory.mktemp(name)
        model, tok = build(d / "ckpt", **overrides)
        types = ("f32", "f16", "bf16", "q8_0") if name == "v3" else ("f32",)
        files = {t: d / f"{name}-{t}.gguf" for t in types}
        for t, f in files.items():
            export_gguf(d / "ckpt", f, t)
        out[name] = (model, tok, d / "ckpt", files)
    return out


TRAIN_STEPS = 80  # ~15 s on one thread: loss ~6 -> ~2 on CHAT_TEXT


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A V3-flavour model briefly trained on CHAT_TEXT (peaked predictions, as a real model has:
    a random model's top-1 flips under any rounding), exported in every type: (model, tok, files)."""
    d = tmp_path_factory.mktemp("trained")
    tok = train_tokenizer([CHAT_TEXT], vocab_size=300)
    cfg = tiny_config(**{**SHAPE, "vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    model = dsv3.Transformer(cfg)
    ids = torch.tensor([tok.bos_id] + tok.encode(CHAT_TEXT))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(TRAIN_STEPS):
            x = torch.stack([ids[s:s + 65] for s in torch.randint(0, len(ids) - 65, (8,), generator=g)])
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(before)
    model.eval()
    dsv3.save_pretrained(model, d / "ckpt")
    tok.save(d / "ckpt")
    files = {t: d / f"trained-{t}.gguf" for t in ("f32", "f16", "bf16", "q8_0")}
    for t, f in files.items():
        export_gguf(d / "ckpt", f, t)
    return model, tok, files


def prompts(tok: Tokenizer) -> list[list[int]]:
    return [[tok.bos_id] + tok.encode(t) for t in TEXTS]


@torch.no_grad()
def dsv3_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def dsv3_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids]))[0].numpy()


def test_adapter_reports_available():
    assert llama_cpp_unavailable() is None


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_f32_greedy_tokens_equal_dsv3(flavours, flavour, one_thread):
    """Exact f32 (f32 cache, flash attention off): the same greedy tokens, one sequence per call
    and all sequences in one multi-sequence llama_decode per step."""
    model, tok, _, files = flavours[flavour]
    ps = prompts(tok)
    ours = [dsv3_greedy(model, p, NEW_TOKENS) for p in ps]
    theirs = run_llama_cpp(files["f32"], ps, NEW_TOKENS, THREADS, batch=1, kv_type="f32", flash_attn=False)
    assert theirs["tokens"] == ours
    assert theirs["decode_tokens"] == len(ps) * (NEW_TOKENS - 1) and theirs["kv_type"] == "f32"
    batched = run_llama_cpp(files["f32"], ps, NEW_TOKENS, THREADS, batch=len(ps), kv_type="f32", flash_attn=False)
    assert batched["tokens"] == ours and batched["batch"] == len(ps)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_f32_logits_match_dsv3(flavours, flavour, one_thread):
    """Teacher-forced logits over prompt + continuation (up to 61 positions): measured <= 3.1e-5 of
    the logit range (a random model amplifies rounding; llama.cpp sums in another order); bound 1e-4."""
    model, tok, _, files = flavours[flavour]
    with LlamaCppModel(str(files["f32"]), THREADS, 1, 256, 256, kv_type="f32", flash_attn=False) as m:
        for p in prompts(tok):
            seq = p + dsv3_greedy(model, p, NEW_TOKENS)
            ours, theirs = dsv3_logits(model, seq), m.logits(seq)
            assert float(np.abs(ours - theirs).max()) <= 1e-4 * float(np.abs(ours).max()), flavour


def agreement(model, tok, gguf, **llama_kw) -> dict:
    """llama.cpp (``llama_kw`` settings) against our fp32: top-1 agreement over teacher-forced
    positions (prompt + our greedy continuation), the per-position logit error relative to the logit
    range (median and max), and per prompt how many greedy tokens match before the first difference."""
    agree = total = 0
    errs = []
    ours_tokens = [dsv3_greedy(model, p, NEW_TOKENS) for p in prompts(tok)]
    with LlamaCppModel(str(gguf), THREADS, 1, 256, 256, **llama_kw) as m:
        for p, cont in zip(prompts(tok), ours_tokens):
            ours, theirs = dsv3_logits(model, p + cont), m.logits(p + cont)
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            total += len(ours)
            errs += list(np.abs(ours - theirs).max(-1) / np.abs(ours).max())
    theirs_tokens = run_llama_cpp(gguf, prompts(tok), NEW_TOKENS, THREADS, **llama_kw)["tokens"]
    prefixes = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                for a, b in zip(ours_tokens, theirs_tokens)]
    return {"top1": round(agree / total, 4), "positions": total, "median_rel_err": float(f"{np.median(errs):.3g}"),
            "max_rel_err": float(f"{max(errs):.3g}"), "greedy_equal_prefix": prefixes}


# (GGUF type, min top-1 agreement, max median relative logit error, min greedy tokens equal per
# prompt) at llama.cpp's default settings (flash attention auto = on, which rounds K/V to f16;
# cache f32 for f32 files, bf16 for bf16, f16 otherwise), on the trained model. Measured values
# are in the module docstring; the bounds leave room for other CPUs' kernels.
TOLERANCES = [
    ("f32", 0.99, 5e-4, NEW_TOKENS // 2),
    ("f16", 0.99, 2e-3, NEW_TOKENS // 2),
    ("bf16", 0.97, 1e-2, 4),
    ("q8_0", 0.95, 2e-2, 4),
]


@pytest.mark.parametrize("out_type, min_top1, max_median, min_prefix", TOLERANCES, ids=[t[0] for t in TOLERANCES])
def test_llama_cpp_defaults_within_tolerance(trained, out_type, min_top1, max_median, min_prefix, one_thread,
                                             record_property):
    """Each GGUF type at llama.cpp's defaults, loaded on the plain CPU buffers (no repack)."""
    model, tok, files = trained
    r = agreement(model, tok, files[out_type])
    record_property(out_type, json.dumps(r))
    print(f"{out_type}: {json.dumps(r)}")
    assert r["top1"] >= min_top1 and r["median_rel_err"] <= max_median and min(r["greedy_equal_prefix"]) >= min_prefix, r


def test_trained_f32_exact_greedy(trained, one_thread):
    model, tok, files = trained
    ps = prompts(tok)
    ours = [dsv3_greedy(model, p, NEW_TOKENS) for p in ps]
    assert run_llama_cpp(files["f32"], ps, NEW_TOKENS, THREADS, batch=2, kv_type="f32",
                         flash_attn=False)["tokens"] == ours


# ---------------------------------------------------------------------------------------------
# Tokenizer: llama.cpp's gpt2 BPE with the gpt-2 pre-tokenizer vs ours


CORPUS = [
    "the engine reads a prompt and writes one token at a time",
    "Hello, World! It's 2025-01-31; we've got 1234567 tokens & 3.14159 ideas. They'll say I'd 'quote'.",
    "def step(self, batch):\n    for seq in batch:\n\t\tseq.output.append(token)  # comment\n    return batch\n",
    "   leading spaces, trailing spaces   \n\n\n  and blank lines\r\n\twith tabs\t\t  ",
    "ünïcödé façade — “quotes” … 中文字符 日本語のテキスト 한국어 🙂🚀 emoji ∑∫√ math ½ ² ٣ ४",
    "x" * 50 + " " + "ab" * 30 + "   " + "9" * 40 + "\n \n  \n",
    "<｜User｜>special strings stay text</think><think><｜end▁of▁sentence｜>",
    "if (a<=b && c!=d) { return x->y[0]; } // ok?!\n\n\n",
    " a  b   c    d\u00a0e\u2003f\u3000g",
]


def llama_tokenize(m: LlamaCppModel, text: str, parse_special: bool = False) -> list[int]:
    ll = m.ll
    vocab = ll.llama_model_get_vocab(m.model)
    raw = text.encode("utf-8")
    buf = (ll.llama_token * (len(raw) + 8))()
    n = ll.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, parse_special)
    assert n >= 0
    return list(buf[:n])


def llama_piece(m: LlamaCppModel, token: int) -> bytes:
    ll = m.ll
    buf = (ctypes.c_char * 256)()
    n = ll.llama_token_to_piece(ll.llama_model_get_vocab(m.model), token, buf, len(buf), 0, True)
    assert n >= 0
    return bytes(buf[:n])


def test_llama_cpp_tokenizes_like_ours(flavours):
    _, tok, _, files = flavours["v3"]
    with LlamaCppModel(str(files["f32"]), THREADS, 1, 64, 64) as m:
        for text in CORPUS + [CHAT_TEXT]:
            ids = tok.encode(text)
            assert llama_tokenize(m, text) == ids, text
            assert b"".join(llama_piece(m, i) for i in ids).decode("utf-8") == text
        # with special parsing on, llama.cpp finds the CONTROL tokens, as render_chat places them
        assert llama_tokenize(m, "<｜User｜>hi<｜Assistant｜>", parse_special=True) == (
            [tok.token_id("<｜User｜>")] + tok.encode("hi") + [tok.token_id("<｜Assistant｜>")])


# ---------------------------------------------------------------------------------------------
# Chat template: the GGUF's template through llama-cpp-python's chat formatter vs transformers


CONVERSATIONS = [
    dict(messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]),
    dict(messages=[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                   {"role": "user", "content": "and 3+3?"}], thinking=True),
    dict(messages=[
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
        {"role": "tool", "content": "{\"t\": 21}"},
        {"role": "tool", "content": "{\"rain\": false}"},
        {"role": "assistant", "content": "21 °C, dry."},
        {"role": "user", "content": "thanks"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}}}}]),
]


def gguf_chat_template(m: LlamaCppModel) -> str:
    ll = m.ll
    return ll.llama_model_chat_template(m.model, None).decode("utf-8")


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chat_template_renders_like_transformers(flavours, case):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    _, tok, ckpt, files = flavours["v3"]
    conv = CONVERSATIONS[case]
    with LlamaCppModel(str(files["f32"]), THREADS, 1, 64, 64) as m:
        template = gguf_chat_template(m)
    hf = AutoTokenizer.from_pretrained(str(ckpt))
    want = hf.apply_chat_template(conv["messages"], tools=conv.get("tools"), tokenize=False,
                                  add_generation_prompt=True, thinking=conv.get("thinking", False))
    fmt = Jinja2ChatFormatter(template, eos_token="<｜end▁of▁sentence｜>", bos_token="<｜begin▁of▁sentence｜>")
    got = fmt(messages=conv["messages"], tools=conv.get("tools"), thinking=conv.get("thinking", False)).prompt
    assert got == want
    assert want == tok.render_chat_text(conv["messages"], thinking=conv.get("thinking", False),
                                        tools=conv.get("tools"))
