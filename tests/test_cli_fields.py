"""Every knob of a config dataclass is a ``dsv3`` flag: reachable, spelled by its field name, and
listed in ``--help`` with its default. Also the dataclass -> argparse helper on its own, and the
CLI package's layout rules (one registration mechanism, no feature package importing the CLI)."""

import argparse
import dataclasses
import pathlib
import re
import types
import typing
from dataclasses import dataclass, field

import pytest

import dsv3.cli
from dsv3.cli import build_parser, main
from dsv3.cli.fields import add_dataclass_args, from_args
from dsv3.cli.serve import limits_of
from dsv3.cli.train import train_config_from_args
from dsv3.knobs import knob
from dsv3.post.demo import DemoConfig
from dsv3.post.grpo import GRPOConfig
from dsv3.post.sft import SFTConfig
from dsv3.serve.limits import Limits
from dsv3.train import experiment_balance
from dsv3.train.trainer import TrainConfig

SRC = pathlib.Path(dsv3.__file__).parent


def build_train(args):
    return train_config_from_args(args)


# The TrainConfig fields the balance experiment's arms set themselves (its own dataclass has those flags).
ARM_FIELDS = tuple(getattr(experiment_balance, "ARM_FIELDS", ()))
ARMS = {name: None for name in ARM_FIELDS}

# (command, dataclass, the arguments a parse needs besides the knob, build the config from the namespace,
#  fields given another flag than their own: name -> (argv, expected value), or None: no flag here)
# TrainConfig knobs whose values have a syntax of their own: a valid value each
TRAIN_VALUES = {"batch_ramp": (["--batch-ramp", "2:1000"], "2:1000"),
                "bias_update_schedule": (["--bias-update-schedule", "0.02:10,0.005:30"], "0.02:10,0.005:30")}

COMMANDS = [
    (["train"], TrainConfig, [], build_train,
     {"model_overrides": (["--model-set", "hidden_size=96", "--model-set", "topk_method=greedy"],
                          {"hidden_size": 96, "topk_method": "greedy"}), **TRAIN_VALUES}),
    (["experiment", "balance"], TrainConfig, [], build_train,
     {"model_overrides": (["--model-set", "n_routed_experts=4"], {"n_routed_experts": 4}), **TRAIN_VALUES, **ARMS}),
    (["experiment", "fp8"], TrainConfig, [], build_train,
     {"model_overrides": (["--model-set", "n_routed_experts=4"], {"n_routed_experts": 4}), **TRAIN_VALUES}),
    (["sft"], SFTConfig, [], lambda a: from_args(SFTConfig, a), {}),
    (["grpo"], GRPOConfig, [], lambda a: from_args(GRPOConfig, a), {}),
    (["experiment", "post-train"], DemoConfig, [], lambda a: from_args(DemoConfig, a), {}),
    (["serve"], Limits, ["--model", "m"], limits_of, {}),
]


def flag_of(f: dataclasses.Field) -> str:
    """The documented spelling: --field-name; a True-by-default switch is --no-field-name."""
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def other_value(f: dataclasses.Field, kind):
    """A valid value different from the field's default, and its command-line form."""
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
        origin = typing.get_origin(kind)
    if kind is bool:
        return (not default), []
    if origin is list:
        return ["a.jsonl", "b.jsonl"], ["a.jsonl", "b.jsonl"]
    if kind is int:
        value = 3 if default is None else default + 1
    elif kind is float:
        value = default / 2 if default else 0.5
    elif "choices" in f.metadata:
        value = next(c for c in f.metadata["choices"] if c != default)
    else:
        value = f"x-{f.name}"
    return value, [str(value)]


@pytest.mark.parametrize("command,cls,base,build,explicit", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_every_field_is_reachable_from_the_cli(command, cls, base, build, explicit):
    parser = build_parser()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in explicit and explicit[f.name] is None:
            continue
        if f.name in explicit:
            argv, expected = explicit[f.name]
        else:
            expected, values = other_value(f, hints[f.name])
            argv = [flag_of(f), *values]
        cfg = build(parser.parse_args([*command, *base, *argv]))
        assert getattr(cfg, f.name) == expected, (f.name, argv)
    # And no flags at all give the dataclass's own defaults (but for the experiments' own run lengths).
    if command[0] != "experiment" or cls is DemoConfig:
        assert build(parser.parse_args([*command, *base])) == cls()


def help_blocks(capsys, monkeypatch, argv) -> dict[str, str]:
    """`dsv3 ... --help` as {option: its help text}, one line each (a very wide terminal)."""
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    blocks: dict[str, str] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"  (-[-\w]+)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


HELP_CASES = [c[:3] + (c[4],) for c in COMMANDS]
if hasattr(experiment_balance, "BalanceExperimentConfig"):
    HELP_CASES.append((["experiment", "balance"], experiment_balance.BalanceExperimentConfig, [], {}))


@pytest.mark.parametrize("command,cls,base,explicit", HELP_CASES, ids=[f"{' '.join(c[0])}-{c[1].__name__}"
                                                                       for c in HELP_CASES])
def test_help_lists_every_field_with_its_default(capsys, monkeypatch, command, cls, base, explicit):
    blocks = help_blocks(capsys, monkeypatch, command)
    # The default each flag has on this command line (the experiments shorten their runs).
    parsed = build_parser().parse_args([*command, *base])
    for f in dataclasses.fields(cls):
        if f.name in explicit and explicit[f.name] is None:
            continue  # the command's own dataclass offers it (its case below)
        if f.name == "model_overrides":
            assert "--model-set" in blocks
            continue
        flag = flag_of(f)
        assert flag in blocks, f"{flag} missing from `dsv3 {' '.join(command)} --help`"
        text = blocks[flag]
        default = getattr(parsed, f.name)
        if isinstance(default, bool):
            # a switch shows the setting it controls when not given (--no-X: on), never argparse's
            # raw False; a help text may show the setting itself instead (%(default)s)
            state = ("on" if default else "off") if f.default is False else f"{f.name.replace('_', ' ')} on"
            assert f"(default: {state})" in text or f": {default})" in text, text
            assert "(default: False)" not in text, text
        elif default is not None:
            assert f"(default: {default})" in text, text
        elif f.default not in (None, dataclasses.MISSING):
            # not given = the run's own value (resume): the help names the dataclass default or says required
            assert f"(default: {f.default})" in text or "(required unless --resume)" in text, text
        else:
            assert "default" in text or "required" in text, text


def test_no_flag_of_the_old_cli_disappeared():
    # Spellings users and scripts rely on (from before the CLI was generated), with a value each.
    parser = build_parser()
    train = ["--preset", "tiny", "--data", "a", "--out", "o", "--resume", "r", "--max-steps", "2", "--batch-size", "2",
             "--seq-len", "8", "--grad-accum", "2", "--lr", "0.1", "--warmup-steps", "1", "--decay-start", "0.5",
             "--min-lr-ratio", "0.5", "--weight-decay", "0", "--grad-clip", "1", "--seed", "1", "--save-every", "1",
             "--eval-every", "1", "--eval-batches", "1", "--keep-checkpoints", "1", "--bias-update-rate", "0",
             "--seq-aux-alpha", "0", "--aux-loss-alpha", "0", "--mtp-depth", "0", "--mtp-weight", "0",
             "--fim-rate", "0", "--vocab-size", "300", "--val-fraction", "0.1", "--tokenizer-train-mb", "1",
             "--model-set", "a=1", "--max-nonfinite", "1", "--device", "cpu", "--fp8", "--fp8-block", "32",
             "--no-progress", "--compile", "--no-fused-ce", "--ep", "1"]
    args = parser.parse_args(["train", *train])
    assert (args.progress, args.fused_ce, args.fp8, args.compile, args.resume) == (False, False, True, True, "r")
    parser.parse_args(["sft", "--model", "m", "--data", "d", "--out", "o", "--resume", "r", "--max-steps", "1",
                       "--epochs", "1", "--batch-size", "1", "--seq-len", "8", "--lr", "0", "--warmup-steps", "0",
                       "--min-lr-ratio", "0", "--weight-decay", "0", "--grad-clip", "0", "--val-fraction", "0",
                       "--mtp-weight", "0", "--distill-weight", "0", "--bias-update-rate", "0", "--seed", "0",
                       "--save-every", "0", "--eval-every", "0", "--device", "cpu", "--no-progress"])
    parser.parse_args(["grpo", "--model", "m", "--task", "sort", "--prompts", "p", "--out", "o", "--resume", "r",
                       "--steps", "1", "--prompts-per-step", "1", "--group-size", "2", "--max-new-tokens", "1",
                       "--temperature", "0", "--top-p", "1", "--lr", "0", "--warmup-steps", "0", "--clip-eps", "0",
                       "--kl-beta", "0", "--inner-steps", "1", "--micro-batch", "1", "--seed", "0", "--save-every",
                       "0", "--eval-every", "0", "--eval-problems", "0", "--device", "cpu", "--no-progress"])
    parser.parse_args(["experiment", "post-train", "--base", "b", "--out", "o", "--task", "sort", "--sft-examples",
                       "1", "--sft-steps", "1", "--sft-lr", "0", "--grpo-steps", "1", "--grpo-prompts", "1",
                       "--grpo-group", "2", "--grpo-lr", "0", "--eval-problems", "1", "--seed", "0", "--device",
                       "cpu", "--no-progress"])


def test_bad_values_are_usage_errors(capsys):
    for argv, name in ((["train", "--batch-size", "0"], "--batch-size"), (["sft", "--lr", "-1"], "--lr"),
                       (["grpo", "--top-p", "1.5"], "--top-p"), (["train", "--preset", "nope"], "--preset"),
                       (["serve", "--model", "m", "--body-timeout", "0"], "--body-timeout")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert name in capsys.readouterr().err


# ---------------------------------------------------------------------- the helper on its own
@dataclass
class Knobs:
    count: int = knob(3, "how many")
    ratio: float | None = knob(None, "a ratio (default: {default})")
    name: str = knob("a", "a name", choices=["a", "b"])
    paths: list[str] = knob(default_factory=list, help="some paths", metavar="P")
    fast: bool = knob(False, "go fast")
    check: bool = knob(True, "skip the check")
    budget: int = knob(10, "a budget (default: {default})")
    extra: dict = field(default_factory=dict)


def test_helper_spellings_defaults_and_round_trip():
    p = argparse.ArgumentParser()
    added = add_dataclass_args(p, Knobs, exclude={"extra"}, defaults_override={"budget": None})
    assert added == ["count", "ratio", "name", "paths", "fast", "check", "budget"]
    assert from_args(Knobs, p.parse_args([])) == Knobs()
    args = p.parse_args(["--count", "4", "--ratio", "0.5", "--name", "b", "--paths", "x", "y", "--fast",
                         "--no-check", "--budget", "7"])
    assert from_args(Knobs, args, extra={"k": 1}) == Knobs(4, 0.5, "b", ["x", "y"], True, False, 7, {"k": 1})
    helps = {a.dest: a.help for a in p._actions}
    assert helps["budget"] == "a budget (default: 10)"        # the flag defaults to None: the field's default
    assert helps["ratio"] == "a ratio (default: None)"
    # Without the override argparse shows the default, once.
    q = argparse.ArgumentParser(formatter_class=dsv3.cli.common.HelpFormatter)
    add_dataclass_args(q, Knobs, exclude={"extra"})
    text = " ".join(q.format_help().split())
    assert "a budget (default: 10)" in text and "(default: 10) (default" not in text
    assert "skip the check (default: check on)" in text and "go fast (default: off)" in text
    with pytest.raises(SystemExit):
        p.parse_args(["--name", "c"])


def test_helper_refuses_fields_it_cannot_offer():
    @dataclass
    class Undocumented:
        size: int = 1

    with pytest.raises(TypeError, match="Undocumented.size has no help text"):
        add_dataclass_args(argparse.ArgumentParser(), Undocumented)
    with pytest.raises(TypeError, match="Knobs.extra"):
        add_dataclass_args(argparse.ArgumentParser(), Knobs)
    with pytest.raises(ValueError, match="no field"):
        add_dataclass_args(argparse.ArgumentParser(), Knobs, exclude={"extra", "nope"})


# ---------------------------------------------------------------------- layout
def test_every_command_group_registers_the_same_way():
    modules = {p.stem for p in (SRC / "cli").glob("*.py")} - {"__init__", "common", "fields"}
    assert modules == set(dsv3.cli.COMMAND_GROUPS)
    import importlib
    for name in dsv3.cli.COMMAND_GROUPS:
        assert callable(importlib.import_module(f"dsv3.cli.{name}").register)


def test_no_feature_package_imports_the_cli():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.parent.name == "cli" and path.parent.parent == SRC:
            continue
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(from\s+(\.+|dsv3\.)cli\b|import\s+dsv3\.cli\b|from\s+\.+\s+import\s+cli\b)", text, re.M):
            offenders.append(str(path.relative_to(SRC)))
    assert offenders == ["__main__.py"]  # python -m dsv3 is the CLI's own entry point


# ---------------------------------------------------------------------- switches' defaults, old spellings
def test_help_shows_what_a_switch_does_and_the_effective_default(capsys, monkeypatch):
    blocks = help_blocks(capsys, monkeypatch, ["sft"])
    assert blocks["--no-progress"].endswith("no live progress bar (default: progress on)")  # on unless given
    assert blocks["--compile"].endswith("(default: off)") and blocks["--tensorboard"].endswith("(default: off)")
    for command in (["train"], ["sft"], ["grpo"], ["serve", "--model", "m"], ["distill"]):
        for flag, text in help_blocks(capsys, monkeypatch, command[:1]).items():
            assert "(default: False)" not in text and "(default: True)" not in text, (command, flag, text)
    # every value flag shows its default too
    for flag, text in help_blocks(capsys, monkeypatch, ["grpo"]).items():
        assert "default" in text or "required" in text or flag in ("-h", "--resume"), (flag, text)


def test_a_deprecated_alias_parses_like_the_flag_and_warns(capsys, monkeypatch):
    parser = build_parser()
    new = parser.parse_args(["grpo", "--max-steps", "7"])
    assert capsys.readouterr().err == ""
    old = parser.parse_args(["grpo", "--steps", "7"])
    assert "--steps is deprecated, use --max-steps" in capsys.readouterr().err
    assert from_args(GRPOConfig, old) == from_args(GRPOConfig, new) == GRPOConfig(max_steps=7)
    assert parser.parse_args(["grpo"]).max_steps is None       # not given: a resumed run keeps its budget
    with pytest.raises(SystemExit):
        parser.parse_args(["grpo", "--steps", "0"])           # the alias has the flag's value check
    blocks = help_blocks(capsys, monkeypatch, ["grpo"])
    assert "--steps" not in blocks and "(--steps: deprecated spelling)" in blocks["--max-steps"]

    @dataclass
    class Renamed:
        fast: bool = knob(False, "go fast", aliases=("--quick",))
        size: list[int] = knob(default_factory=list, help="sizes", aliases=("--sizes", "--dims"))

    p = argparse.ArgumentParser()
    add_dataclass_args(p, Renamed)
    assert from_args(Renamed, p.parse_args(["--quick", "--dims", "1", "2"])) == Renamed(True, [1, 2])
    assert "--quick is deprecated, use --fast" in capsys.readouterr().err
    with pytest.raises(ValueError, match="aliases"):
        knob(1, "x", aliases="--x")                           # a bare string, not a tuple of flags
    with pytest.raises(ValueError, match="aliases"):
        knob(1, "x", aliases=("x",))


def test_inherited_knobs_come_after_the_commands_own():
    from dsv3.train.loop import LoopOptions
    p = argparse.ArgumentParser()
    added = add_dataclass_args(p, SFTConfig)
    shared = [f.name for f in dataclasses.fields(LoopOptions)]
    assert added[-len(shared):] == shared and added[0] == "model"
    for cls in (TrainConfig, SFTConfig, GRPOConfig):              # declared once, shared by all three
        assert issubclass(cls, LoopOptions)
        assert {f.name: f for f in dataclasses.fields(cls)}["fp8"] is {f.name: f for f in
                                                                       dataclasses.fields(LoopOptions)}["fp8"]
