"""The one training loop (dsv3.train.loop): the single-process runner has the parallel runner's
interface, and pre-training resumes by the same rule as SFT and GRPO (a finished run extends from
``final``)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from conftest import TRAIN_MODEL, source_corpus

from dsv3.train.loop import SingleProcess, optimizer_update
from dsv3.train.parallel.training import ParallelTraining
from dsv3.train.trainer import TrainConfig, train


def _public_methods(cls) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(f) for n, f in vars(cls).items()
            if not n.startswith("_") and callable(f) and not isinstance(f, classmethod)}


def test_single_process_runner_has_the_parallel_interface():
    ours, theirs = _public_methods(SingleProcess), _public_methods(ParallelTraining)
    assert set(theirs) <= set(ours), f"SingleProcess lacks {sorted(set(theirs) - set(ours))}"
    for name, sig in theirs.items():  # same parameter names, so a call works against either runner
        assert list(ours[name].parameters) == list(sig.parameters), name
    for prop in ("rank", "world_size", "is_main", "device"):
        assert hasattr(SingleProcess(torch.device("cpu")), prop)


def test_optimizer_update_skips_a_non_finite_step():
    # an independent check of the update rule: finite -> AdamW step, non-finite -> nothing moves
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    runner = SingleProcess(torch.device("cpu"))
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in lin.parameters()]
    rec, finite = optimizer_update(runner, lin, opt, 0.1, [(lin(x).sum() * float("nan"), {"loss": 1.0})], 1.0)
    assert not finite and rec["skipped"] and all(torch.equal(a, p) for a, p in zip(before, lin.parameters()))
    assert all(p.grad is None for p in lin.parameters())
    rec, finite = optimizer_update(runner, lin, opt, 0.1, [(lin(x).sum() * 0.5, {"loss": 0.5}),
                                                           (lin(x).sum() * 0.5, {"loss": 0.25})], 1.0)
    assert finite and "skipped" not in rec and rec["loss"] == 0.75 and rec["lr"] == 0.1
    assert not all(torch.equal(a, p) for a, p in zip(before, lin.parameters()))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return source_corpus(tmp_path_factory.mktemp("corpus"), ("argparse", "textwrap", "inspect", "json"), chunk=3000)


def test_a_finished_pretraining_run_extends_from_final(corpus, tmp_path, one_thread):
    model = dict(TRAIN_MODEL, n_routed_experts=4, n_group=1, topk_group=1)
    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "run"), max_steps=3, batch_size=2, seq_len=32,
                      save_every=2, eval_every=0, eval_batches=1, vocab_size=300, tokenizer_train_mb=0.05,
                      val_fraction=0.2, progress=False, sample_tokens=0, model_overrides=model, device="cpu")
    train(cfg, log=lambda *a: None)
    logged = []
    summary = train(TrainConfig(out=cfg.out, progress=False), resume=True, max_steps=5, log=logged.append)
    # the newest complete checkpoint is final (step 3), not checkpoint-2
    assert any("final at step 3" in m for m in logged), logged
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "kind" not in json.loads(ln)]
    assert steps == [1, 2, 3, 4, 5] and summary["steps"] == 5
