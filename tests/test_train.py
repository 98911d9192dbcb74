"""Pre-training: balance mechanics, MTP loss alignment, schedule, checkpoints and exact resume."""

import dataclasses
import inspect
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_MODEL

import dsv3
from dsv3.model import ModelOutput
from dsv3.model.moe import Router
from dsv3.train import balance
from dsv3.train.optim import Schedule, param_groups
from dsv3.train.state import read_trainer_state, state_dir
from dsv3.train.trainer import TrainConfig, TrainError, compute_losses, train

SMALL_MODEL = dict(TRAIN_MODEL, hidden_size=64, intermediate_size=128, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few hundred KB of real Python source, as text files."""
    import argparse
    import collections
    import json as json_mod
    import textwrap
    d = tmp_path_factory.mktemp("corpus")
    for mod in (argparse, collections, json_mod, textwrap, inspect, dataclasses):
        (d / f"{mod.__name__.replace('.', '_')}.py").write_text(inspect.getsource(mod))
    for i, mod in enumerate((os, shutil, subprocess)):  # more documents, so the val split isn't empty
        src = inspect.getsource(mod)
        for j in range(0, len(src), 4000):
            (d / f"chunk_{i}_{j}.txt").write_text(src[j:j + 4000])
    return d


def tiny_run(corpus: Path, out: Path, **over) -> TrainConfig:
    base = dict(data=[str(corpus)], out=str(out), max_steps=8, batch_size=4, seq_len=64, lr=1e-2,
                warmup_steps=2, save_every=4, eval_every=4, eval_batches=2, vocab_size=512,
                tokenizer_train_mb=0.3, val_fraction=0.1, progress=False, sample_tokens=8,
                model_overrides=dict(SMALL_MODEL), device="cpu")
    base.update(over)
    return TrainConfig(**base)


def read_metrics(out: Path):
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r for r in recs if "kind" not in r], [r for r in recs if r.get("kind") == "eval"]


# ----------------------------------------------------------------------------- balance mechanics
def test_bias_update_direction_and_magnitude():
    cfg = dsv3.ModelConfig.from_hf(dict(hidden_size=8, n_routed_experts=4, n_group=1, topk_group=1,
                                        num_experts_per_tok=1))
    r = Router(cfg)
    counts = torch.tensor([10, 0, 5, 5])           # mean 5: over, under, even, even
    balance.update_bias(r, counts, gamma=0.01)
    assert torch.equal(r.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    balance.update_bias(r, counts, gamma=0.0)      # switched off
    assert torch.equal(r.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_max_violation():
    assert balance.max_violation(torch.tensor([4, 4, 4, 4])).item() == 0.0
    assert math.isclose(balance.max_violation(torch.tensor([10, 2, 4, 4])).item(), (10 - 5) / 5)


def test_sequence_balance_loss_hand_computed():
    # one sequence, T=2 tokens, E=2 experts, K=1
    scores = torch.tensor([[0.6, 0.2], [0.3, 0.3]])  # normalized per token: [.75,.25], [.5,.5]
    topk = torch.tensor([[0], [0]])
    # f = N/(K T) * counts = 2/2 * [2, 0] = [2, 0];  P = mean([.75,.25],[.5,.5]) = [.625, .375]
    expected = 2 * 0.625 + 0 * 0.375
    assert math.isclose(balance.sequence_balance_loss(scores, topk, 1).item(), expected, rel_tol=1e-6)
    # two sequences are averaged, each with its own T
    scores2 = torch.cat([scores, torch.tensor([[0.1, 0.9], [0.1, 0.9]])])
    topk2 = torch.cat([topk, torch.tensor([[1], [1]])])
    second = 2 * (0.9)  # f=[0,2], P=[.1,.9]
    assert math.isclose(balance.sequence_balance_loss(scores2, topk2, 2).item(), (expected + second) / 2,
                        rel_tol=1e-6)
    # the classic loss pools all 4 tokens instead: f = 2/4*[2,2]=[1,1], P = mean of normalized rows
    P = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.1, 0.9], [0.1, 0.9]]).mean(0)
    assert math.isclose(balance.batch_balance_loss(scores2, topk2).item(), float(P.sum()), rel_tol=1e-6)


def test_mtp_loss_alignment_depth_k_predicts_token_i_plus_k_plus_1():
    V, S = 11, 9
    window = torch.randint(0, V, (2, S + 1), generator=torch.Generator().manual_seed(0))

    class Oracle(torch.nn.Module):
        """Puts all mass on the right answer, if the trainer aligns targets the documented way."""

        def forward(self, x, return_mtp=False):
            big = 30.0
            logits = torch.nn.functional.one_hot(window[:, 1:], V).float() * big
            mtp = [torch.nn.functional.one_hot(window[:, k + 1:], V).float() * big for k in (1, 2)]
            return ModelOutput(logits, mtp, torch.zeros(2, S, 4))

    cfg = TrainConfig(seq_aux_alpha=0.0)
    losses = compute_losses(Oracle(), window, cfg)
    assert losses["lm_loss"] < 1e-6 and losses["mtp_loss"] < 1e-6
    # shifting the depth-1 target by one position is heavily penalized
    class OffByOne(Oracle):
        def forward(self, x, return_mtp=False):
            out = super().forward(x)
            out.mtp_logits[0] = torch.nn.functional.one_hot(window[:, 1:-1], V).float() * 30.0
            return out
    assert compute_losses(OffByOne(), window, cfg)["mtp_loss"] > 1.0


def test_schedule_and_param_groups():
    s = Schedule(lr=1.0, total_steps=100, warmup_steps=10, decay_start=0.5, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == s(49) == 1.0
    assert s(50) == pytest.approx(1.0) and s(75) == pytest.approx(0.55) and s(100) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 100))
    model = dsv3.Transformer(dsv3.ModelConfig.from_hf(dict(SMALL_MODEL, vocab_size=32, num_nextn_predict_layers=0)))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.layers[1].mlp.experts.gate_proj for p in decay["params"])


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = train(tiny_run(corpus, out), log=lambda *a: None)
    return out, summary


def test_run_writes_metrics_checkpoints_plots_and_learns(finished_run):
    out, summary = finished_run
    steps, evals = read_metrics(out)
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s",
                "maxvio_batch", "maxvio_batch_mean"):
        assert key in steps[0], key
    assert len(steps[0]["maxvio_batch"]) == 1  # one MoE layer in the main model
    assert steps[-1]["lm_loss"] < steps[0]["lm_loss"] - 0.5
    assert [e["step"] for e in evals] == [4, 8]
    for key in ("val_loss", "val_ppl", "maxvio_global", "mtp_top1_acc", "expert_load"):
        assert key in evals[-1], key
    assert read_trainer_state(out / "checkpoint-4")["step"] == 4  # its training state, under OUT/train_state/
    assert state_dir(out / "final").parent == out / "train_state" and not list((out / "final").glob("optim*"))
    assert (out / "final" / "config.json").exists() and (out / "final" / "tokenizer.json").exists()
    for png in ("loss.png", "maxvio.png", "expert_load.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert summary["val_loss"] == evals[-1]["val_loss"] and summary["steps"] == 8
    assert isinstance(summary["sample"], str)
    # the final model is the trained one, with its selection biases moved by the balancer
    m = dsv3.load_pretrained(out / "final")
    assert m.config.num_nextn_predict_layers == 1
    assert m.layers[1].mlp.gate.e_score_correction_bias.abs().sum() > 0


def test_resume_is_bit_exact(finished_run, tmp_path):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "final")
    summary = train(TrainConfig(out=str(copy), progress=False), resume=True, log=lambda *a: None)
    a, _ = read_metrics(out)
    b, _ = read_metrics(copy)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "lr"):
            assert ra[k] == rb[k], (ra["step"], k)  # bit for bit
    ma, mb = dsv3.load_pretrained(out / "final"), dsv3.load_pretrained(copy / "final")
    for (n, p), q in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(p, q), n
    assert summary["steps"] == 8


def test_exported_checkpoint_loads_in_transformers(finished_run):
    transformers = pytest.importorskip("transformers")
    out, _ = finished_run
    ours = dsv3.load_pretrained(out / "final")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out / "final")
    ids = torch.tensor([tok("def main():\n    return 1\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4


def test_nonfinite_losses_skip_updates_then_stop(corpus, tmp_path, monkeypatch):
    import dsv3.train.trainer as T
    real = T.compute_losses

    def poisoned(model, window, cfg):
        out = real(model, window, cfg)
        out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(T, "compute_losses", poisoned)
    with pytest.raises(TrainError, match="3 non-finite losses in a row"):
        train(tiny_run(corpus, tmp_path / "nan", max_nonfinite=3), log=lambda *a: None)
    steps, _ = read_metrics(tmp_path / "nan")
    assert [r.get("skipped") for r in steps] == [True, True, True]


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(TrainError, match="no complete checkpoint"):
        train(TrainConfig(out=str(tmp_path), progress=False), resume=True)


def test_sigkill_mid_run_resumes_from_last_complete_checkpoint(corpus, tmp_path):
    """A run killed with SIGKILL resumes from its last complete checkpoint; losses then equal an
    uninterrupted run's (constant LR, so the schedule does not depend on the step budget)."""
    common = ["--data", str(corpus), "--batch-size", "4", "--seq-len", "64", "--vocab-size", "512",
              "--warmup-steps", "0", "--decay-start", "1", "--save-every", "2", "--eval-every", "0",
              "--no-progress", "--val-fraction", "0.1"]
    common += ["--tokenizer-train-mb", "0.3"] + [a for k, v in SMALL_MODEL.items() for a in ("--model-set", f"{k}={v}")]
    env = dict(os.environ)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "train", "--out", str(killed), "--max-steps", "1000",
                             *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint-4").exists():
            assert proc.poll() is None and time.time() < deadline, "training did not reach step 4"
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere inside a later step (or a later checkpoint write)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    from dsv3.train.state import latest_checkpoint
    ckpt = latest_checkpoint(killed)
    resumed_from = int(ckpt.name.split("-")[1])
    target = resumed_from + 2
    subprocess.run([sys.executable, "-m", "dsv3", "train", "--resume", str(killed), "--max-steps", str(target),
                    "--no-progress"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "dsv3", "train", "--out", str(ref), "--max-steps", str(target), *common],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    a, _ = read_metrics(killed)
    b, _ = read_metrics(ref)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, target + 1))
    for ra, rb in zip(a, b):
        assert ra["loss"] == rb["loss"], ra["step"]


def test_wide_latent_trains_kv_b_proj_at_the_scaled_rate(corpus, tmp_path):
    # A latent of 32 on a 64-wide model (hidden/4 = 16): s = 0.5 reaches the optimizer the trainer
    # builds, saved with the run; --no-latent-fan-in-scaling leaves the two plain groups.
    from dsv3.train.state import read_trainer_state
    groups = {}
    for on in (True, False):
        out = tmp_path / f"run-{on}"
        train(tiny_run(corpus, out, max_steps=1, save_every=0, eval_every=0, sample_tokens=0,
                       model_overrides=dict(SMALL_MODEL, kv_lora_rank=32), latent_fan_in_scaling=on))
        groups[on] = read_trainer_state(out / "final")["optimizer_param_groups"]
    assert [g.get("lr_scale") for g in groups[True]] == [None, None, 0.5]
    assert len(groups[True][2]["params"]) == 2 + 1  # kv_b_proj of both layers and of the MTP module
    assert [g.get("lr_scale") for g in groups[False]] == [None, None]
