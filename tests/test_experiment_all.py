"""`dsv3 experiment all`: the report's structure on a 2-step smoke run, reuse, and the claims rows."""

import json

import pytest
from conftest import source_corpus

from dsv3.cli import main
from dsv3.train.experiment_all import ORDER, claims
from dsv3.train.experiments import EXPERIMENTS


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return source_corpus(tmp_path_factory.mktemp("corpus"), ("json", "statistics", "inspect"), max_chars=40_000)


def test_every_registered_experiment_is_in_the_report_order():
    assert set(ORDER) == set(EXPERIMENTS)


def test_smoke_run_writes_one_report_and_reuses_finished_experiments(corpus, tmp_path, capsys):
    out = tmp_path / "all"
    argv = ["experiment", "all", "--out", str(out), "--data", str(corpus), "--device", "cpu", "--no-progress",
            "--smoke"]
    assert main(argv) == 0
    s = json.loads((out / "summary.json").read_text())
    assert list(s["experiments"]) == list(ORDER) and s["smoke"] is True
    assert [r["experiment"] for r in s["claims"]] == list(ORDER)
    for name, d in s["experiments"].items():
        assert d["reused"] is False and d["wall_s"] > 0
        # every file the experiment says it writes is there
        for f in EXPERIMENTS[name].outputs(EXPERIMENTS[name].config()):
            if name != "balance" or f != "gamma_sweep.png":
                assert (out / name / f).exists(), (name, f)
    # the shipped gate never flips an expert under autocast, whatever the model
    assert s["experiments"]["router"]["summary"]["arms"]["autocast_bf16"]["flipped_fraction"] == 0.0
    report = (out / "report.md").read_text()
    assert "smoke run" in report and "| experiment | claim | paper | ours |" in report
    for name in ORDER:
        assert f"## {name} (" in report
        assert EXPERIMENTS[name].format(s["experiments"][name]["summary"]) in report
    assert "![balance](balance/balance.png)" in report
    # a second run reuses all four, and --only narrows it
    assert main(argv + ["--only", "router,mtp"]) == 0
    s2 = json.loads((out / "summary.json").read_text())
    assert list(s2["experiments"]) == ["router", "mtp"]
    assert all(d["reused"] for d in s2["experiments"].values())
    # ... and keeps the wall times the first run measured
    assert [d["wall_s"] for d in s2["experiments"].values()] == [s["experiments"][n]["wall_s"] for n in ("router", "mtp")]
    assert "reusing" in capsys.readouterr().out


def test_only_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "all", "--only", "nope"])
    assert "experiments must be among" in capsys.readouterr().err


def test_claims_say_when_a_claim_is_not_shown():
    # hand-made summaries: aux-free worse than aux loss must read "not shown", not "holds"
    stat = lambda m: {"mean": m, "std": 0.0}  # noqa: E731
    done = {"balance": {"summary": {"arms": {
        "aux_free": {"maxvio_global": stat(0.9), "val_ppl": stat(100.0)},
        "aux_loss": {"maxvio_global": stat(0.5), "val_ppl": stat(100.0)}}}}}
    (row,) = claims(done)
    assert row["holds"] is False
    done["balance"]["summary"]["arms"]["aux_free"]["maxvio_global"] = stat(0.3)
    assert claims(done)[0]["holds"] is True
