"""SFT: assistant-only loss against a float64 reference, the distillation KL, exact resume, and the
output being a chat model the engine and `dsv3 chat` load."""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import torch
from post_fixtures import tiny_chat_model

from dsv3.checkpoint import load_pretrained
from dsv3.cli import main
from dsv3.post.chat_data import pack, read_chat_jsonl
from dsv3.post.sft import SFTConfig, sft, sft_losses, topk_kl
from dsv3.tasks import Arithmetic, problems


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    path, tok = tiny_chat_model(root / "base")
    data = root / "chat.jsonl"
    records = [p.sft_record() for p in problems(Arithmetic(max_value=9), 40, 0)]
    records.append({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello there"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, tok, data


def test_masked_loss_matches_float64_reference(setup):
    path, tok, data = setup
    model = load_pretrained(path)
    packed = pack(read_chat_jsonl(data, tok)[:8], seq_len=48, pad_id=tok.pad_id)
    batch = packed.rows(list(range(len(packed))))
    cfg = SFTConfig(mtp_weight=0.0, seq_aux_alpha=0.0, distill_weight=0.0)
    losses = sft_losses(model, batch, cfg)
    # reference: float64 log-softmax, loop over every position, keep only assistant targets
    x, y = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    with torch.no_grad():
        logp = model(x).double().log_softmax(-1)
    total, n = 0.0, 0
    for b in range(y.shape[0]):
        for t in range(y.shape[1]):
            if batch["targets_mask"][b, t]:
                total -= float(logp[b, t, y[b, t]])
                n += 1
    assert n == int(losses["target_tokens"]) and n < y.numel() / 2
    assert float(losses["lm_loss"].detach()) == pytest.approx(total / n, rel=1e-5)
    assert float(losses["loss"].detach()) == pytest.approx(total / n, rel=1e-5)
    with_mtp = sft_losses(model, batch, SFTConfig(mtp_weight=0.5, seq_aux_alpha=0.0))
    wm = {k: float(v.detach()) for k, v in with_mtp.items()}
    assert wm["loss"] == pytest.approx(wm["lm_loss"] + 0.5 * wm["mtp_loss"],
                                                    rel=1e-6)


def test_topk_kl_matches_hand_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, dtype=torch.float64)
    ids = torch.tensor([[1, 4, 7], [0, 2, 9], [5, 5, 5]])
    lps = torch.tensor([[-0.5, -1.5, -2.0], [-0.1, -3.0, float("-inf")], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    got = topk_kl(logits, ids, lps)
    for r in range(3):
        q = [math.exp(v) for v in logits[r].tolist()]
        z = sum(q)
        kept = [(int(i), float(lp)) for i, lp in zip(ids[r], lps[r]) if lp != float("-inf")]
        zt = sum(math.exp(lp) for _, lp in kept)
        want = sum(math.exp(lp) / zt * (lp - math.log(zt) - math.log(q[i] / z)) for i, lp in kept)
        assert float(got[r]) == pytest.approx(want, rel=1e-6)      # computed in float32
    # the teacher's own (renormalized) distribution has zero KL
    teacher_logits = torch.full((1, 10), -30.0, dtype=torch.float64)
    teacher_logits[0, [1, 4]] = torch.tensor([0.0, -1.0], dtype=torch.float64)
    assert float(topk_kl(teacher_logits, torch.tensor([[1, 4]]), torch.tensor([[0.0, -1.0]]))[0]) == pytest.approx(
        0.0, abs=1e-9)


def test_sft_learns_resumes_exactly_and_makes_a_chat_model(setup, tmp_path):
    path, tok, data = setup
    base = dict(model=str(path), data=[str(data)], batch_size=4, seq_len=64, lr=3e-3, warmup_steps=0,
                save_every=2, eval_every=2, val_fraction=0.1, progress=False)
    a = sft(SFTConfig(out=str(tmp_path / "a"), max_steps=4, **base), log=lambda *m: None)
    # an interrupted run: a copy without its last checkpoint and final model resumes from checkpoint-2
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    sft(SFTConfig(out=str(tmp_path / "b"), progress=False), resume=True, log=lambda *m: None)

    def train_losses(d):
        recs = [json.loads(ln) for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["lm_loss"], r["grad_norm"]) for r in recs if "kind" not in r]
    la = train_losses("a")
    assert la == train_losses("b")                           # bit for bit on CPU
    assert [s for s, _, _ in la] == [1, 2, 3, 4]
    assert la[-1][1] < la[0][1] - 0.2                        # it learns the assistant replies
    wa = load_pretrained(tmp_path / "a" / "final").state_dict()
    wb = load_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["val_loss"] is not None and (tmp_path / "a" / "plots" / "loss.png").is_file()
    final = tmp_path / "a" / "final"
    # HF layout chat model: weights, config, tokenizer with the chat template
    cfg = json.loads((final / "tokenizer_config.json").read_text())
    assert "chat_template" in cfg and (final / "config.json").is_file()
    from dsv3.engine import LLM, SamplingParams
    llm = LLM(str(final), max_num_seqs=1, max_model_len=64)
    prompt = tok.render_chat([{"role": "user", "content": "What is 1 + 2?"}], thinking=True)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0]
    assert len(out.token_ids) >= 1


def test_cli_sft_then_chat(setup, tmp_path, monkeypatch, capsys):
    path, tok, data = setup
    out = tmp_path / "run"
    assert main(["sft", "--model", str(path), "--data", str(data), "--out", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--seq-len", "48", "--no-progress", "--save-every", "0"]) == 0
    assert "chat model" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 1 + 2?\n"))
    assert main(["chat", "--model", str(out / "final"), "--max-tokens", "4", "--temperature", "0"]) == 0
    with pytest.raises(SystemExit):
        main(["sft", "--model", str(path), "--out", str(out)])    # no --data
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    with pytest.raises(SystemExit):
        main(["sft", "--model", str(path), "--data", str(bad), "--out", str(out), "--no-progress"])
    assert "bad.jsonl:1" in capsys.readouterr().err
