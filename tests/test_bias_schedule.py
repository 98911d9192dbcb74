"""The per-step gamma of the aux-loss-free bias update (--bias-update-schedule GAMMA:UNTIL,...): the
rate of each step (worked by hand), bad specs rejected, the trainer applying it (the first steps equal
a fixed-gamma run's bit for bit, a zero-gamma stretch leaves the biases where they were), and a
resume across the schedule's boundaries equal to the uninterrupted run."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.cli import main
from dsv3.train.bias_schedule import BiasSchedule, bias_rate, bias_schedule_spec
from dsv3.train.trainer import TrainConfig, TrainError, train

from conftest import source_corpus

SMALL_MODEL = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=24,
                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_group=4,
                   topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1)
SCHEDULE = "0.01:2,0:4"   # steps 1-2: 1e-2, steps 3-4: frozen, then --bias-update-rate
BASE = 0.004
STEPS = 6


def test_rate_per_step_by_hand():
    s = BiasSchedule.parse("0.01:3, 0.002:5")
    assert s.segments == ((0.01, 3), (0.002, 5))
    assert [s.rate(step, 0.001) for step in range(1, 9)] == [0.01] * 3 + [0.002] * 2 + [0.001] * 3
    # the paper's shape: 1e-3, then 0 for the rest
    assert [BiasSchedule.parse("1e-3:2").rate(step, 0.0) for step in (1, 2, 3, 100)] == [1e-3, 1e-3, 0.0, 0.0]
    assert bias_rate(None, 7, 0.003) == 0.003 and bias_rate("0.5:7", 7, 0.003) == 0.5
    assert bias_rate("0.5:7", 8, 0.003) == 0.003


@pytest.mark.parametrize("bad", ["", "x", "0.01", "0.01:0", "0.01:5,0.02:5", "0.01:5,0.02:3", "-0.01:5",
                                 "nan:5", "inf:5", "0.01:5,", "0.01:2.5", "1e:4"])
def test_bad_specs_are_rejected(bad):
    with pytest.raises(ValueError, match="bias update schedule"):
        BiasSchedule.parse(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        bias_schedule_spec(bad)


def test_none_means_no_schedule():
    from dsv3.cli import build_parser
    from dsv3.cli.train import train_config_from_args
    assert BiasSchedule.parse(" None ").segments == () and bias_schedule_spec("none") == "none"
    args = build_parser().parse_args(["train", "--bias-update-schedule", "none", "--bias-update-rate", "0"])
    cfg = train_config_from_args(args)
    assert cfg.bias_update_schedule == "none" and cfg.bias_update_rate == 0.0
    assert bias_rate(cfg.bias_update_schedule, 1, cfg.bias_update_rate) == 0.0  # switched off from step 1


def test_the_demo_default_is_the_measured_schedule():
    # benchmarks/RESULTS.md, "The demo's balance with a gamma schedule": 1e-3 for 100 steps, then 1e-2
    cfg = TrainConfig()
    assert [bias_rate(cfg.bias_update_schedule, s, cfg.bias_update_rate) for s in (1, 100, 101, 200)] == \
        [1e-3, 1e-3, 1e-2, 1e-2]
    # a run saved before the schedule existed resumes at its own fixed gamma
    assert TrainConfig.FORMER_DEFAULTS["bias_update_schedule"] is None


def test_cli_rejects_a_bad_schedule(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--bias-update-schedule", "0.01:5,0.02:3", "--max-steps", "1"])
    assert e.value.code == 2
    assert "the steps must increase" in capsys.readouterr().err


def test_bad_schedule_in_a_config_is_a_train_error(tmp_path):
    with pytest.raises(TrainError, match="--bias-update-schedule"):
        train(TrainConfig(out=str(tmp_path), bias_update_schedule="0.01", progress=False), log=lambda *a: None)


# ----------------------------------------------------------------------------- in the trainer
@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return source_corpus(tmp_path_factory.mktemp("corpus"), ("argparse", "collections", "json", "textwrap"))


def run_config(corpus: Path, out: Path, **over) -> TrainConfig:
    base = dict(data=[str(corpus)], out=str(out), cache_dir=str(out.parent / "cache"), max_steps=STEPS,
                batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2, save_every=2, keep_checkpoints=3,
                eval_every=0, eval_batches=1, vocab_size=400, tokenizer_train_mb=0.2, val_fraction=0.1,
                progress=False, sample_tokens=0, model_overrides=dict(SMALL_MODEL), device="cpu",
                bias_update_rate=BASE, bias_update_schedule=SCHEDULE)
    base.update(over)
    return TrainConfig(**base)


def metrics(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "kind" not in r]


def biases(model_dir: Path) -> dict[str, torch.Tensor]:
    """The e_score_correction_bias of every router in a saved model directory."""
    w = load_file(str(model_dir / "model.safetensors"))
    out = {k: v for k, v in w.items() if k.endswith("e_score_correction_bias")}
    assert out, f"no router biases in {model_dir}"
    return out


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("runs")
    scheduled, fixed = root / "scheduled", root / "fixed"
    train(run_config(corpus, scheduled), log=lambda *a: None)
    # the same run at the schedule's first gamma throughout: its first steps are the scheduled run's
    train(run_config(corpus, fixed, bias_update_rate=0.01, bias_update_schedule=None), log=lambda *a: None)
    return scheduled, fixed


def test_trainer_logs_the_schedule(runs):
    scheduled, fixed = runs
    assert [r["bias_update_rate"] for r in metrics(scheduled)] == [0.01, 0.01, 0.0, 0.0, BASE, BASE]
    assert all("bias_update_rate" not in r for r in metrics(fixed))  # no schedule: nothing new in the log


def test_schedule_moves_the_biases_as_it_says(runs):
    scheduled, fixed = runs
    at2, at4, end = biases(scheduled / "checkpoint-2"), biases(scheduled / "checkpoint-4"), biases(scheduled / "final")
    # steps 1-2 at gamma 1e-2 are the fixed-gamma run's: same biases after them, same losses up to step 3
    # (step 3's forward still sees the weights and biases of step 2)
    for k, v in biases(fixed / "checkpoint-2").items():
        assert torch.equal(at2[k], v), k
    for ra, rb in zip(metrics(scheduled)[:3], metrics(fixed)[:3]):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"]), ra["step"]
    assert any(v.abs().max() > 0.015 for v in at2.values())  # 2 steps of 1e-2 moved some bias by 2e-2
    for k in at2:
        assert torch.equal(at4[k], at2[k]), k  # gamma 0 in steps 3-4: the biases stay put
        step = end[k] - at4[k]                 # steps 5-6 at BASE: each entry moves by 0, 1 or 2 BASE
        assert torch.allclose(step / BASE, (step / BASE).round(), atol=1e-3) and step.abs().max() <= 2 * BASE + 1e-6
    assert any((end[k] - at4[k]).abs().max() > 0 for k in at4)
    # the fixed run kept moving at 1e-2 where the scheduled one stood still
    assert any(not torch.equal(v, at4[k]) for k, v in biases(fixed / "checkpoint-4").items())


def test_resume_across_the_schedule_is_bit_exact(runs, tmp_path):
    scheduled, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(scheduled, copy)
    for d in ("final", "checkpoint-6", "checkpoint-4"):  # resume from step 2: both boundaries still ahead
        shutil.rmtree(copy / d, ignore_errors=True)
    train(TrainConfig(out=str(copy), progress=False), resume=True, log=lambda *a: None)
    a, b = metrics(scheduled), metrics(copy)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "bias_update_rate", "maxvio_batch"):
            assert ra[k] == rb[k], (ra["step"], k)
    want, got = biases(scheduled / "final"), biases(copy / "final")
    assert all(torch.equal(want[k], got[k]) for k in want)
