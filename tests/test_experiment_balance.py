"""``dsv3 experiment balance``: every flag reaches the arms it names, the statistics over seeds, the
summary.json structure on a real 2-step smoke run (issue 17)."""

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import TRAIN_MODEL, source_corpus

from dsv3.cli import main
from dsv3.train import experiment_balance as EB

SMALL_MODEL = dict(TRAIN_MODEL, q_lora_rank=16, v_head_dim=8)


class FakeTrain:
    """Stands in for ``trainer.train``: records each run's config and writes a metrics.jsonl whose
    MaxVio_batch at step s is s (so late means are known by hand) and a val ppl of 100 + seed."""

    def __init__(self):
        self.configs = []

    def __call__(self, cfg, log=print):
        self.configs.append(cfg)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        lines = [{"step": s, "loss": 1.0, "maxvio_batch_mean": float(s)} for s in range(1, cfg.max_steps + 1)]
        lines.append({"kind": "eval", "step": cfg.max_steps, "val_loss": 5.0})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        return {"val_ppl": 100.0 + cfg.seed, "val_loss": math.log(100.0 + cfg.seed),
                "maxvio_global": 0.1 * cfg.seed + cfg.bias_update_rate, "steps": cfg.max_steps, "wall_s": 0.0}


@pytest.fixture
def fake_train(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(EB, "train", fake)
    return fake


def by_arm(fake: FakeTrain) -> dict:
    arms = {}
    for cfg in fake.configs:
        arms.setdefault(Path(cfg.out).parent.name, []).append(cfg)
    return arms


def test_flags_reach_every_arm(fake_train, tmp_path, capsys):
    out = tmp_path / "bal"
    rc = main(["experiment", "balance", "--out", str(out), "--bias-update-rate", "0.05", "--aux-loss-alpha", "0.02",
               "--seq-aux-alpha", "0.003", "--seeds", "3,4", "--max-steps", "8", "--batch-size", "3",
               "--seq-len", "16", "--no-progress"])
    assert rc == 0
    arms = by_arm(fake_train)
    assert set(arms) == {"aux_free", "aux_loss", "none"}
    for name, cfgs in arms.items():
        assert sorted(c.seed for c in cfgs) == [3, 4], name
        assert all(c.max_steps == 8 and c.batch_size == 3 and c.seq_len == 16 for c in cfgs), name
        assert all(c.cache_dir == str(out / "shared") for c in cfgs)   # one tokenizer and token cache
    knobs = {name: {(c.bias_update_rate, c.aux_loss_alpha, c.seq_aux_alpha) for c in cfgs} for name, cfgs in arms.items()}
    assert knobs == {"aux_free": {(0.05, 0.0, 0.003)}, "aux_loss": {(0.0, 0.02, 0.0)}, "none": {(0.0, 0.0, 0.0)}}

    summary = json.loads((out / "summary.json").read_text())
    s = summary["arms"]["aux_free"]["settings"]
    assert (s["bias_update_rate"], s["aux_loss_alpha"], s["seq_aux_alpha"], s["seeds"], s["max_steps"]) == \
        (0.05, 0.0, 0.003, [3, 4], 8)
    # late = last 25% of 8 steps = steps 7 and 8, whose fake MaxVio_batch is 7 and 8
    assert summary["arms"]["none"]["maxvio_batch_late"] == {"mean": 7.5, "std": 0.0}
    # val ppl 103 and 104 over the two seeds: sample std sqrt(0.5)
    ppl = summary["arms"]["aux_loss"]["val_ppl"]
    assert ppl["mean"] == pytest.approx(103.5) and ppl["std"] == pytest.approx(math.sqrt(0.5))
    printed = capsys.readouterr().out
    assert "| aux_free |" in printed and "103.50 ± 0.71" in printed


def test_defaults_are_the_issue_settings(fake_train, tmp_path):
    main(["experiment", "balance", "--out", str(tmp_path / "d"), "--no-progress"])
    arms = by_arm(fake_train)
    assert {c.bias_update_rate for c in arms["aux_free"]} == {1e-2}
    assert {c.aux_loss_alpha for c in arms["aux_loss"]} == {1e-3}
    assert all(c.max_steps == 100 for c in fake_train.configs)
    assert all(len(cfgs) >= 2 for cfgs in arms.values())
    assert all(c.save_every == 0 and c.sample_tokens == 0 and c.mtp_depth == 0 for c in fake_train.configs)


def test_gamma_sweep_runs_aux_free_at_each_gamma(fake_train, tmp_path):
    out = tmp_path / "sweep"
    main(["experiment", "balance", "--out", str(out), "--gamma-sweep", "1e-3,3e-2", "--arms", "aux_free,none",
          "--seeds", "0", "--max-steps", "4", "--no-progress"])
    arms = by_arm(fake_train)
    assert set(arms) == {"aux_free_gamma=0.001", "aux_free_gamma=0.03", "none"}
    assert [c.bias_update_rate for c in arms["aux_free_gamma=0.001"]] == [1e-3]
    assert [c.bias_update_rate for c in arms["aux_free_gamma=0.03"]] == [3e-2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["arms"]["aux_free_gamma=0.03"]["settings"]["bias_update_rate"] == 3e-2
    assert (out / "gamma_sweep.png").stat().st_size > 0 and (out / "balance.png").stat().st_size > 0
    assert "aux_free_gamma=0.001" in (out / "balance_results.md").read_text()


@pytest.mark.parametrize("argv", [["--seeds", "a,b"], ["--arms", "aux_free,bogus"], ["--gamma-sweep", "0,1e-2"],
                                  ["--bias-update-rate", "-1"], ["--max-steps", "0"]])
def test_bad_flags_are_usage_errors(fake_train, tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "balance", "--out", str(tmp_path / "x"), *argv])
    assert e.value.code == 2
    assert fake_train.configs == []


def test_no_train_flag_is_silently_replaced(fake_train, tmp_path):
    # TrainConfig's own --seed is not offered (the arms set the seed from --seeds); what argparse makes of
    # "--seed" must still reach the runs, never be dropped (an ignored flag is what issue 17 fixed)
    main(["experiment", "balance", "--out", str(tmp_path / "s"), "--seed", "5", "--no-progress"])
    assert {c.seed for c in fake_train.configs} == {5}


def test_inconsistent_settings_are_user_errors(fake_train, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "balance", "--out", str(tmp_path / "x"), "--arms", "none", "--gamma-sweep", "1e-2"])
    assert e.value.code == 2 and "gamma_sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["experiment", "balance", "--out", str(tmp_path / "x"), "--seeds", "1,1"])
    assert fake_train.configs == []


def test_late_steps_is_the_last_quarter():
    assert [EB.late_steps(n) for n in (1, 2, 4, 8, 100, 101)] == [1, 1, 1, 2, 25, 26]


def test_config_fields_have_help():
    # the CLI is generated from these fields; each knob declares its help once
    import dataclasses
    for f in dataclasses.fields(EB.BalanceExperimentConfig):
        assert f.metadata.get("help"), f.name


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return source_corpus(tmp_path_factory.mktemp("corpus"),
                         ("argparse", "collections", "textwrap", "inspect", "json", "statistics"))


def test_smoke_run_summary_structure(corpus, tmp_path):
    out = tmp_path / "real"
    argv = ["experiment", "balance", "--out", str(out), "--data", str(corpus), "--max-steps", "2", "--seeds", "0,1",
            "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--eval-every", "0", "--vocab-size", "300",
            "--tokenizer-train-mb", "0.05", "--val-fraction", "0.1", "--mtp-depth", "0", "--device", "cpu",
            "--no-progress"]
    for k, v in SMALL_MODEL.items():
        argv += ["--model-set", f"{k}={v}"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"arms"}
    assert set(summary["arms"]) == {"aux_free", "aux_loss", "none"}
    for name, arm in summary["arms"].items():
        assert set(arm) == {"val_ppl", "maxvio_global", "maxvio_batch_late", "settings"}
        for m in ("val_ppl", "maxvio_global", "maxvio_batch_late"):
            assert set(arm[m]) == {"mean", "std"}
            assert math.isfinite(arm[m]["mean"]) and arm[m]["std"] >= 0, (name, m)
        assert arm["settings"]["seeds"] == [0, 1] and arm["settings"]["max_steps"] == 2
        for seed in (0, 1):
            run = out / name / f"seed{seed}"
            assert (run / "summary.json").exists()
            steps = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
            assert max(r["step"] for r in steps) == 2
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs) == 6
    # the summary's means are the means of the per-run values
    free = [r["maxvio_global"] for r in runs if r["arm"] == "aux_free"]
    assert summary["arms"]["aux_free"]["maxvio_global"]["mean"] == pytest.approx(statistics.fmean(free))
    assert (out / "balance.png").stat().st_size > 0
    assert "MaxVio_global" in (out / "balance_results.md").read_text()
