"""`dsv3 experiment fp8`: its shape knobs reach the runs, and the noise floor is measured like the FP8 error."""

from __future__ import annotations

import json

import pytest


def _write_run(path, losses, val):
    path.mkdir(parents=True)
    lines = [json.dumps({"step": i + 1, "loss": v, "tokens_per_s": 100.0}) for i, v in enumerate(losses)]
    lines.append(json.dumps({"kind": "eval", "step": len(losses), "val_loss": val}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_noise_floor_uses_the_same_formulas(tmp_path):
    from dsv3.train.experiment_fp8 import SMOOTH, format_report, summarize_fp8_experiment
    base = [8.0 - 0.05 * i for i in range(40)]
    f8 = [v * 1.001 for v in base]
    floor = [v * (1.004 if i % 3 else 0.998) for i, v in enumerate(base)]
    _write_run(tmp_path / "baseline", base, 5.0)
    _write_run(tmp_path / "fp8", f8, 5.005)
    _write_run(tmp_path / "floor", floor, 5.02)
    r = summarize_fp8_experiment(tmp_path, 128, "fp32")
    f = r["floor"]
    # written out independently: per-step |floor - base| / base, and the 10-step moving averages
    rel = [abs(b2 - b) / b for b, b2 in zip(base, floor)]
    assert f["rel_err_per_step_mean"] == pytest.approx(sum(rel) / len(rel))
    assert f["rel_err_per_step_max"] == pytest.approx(0.004)
    mb, mf = sum(base[-SMOOTH:]) / SMOOTH, sum(floor[-SMOOTH:]) / SMOOTH
    assert f["rel_err_smoothed_max_after_window"] >= abs(mf - mb) / mb
    assert f["rel_err_val_loss"] == pytest.approx(0.004) and f["val_loss_floor"] == 5.02
    assert r["rel_err_per_step_mean"] == pytest.approx(0.001)      # the FP8 arm, unchanged by the floor
    table = format_report(r)
    assert "noise floor" in table and "0.400%" in table
    assert json.loads((tmp_path / "fp8_results.json").read_text())["floor"]["steps"] == 40


def test_without_a_floor_run_the_report_has_one_column(tmp_path):
    from dsv3.train.experiment_fp8 import format_report, summarize_fp8_experiment
    _write_run(tmp_path / "baseline", [5.0] * 12, 5.0)
    _write_run(tmp_path / "fp8", [5.05] * 12, 5.0)
    r = summarize_fp8_experiment(tmp_path, 128, "fp32")
    assert r["floor"] is None and "noise floor" not in format_report(r)


def test_shape_flags_reach_every_arm(monkeypatch, tmp_path):
    # A fake trainer records each arm's config: the shape flags (and --model-set on top) must reach all.
    import dsv3.train.experiment_fp8 as E
    from dsv3.cli import build_parser
    from dsv3.cli.fields import from_args
    from dsv3.cli.train import train_config_from_args
    args = build_parser().parse_args(["experiment", "fp8", "--hidden-size", "512", "--num-hidden-layers", "3",
                                      "--model-set", "moe_intermediate_size=128"])
    cfg, exp = train_config_from_args(args), from_args(E.FP8ExperimentConfig, args)
    assert cfg.max_steps == 60 and cfg.mtp_depth == 0 and exp.noise_floor
    seen = []
    monkeypatch.setattr(E, "train", lambda c, log=None: seen.append(c))
    monkeypatch.setattr(E, "summarize_fp8_experiment", lambda *a: {})
    r = E.run_fp8_experiment(cfg, tmp_path, exp, log=lambda *_: None)
    assert [(c.fp8, c.seed) for c in seen] == [(False, 0), (True, 0), (False, 1)]
    for c in seen:
        assert c.model_overrides["hidden_size"] == 512 and c.model_overrides["num_hidden_layers"] == 3
        assert c.model_overrides["moe_intermediate_size"] == 128      # --model-set wins
        assert c.model_overrides["num_key_value_heads"] == c.model_overrides["num_attention_heads"]
    assert r["k_blocks_hidden"] == 4
    seen.clear()
    E.run_fp8_experiment(cfg, tmp_path, E.FP8ExperimentConfig(noise_floor=False), log=lambda *_: None)
    assert [c.fp8 for c in seen] == [False, True]
    # the default shape: K of the hidden-size GEMMs spans 8 blocks of 128
    assert E.FP8ExperimentConfig().hidden_size // 128 == 8
