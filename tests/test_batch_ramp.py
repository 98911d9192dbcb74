"""The batch-size ramp (--batch-ramp START:TOKENS): its sizes (worked by hand), the trainer following
them (data consumed = sum of the sizes), and a resume in the middle of the ramp equal to the
uninterrupted run bit for bit."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import TRAIN_MODEL, gloo_group, source_corpus

from dsv3.train.batch_ramp import BatchRamp, batch_ramp_spec
from dsv3.train.state import read_trainer_state
from dsv3.train.trainer import TrainConfig, TrainError, train


def test_parse():
    assert BatchRamp.parse("2:1000") == BatchRamp(2, 1000)
    assert BatchRamp.parse("3072:469B") == BatchRamp(3072, 469 * 10**9)
    assert BatchRamp.parse(" 4 : 1.5M ") == BatchRamp(4, 1_500_000)
    assert BatchRamp.parse("1:2e4") == BatchRamp(1, 20_000)
    assert BatchRamp.parse("2:1M:4") == BatchRamp(2, 10**6, 4)
    for bad in ("x", "5", "0:10", "2:0", "2:-5", "2:10Q", "2:10:0", "2:10:x"):
        with pytest.raises(ValueError, match="batch ramp"):
            BatchRamp.parse(bad)
    import argparse
    with pytest.raises(argparse.ArgumentTypeError):
        batch_ramp_spec("2")
    assert batch_ramp_spec("2:1k") == "2:1k"


def test_sizes_worked_by_hand():
    # start 2, final 8, ramp over 64 tokens, 4 tokens per sequence:
    # tokens seen 0, 8, 16, 28, 44, 68 -> 2 + 6 * seen / 64 = 2, 2.75, 3.5, 4.625, 6.125, (>= 64) 8
    assert BatchRamp(2, 64).sizes(8, 4, 7) == [2, 2, 3, 4, 6, 8, 8]
    # in multiples of 2 (two ranks): seen 0, 8, 16, 24, 40, 56, 80 -> 2, 2.75, 3.5, 4.25, 5.75, 7.25, 8
    assert BatchRamp(2, 64).sizes(8, 4, 7, granule=2) == [2, 2, 2, 4, 4, 6, 8]
    # a start below one granule starts at the granule
    assert BatchRamp(1, 64).sizes(8, 4, 2, granule=4)[0] == 4
    # a ramp already done by the start (TOKENS smaller than the first step) still starts at START
    assert BatchRamp(3, 1).sizes(8, 100, 3) == [3, 8, 8]
    with pytest.raises(ValueError, match="above --batch-size"):
        BatchRamp(9, 64).sizes(8, 4, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        BatchRamp(2, 64).sizes(6, 4, 3, granule=4)
    # a fixed multiple gives the same sizes at any number of ranks it is a multiple of
    assert BatchRamp(2, 64, 2).sizes(8, 4, 7) == BatchRamp(2, 64, 2).sizes(8, 4, 7, granule=2) == [2, 2, 2, 4, 4, 6, 8]
    with pytest.raises(ValueError, match="not a multiple of the 4 ranks"):
        BatchRamp(2, 64, 2).sizes(8, 4, 7, granule=4)


def test_sizes_properties():
    sizes = BatchRamp(16, 10**6).sizes(256, 512, 400, granule=8)
    assert sizes == sorted(sizes) and all(s % 8 == 0 and 16 <= s <= 256 for s in sizes)
    seen = [0]
    for s in sizes:
        seen.append(seen[-1] + s * 512)
    first_full = next(i for i, t in enumerate(seen) if t >= 10**6)
    assert all(s == 256 for s in sizes[first_full:]) and all(s < 256 for s in sizes[:first_full])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return source_corpus(tmp_path_factory.mktemp("corpus"), ("argparse", "collections", "json", "textwrap", "inspect"))


def ramp_run(corpus: Path, out: Path, **over) -> TrainConfig:
    base = dict(data=[str(corpus)], out=str(out), max_steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2,
                save_every=4, eval_every=0, eval_batches=1, vocab_size=400, tokenizer_train_mb=0.2,
                val_fraction=0.1, progress=False, sample_tokens=0, model_overrides=dict(TRAIN_MODEL), device="cpu",
                batch_ramp="1:256")
    base.update(over)
    return TrainConfig(**base)


def metrics(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "kind" not in r]


@pytest.fixture(scope="module")
def ramped(corpus, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("ramped")
    train(ramp_run(corpus, out), log=lambda *a: None)
    return out


def test_trainer_follows_the_ramp(ramped):
    # 1 + 3 * seen / 256 with 32 tokens a sequence: seen 0, 32, 64, 96, 160, 224, 320 -> 1, 1, 1, 2, 2, 3, 4, 4
    expected = [1, 1, 1, 2, 2, 3, 4, 4]
    recs = metrics(ramped)
    assert [r["batch_size"] for r in recs] == expected
    state = read_trainer_state(ramped / "final")
    data = state["data"]
    assert data["epoch"] * data["num_windows"] + data["position"] == sum(expected)  # windows consumed
    # the LR schedule is per step: warmup 2 steps, as without a ramp
    assert recs[0]["lr"] == pytest.approx(0.5e-2) and recs[1]["lr"] == pytest.approx(1e-2)


def test_resume_mid_ramp_is_bit_exact(ramped, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(ramped, copy)
    shutil.rmtree(copy / "final")  # resumes from checkpoint-4, in the middle of the ramp
    train(TrainConfig(out=str(copy), progress=False), resume=True, log=lambda *a: None)
    a, b = metrics(ramped), metrics(copy)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "mtp_loss", "grad_norm", "lr", "batch_size"):
            assert ra[k] == rb[k], (ra["step"], k)


def test_bad_ramp_is_a_train_error(corpus, tmp_path):
    with pytest.raises(TrainError, match="above --batch-size"):
        train(ramp_run(corpus, tmp_path, batch_ramp="8:256", max_steps=1), log=lambda *a: None)


def _ramp_worker(rank: int, corpus: str, tmp: str) -> None:
    with gloo_group(rank, 2, tmp):
        train(ramp_run(Path(corpus), Path(tmp) / "two", max_steps=6, batch_ramp="2:256:2", save_every=0,
                       cache_dir=str(Path(tmp) / "single")), log=lambda *a: None)


def test_ramp_at_two_ranks_equals_one_process(corpus, tmp_path, one_thread):
    """With a fixed multiple (2) the ramp gives one process and 2 gloo ranks (FSDP2) the same sizes and losses."""
    import torch.multiprocessing as mp
    train(ramp_run(corpus, tmp_path / "single", max_steps=6, batch_ramp="2:256:2", save_every=0),
          log=lambda *a: None)
    mp.spawn(_ramp_worker, args=(str(corpus), str(tmp_path)), nprocs=2, join=True)
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "two")
    # 2 + 2 * seen / 256 with 32 tokens a sequence, in multiples of 2: seen 0, 64, 128, 192, 256 -> 2, 2, 2, 2, 4
    assert [r["batch_size"] for r in a] == [r["batch_size"] for r in b] == [2, 2, 2, 2, 4, 4]
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5, ra["step"]
