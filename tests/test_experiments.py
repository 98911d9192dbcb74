"""The experiment registry (dsv3.train.experiments) and the subcommands ``dsv3 experiment`` builds from it."""

from __future__ import annotations

import dataclasses

import pytest

from dsv3.cli import build_parser
from dsv3.train import experiment_balance, experiment_fp8, experiment_mtp
from dsv3.train.experiments import EXPERIMENTS, get
from dsv3.train.trainer import TrainConfig


def test_the_registry_names_the_training_experiments():
    assert {"balance", "fp8", "mtp"} <= set(EXPERIMENTS)
    assert EXPERIMENTS["balance"].run is experiment_balance.run_balance_experiment
    assert EXPERIMENTS["fp8"].config is experiment_fp8.FP8ExperimentConfig
    assert EXPERIMENTS["mtp"].format is experiment_mtp.format_table
    with pytest.raises(KeyError, match="unknown experiment 'nope'; known: .*balance"):
        get("nope")


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_entry_is_a_subcommand_with_its_defaults_and_knobs(name):
    e = EXPERIMENTS[name]
    args = build_parser().parse_args(["experiment", name])
    assert args.func.__name__ == f"cmd_experiment_{name}"
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in e.train_defaults.items():
        if key not in e.train_exclude:
            assert getattr(args, key) == value, key
    for key in e.train_exclude:
        # an excluded training field has no flag of its own; if the knobs dataclass has a field of the
        # same name, the namespace holds that one's default
        knob_names = {f.name for f in dataclasses.fields(e.config)}
        assert key in train_fields
        if key in knob_names:
            assert getattr(args, key) == getattr(e.config(), key)
        else:
            assert not hasattr(args, key)
    for f in dataclasses.fields(e.config):
        assert hasattr(args, f.name), f.name
    base = e.base_config()
    assert base.preset == e.train_defaults.get("preset", TrainConfig().preset)
    assert e.default_out(base) == f"runs/experiment-{name}-{base.preset}"
    assert e.outputs(e.config()) and all("/" not in p for p in e.outputs(e.config()))


def test_a_missing_directory_knob_is_a_user_error(tmp_path, capsys):
    from dsv3.cli import main
    with pytest.raises(SystemExit) as err:
        main(["experiment", "mtp", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert err.value.code == 2
    assert "--model" in capsys.readouterr().err
