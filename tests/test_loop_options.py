"""The one loop's shared knobs (dsv3.train.loop.LoopOptions) in SFT and GRPO: TensorBoard event files
that hold what metrics.jsonl holds (also across a resume), a clear error at start without the
tensorboard package, ``--fp8`` SFT, ``--compile`` through the same wrapper for SFT and GRPO, and
GRPO's ``steps`` -> ``max_steps`` rename (old checkpoints resume)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import TRAIN_MODEL, source_corpus
from post_fixtures import tiny_chat_model

from dsv3.post.grpo import GRPOConfig, GRPOError, grpo
from dsv3.post.sft import SFTConfig, SFTError, sft
from dsv3.tasks import Arithmetic, problems
from dsv3.train import loop
from dsv3.train.state import read_trainer_state, state_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop_options")
    path, tok = tiny_chat_model(root / "base")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(p.sft_record()) + "\n" for p in problems(Arithmetic(max_value=9), 30, 0)))
    return path, data


def sft_config(setup, out, **over) -> SFTConfig:
    path, data = setup
    base = dict(model=str(path), data=[str(data)], out=str(out), max_steps=3, batch_size=4, seq_len=64, lr=3e-3,
                warmup_steps=0, save_every=2, eval_every=2, val_fraction=0.1, progress=False)
    return SFTConfig(**{**base, **over})


def grpo_config(setup, out, **over) -> GRPOConfig:
    path, _ = setup
    base = dict(model=str(path), task="arithmetic", out=str(out), max_steps=2, prompts_per_step=2, group_size=3,
                max_new_tokens=4, lr=1e-3, seed=3, save_every=1, eval_problems=2, eval_every=1, progress=False)
    return GRPOConfig(**{**base, **over})


def records(out) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def expected_scalars(recs: list[dict]) -> dict[str, dict[int, float]]:
    """What the event files must hold, read off metrics.jsonl: each number of a record (and each
    element of a flat list of numbers) under train/KEY or eval/KEY, by step."""
    want: dict[str, dict[int, float]] = {}
    for r in recs:
        prefix = "eval/" if r.get("kind") == "eval" else "train/"
        for k, v in r.items():
            if k in ("step", "kind") or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                want.setdefault(prefix + k, {})[r["step"]] = float(v)
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                for i, x in enumerate(v):
                    want.setdefault(f"{prefix}{k}/{i}", {})[r["step"]] = float(x)
    return want


def event_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})   # 0: keep every event
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for tag, by_step in want.items():
        assert set(got[tag]) == set(by_step), tag
        for step, v in by_step.items():   # event files store float32
            assert got[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-30), (tag, step)


# ---------------------------------------------------------------------- TensorBoard
def test_tensorboard_events_hold_the_metrics_also_after_a_resume(setup, tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    sft(sft_config(setup, tmp_path / "a", tensorboard=True), log=lambda *a: None)
    recs = records(tmp_path / "a")
    want = expected_scalars(recs)
    # the scalars the issue names are there (MoE balance stats too), not just whatever was logged
    for tag in ("train/loss", "train/lm_loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/maxvio_batch_mean", "eval/val_loss", "eval/maxvio_global"):
        assert tag in want, tag
    assert len(want["train/loss"]) == 3 and sorted(want["eval/val_loss"]) == [2, 3]
    assert_same(event_scalars(tmp_path / "a" / "tensorboard"), want)

    # interrupted after checkpoint-2 (step 3's events are in its old event file) and resumed: the old
    # file's step-3 events are purged, so the event files agree with the resumed metrics.jsonl
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    sft(SFTConfig(out=str(tmp_path / "b"), progress=False, tensorboard=True), resume=True, log=lambda *a: None)
    assert len(list((tmp_path / "b" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    resumed = records(tmp_path / "b")
    assert [r["step"] for r in resumed] == [r["step"] for r in recs]
    assert_same(event_scalars(tmp_path / "b" / "tensorboard"), expected_scalars(resumed))

    # a fresh run in the same directory starts the event files over
    sft(sft_config(setup, tmp_path / "a", max_steps=1, tensorboard=True), log=lambda *a: None)
    assert len(list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert_same(event_scalars(tmp_path / "a" / "tensorboard"), expected_scalars(records(tmp_path / "a")))


def test_pretraining_writes_tensorboard_with_per_layer_stats(tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    from dsv3.train.trainer import TrainConfig, train
    source_corpus(tmp_path / "corpus", ("textwrap", "inspect"), chunk=3000)
    model = dict(TRAIN_MODEL, num_hidden_layers=3, n_routed_experts=4, n_group=1, topk_group=1)
    train(TrainConfig(data=[str(tmp_path / "corpus")], out=str(tmp_path / "pt"), max_steps=3, batch_size=2, seq_len=32,
                      save_every=0, eval_every=2, eval_batches=1, vocab_size=300, tokenizer_train_mb=0.05,
                      val_fraction=0.2, progress=False, sample_tokens=0, model_overrides=model, device="cpu",
                      tensorboard=True), log=lambda *a: None)
    recs = records(tmp_path / "pt")
    want = expected_scalars(recs)
    # two MoE layers: MaxVio per layer as key/0, key/1; the [layers, experts] load matrix is no scalar
    assert {"train/maxvio_batch/0", "train/maxvio_batch/1", "eval/maxvio_global_per_layer/1",
            "train/tokens_per_s", "train/mtp_loss", "eval/val_ppl"} <= set(want)
    assert "eval/expert_load" not in want and not any(t.startswith("eval/expert_load/") for t in want)
    assert_same(event_scalars(tmp_path / "pt" / "tensorboard"), want)


def test_grpo_writes_tensorboard_too(setup, tmp_path, one_thread):
    pytest.importorskip("tensorboard")
    grpo(grpo_config(setup, tmp_path / "g", max_steps=1, tensorboard=True, save_every=0), log=lambda *a: None)
    want = expected_scalars(records(tmp_path / "g"))
    assert {"train/reward_mean", "train/kl", "train/grad_norm", "eval/accuracy"} <= set(want)
    assert_same(event_scalars(tmp_path / "g" / "tensorboard"), want)


def test_tensorboard_missing_is_an_error_at_start(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "tensorboard_writer_class", lambda: None)   # as without the package
    with pytest.raises(SFTError, match="--tensorboard needs the tensorboard package"):
        sft(sft_config(setup, tmp_path / "s", tensorboard=True), log=lambda *a: None)
    with pytest.raises(GRPOError, match="pip install tensorboard"):
        grpo(grpo_config(setup, tmp_path / "g", tensorboard=True), log=lambda *a: None)
    assert not (tmp_path / "s" / "metrics.jsonl").exists() and not (tmp_path / "g" / "metrics.jsonl").exists()


def test_tensorboard_import_check_matches_the_package():
    try:
        import tensorboard  # noqa: F401
        have = True
    except ImportError:
        have = False
    assert (loop.tensorboard_writer_class() is not None) == have


# ---------------------------------------------------------------------- --fp8 and --compile
def test_fp8_sft_runs_with_fp8_gemms(setup, tmp_path, monkeypatch, one_thread):
    from dsv3.train import fp8
    converted = []
    original = fp8.apply_fp8_training
    monkeypatch.setattr(fp8, "apply_fp8_training", lambda m, c=None: converted.extend(original(m, c)) or converted)
    sft(sft_config(setup, tmp_path / "ref", save_every=0), log=lambda *a: None)
    s = sft(sft_config(setup, tmp_path / "fp8", fp8=True, fp8_block=16, save_every=0), log=lambda *a: None)
    assert converted, "--fp8 converted no layer"
    ref, got = records(tmp_path / "ref"), records(tmp_path / "fp8")
    train_ref = [r for r in ref if "kind" not in r]
    train_got = [r for r in got if "kind" not in r]
    assert len(train_got) == 3 and all("skipped" not in r for r in train_got)
    # E4M3 GEMMs: the same run within a few percent, and not the fp32 run itself
    for a, b in zip(train_ref, train_got):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=0.05)
    assert any(a["lm_loss"] != b["lm_loss"] for a, b in zip(train_ref, train_got))
    assert s["val_loss"] is not None
    assert read_trainer_state(tmp_path / "fp8" / "final")["sft_config"]["fp8"] is True


def test_compile_goes_through_the_same_wrapper_for_sft_and_grpo(setup, tmp_path, monkeypatch, one_thread):
    from dsv3.train import compile as train_compile
    calls = []
    original = train_compile.compile_model

    def spy(model, **kwargs):
        calls.append((type(model).__name__, kwargs))
        return original(model, **{**kwargs, "backend": "eager"})   # dynamo without inductor: fast, same math

    monkeypatch.setattr(train_compile, "compile_model", spy)
    sft(sft_config(setup, tmp_path / "s0", max_steps=1, save_every=0, eval_every=0), log=lambda *a: None)
    sft(sft_config(setup, tmp_path / "s1", max_steps=1, save_every=0, eval_every=0, compile=True), log=lambda *a: None)
    grpo(grpo_config(setup, tmp_path / "g0", max_steps=1, save_every=0, eval_problems=0), log=lambda *a: None)
    grpo(grpo_config(setup, tmp_path / "g1", max_steps=1, save_every=0, eval_problems=0, compile=True),
         log=lambda *a: None)
    assert calls == [("Transformer", {}), ("Transformer", {"dynamic": None})]
    for a, b, key in (("s0", "s1", "lm_loss"), ("g0", "g1", "loss")):
        ra, rb = records(tmp_path / a)[0], records(tmp_path / b)[0]
        assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (a, b)
    with pytest.raises(SFTError, match="--compile is supported in a single process without --fp8"):
        sft(sft_config(setup, tmp_path / "s2", compile=True, fp8=True), log=lambda *a: None)


# ---------------------------------------------------------------------- steps -> max_steps
def test_grpo_steps_is_max_steps_and_old_checkpoints_resume(setup, tmp_path, one_thread):
    with pytest.warns(DeprecationWarning, match="max_steps"):
        old = grpo_config(setup, tmp_path / "x", steps=5)
    assert old == grpo_config(setup, tmp_path / "x", max_steps=5)
    assert "steps" not in {f.name for f in dataclasses.fields(GRPOConfig)}
    assert dataclasses.replace(old, lr=0.5).max_steps == 5      # replace() keeps the budget

    grpo(grpo_config(setup, tmp_path / "a", eval_problems=0), log=lambda *a: None)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    # checkpoint-1 as a run from before the rename wrote it: its config says steps, not max_steps
    state_file = state_dir(tmp_path / "b" / "checkpoint-1") / "trainer_state.json"
    state = json.loads(state_file.read_text())
    cfg = state["grpo_config"]
    cfg["steps"] = cfg.pop("max_steps")
    for name in ("fp8", "fp8_block", "compile", "tensorboard"):   # knobs it did not have yet
        cfg.pop(name)
    state_file.write_text(json.dumps(state))
    s = grpo(GRPOConfig(out=str(tmp_path / "b"), progress=False), resume=True, log=lambda *a: None)
    assert s["steps"] == 2
    pick = [(r["step"], r["reward_mean"], r["loss"]) for r in records(tmp_path / "a")]
    assert [(r["step"], r["reward_mean"], r["loss"]) for r in records(tmp_path / "b")] == pick
    assert read_trainer_state(tmp_path / "b" / "final")["grpo_config"]["max_steps"] == 2
    # and a resumed run's budget is extended by max_steps
    s = grpo(GRPOConfig(out=str(tmp_path / "b"), progress=False), resume=True, max_steps=3, log=lambda *a: None)
    assert s["steps"] == 3 and [r["step"] for r in records(tmp_path / "b")] == [1, 2, 3]


def test_grpo_prompts_must_split_over_the_ranks(setup, tmp_path, monkeypatch):
    class TwoRanks(loop.SingleProcess):
        rank, world_size = 0, 2
    monkeypatch.setattr("dsv3.post.grpo.runner_from_env", lambda device=None: TwoRanks(torch.device("cpu")))
    with pytest.raises(GRPOError, match="--prompts-per-step 3 is split over the ranks"):
        grpo(grpo_config(setup, tmp_path / "g", prompts_per_step=3), log=lambda *a: None)
