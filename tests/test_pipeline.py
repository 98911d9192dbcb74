"""Pipeline parallelism (train/parallel/pipeline.py) on CPU gloo ranks against one process.

The single-process run is the reference: for every schedule offered, 2 and 4 pipeline ranks (and
pp 2 x dp 2, and pp 2 x ep 2: each stage's experts split over its 2 replicas) log the same per-step training and validation losses within 1e-5 for the same seed and
global batch, and end with the same aux-loss-free biases (integer counts, summed over stages and
replicas: exactly). One process launch per world size runs every schedule in one process group
(start-up dominates the cost). A pipeline checkpoint (sharded, torch.distributed.checkpoint) resumes
in one process, and under another schedule (another stage layout), with the same next losses;
``final/`` has the single-process HF keys.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.train.parallel.dist import DistributedError
from dsv3.train.parallel.pipeline import (SCHEDULES, bubble_fraction, check_pipeline, default_microbatches,
                                          plan_layout)
from dsv3.train.state import read_trainer_state
from dsv3.train.trainer import TrainConfig, prepare_data, train

STEPS = 3
# 8 layers: 2 virtual stages per rank at 4 ranks need 8 stages; layer 0 dense, the rest MoE
MODEL = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=8,
             num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=24,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8,
             n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, num_nextn_predict_layers=1)


def run_config(cache: Path, out: Path, **over) -> TrainConfig:
    """3 steps of 8 sequences (the global batch), checkpoint and eval at step 2."""
    base = dict(data=[str(cache / "corpus")], cache_dir=str(cache), out=str(out), max_steps=STEPS, batch_size=8,
                seq_len=16, lr=1e-2, warmup_steps=1, save_every=2, eval_every=2, eval_batches=1,
                vocab_size=384, tokenizer_train_mb=0.1, val_fraction=0.2, progress=False, sample_tokens=0,
                model_overrides=dict(MODEL), device="cpu", bias_update_rate=1e-2, bias_update_schedule="none",
                seq_aux_alpha=1e-2)
    base.update(over)
    return TrainConfig(**base)


def metrics(out: Path) -> tuple[list[float], list[float]]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["loss"] for r in recs if "kind" not in r], [r["val_loss"] for r in recs if r.get("kind") == "eval"]


def biases(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if k.endswith("e_score_correction_bias")}


def cases(world: int) -> dict[str, dict]:
    """Run name -> pipeline settings launched at ``world`` ranks. At 4 ranks only the final
    checkpoint and eval (the 2-rank runs cover the step-2 ones and the resume)."""
    out = {f"pp{world}-{s}": dict(pp=world, pp_schedule=s) for s in SCHEDULES}
    if world == 4:
        out["pp2-dp2-1f1b"] = dict(pp=2, pp_schedule="1f1b")
        out["pp2-dp2-dualpipev"] = dict(pp=2, pp_schedule="dualpipev")
        # expert parallel within each stage's replicas: 1f1b (one stage per rank, full backward) and
        # dualpipev (a V of two stages per rank, split input/weight backward) cover the two code
        # paths interleaved and zbv also take (all four measured equal; benchmarks/RESULTS.md)
        out["pp2-ep2-1f1b"] = dict(pp=2, pp_schedule="1f1b", ep=2)
        out["pp2-ep2-dualpipev"] = dict(pp=2, pp_schedule="dualpipev", ep=2)
        out = {k: dict(v, save_every=0, eval_every=0) for k, v in out.items()}
    return out


def _worker(rank: int, world: int, cache: str, tmp: str) -> None:
    import torch.distributed as dist
    from dsv3.train import balance
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous{world}", rank=rank, world_size=world)
    original = balance.update_bias
    try:
        for name, over in cases(world).items():
            seen = {}

            def spy(router, counts, gamma):  # a pipeline router view: its name, and the bias where held here
                original(router, counts, gamma)
                if router.e_score_correction_bias is not None:
                    seen.setdefault(router.name, []).append(router.e_score_correction_bias.tolist())

            balance.update_bias = spy
            train(run_config(Path(cache), Path(tmp) / name, **over))
            balance.update_bias = original
            # replicas of a stage (dp > 1) hold identical biases after every update
            everyone = [None] * world
            dist.all_gather_object(everyone, seen)
            pp = over["pp"]
            assert all(everyone[r] for r in range(world)), f"{name}: a rank updated no bias"
            for r in range(world):
                assert everyone[r] == everyone[r % pp], f"{name}: rank {r} biases differ from its replica's"
        if world == 2:  # the 1f1b run's sharded step-2 checkpoint resumed under another schedule
            if rank == 0:
                shutil.copytree(Path(tmp) / "pp2-1f1b", Path(tmp) / "resume-v", ignore=shutil.ignore_patterns("final"))
            dist.barrier()
            train(run_config(Path(cache), Path(tmp) / "resume-v", pp=2, pp_schedule="dualpipev"), resume=True)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        balance.update_bias = original
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    import textwrap
    d = tmp_path_factory.mktemp("pp_cache")
    (d / "corpus").mkdir()
    for mod in (textwrap, inspect, json):
        src = inspect.getsource(mod)
        for j in range(0, len(src), 3000):
            (d / "corpus" / f"{mod.__name__}_{j}.txt").write_text(src[j:j + 3000])
    prepare_data(run_config(d, d / "unused"), d)
    return d


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pp_single") / "single"
    train(run_config(cache, out))
    return out


def _check_matches(reference: Path, run: Path, name: str) -> None:
    ref_loss, ref_val = metrics(reference)
    got_loss, got_val = metrics(run)
    assert len(ref_loss) == STEPS and len(ref_val) == 2
    torch.testing.assert_close(torch.tensor(got_loss), torch.tensor(ref_loss), rtol=0, atol=1e-5, msg=name)
    torch.testing.assert_close(torch.tensor(got_val), torch.tensor(ref_val[-len(got_val):]), rtol=0, atol=1e-5,
                               msg=name)   # the final eval (and the step-2 one where run)
    assert got_val
    want = biases(reference / "final")
    got = biases(run / "final")
    assert want.keys() == got.keys() and want
    assert any(b.abs().sum() > 0 for b in want.values())
    for k in want:
        assert torch.equal(got[k], want[k]), (name, k)
    # the gathered final/ is the single-process HF layout
    assert load_file(str(run / "final" / "model.safetensors")).keys() == \
        load_file(str(reference / "final" / "model.safetensors")).keys()


def _launch(world: int, cache: Path, tmp: Path) -> None:
    import torch.multiprocessing as mp
    mp.spawn(_worker, args=(world, str(cache), str(tmp)), nprocs=world, join=True)


def test_two_ranks_every_schedule_matches_single_process(cache, reference, tmp_path, one_thread):
    _launch(2, cache, tmp_path)
    for name in cases(2):
        _check_matches(reference, tmp_path / name, name)
    # resumed under another schedule (another stage layout): the same next losses
    torch.testing.assert_close(torch.tensor(metrics(tmp_path / "resume-v")[0]),
                               torch.tensor(metrics(tmp_path / "pp2-1f1b")[0]), rtol=0, atol=1e-5)
    # a pipeline checkpoint resumes in one process: the same next losses
    run = tmp_path / "pp2-interleaved"
    shutil.copytree(run, tmp_path / "resume1", ignore=shutil.ignore_patterns("final"))
    saved = read_trainer_state(tmp_path / "resume1" / "checkpoint-2")
    assert saved["world_size"] == 2 and saved["train_config"]["pp"] == 2
    train(dataclasses.replace(run_config(cache, tmp_path / "resume1"), pp=1), resume=True)
    torch.testing.assert_close(torch.tensor(metrics(tmp_path / "resume1")[0]), torch.tensor(metrics(run)[0]),
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_four_ranks_every_schedule_and_dp_match_single_process(cache, reference, tmp_path, one_thread):
    _launch(4, cache, tmp_path)
    for name in cases(4):
        _check_matches(reference, tmp_path / name, name)


def test_layout_and_errors():
    c = plan_layout(8, 2, "1f1b")
    assert c.stage_layers == ((0, 1, 2, 3), (4, 5, 6, 7)) and c.stage_rank == (0, 1)
    v = plan_layout(6, 2, "zbv")                        # V: rank 0 holds the first and the last stage
    assert v.stage_rank == (0, 1, 1, 0) and [len(s) for s in v.stage_layers] == [1, 2, 2, 1]
    assert plan_layout(8, 2, "interleaved").stage_rank == (0, 1, 0, 1)
    with pytest.raises(DistributedError, match="only 3 layers"):
        plan_layout(3, 2, "dualpipev")
    from conftest import tiny_config
    cfg = tiny_config(num_hidden_layers=4)
    with pytest.raises(DistributedError, match="must divide the number of ranks"):
        check_pipeline(cfg, 3, 2, "1f1b", 2, 8)
    with pytest.raises(DistributedError, match="must divide the per-replica batch"):
        check_pipeline(cfg, 4, 2, "1f1b", 3, 8)
    with pytest.raises(DistributedError, match="at least 4 microbatches"):
        check_pipeline(cfg, 2, 2, "dualpipev", 2, 8)
    with pytest.raises(DistributedError, match="multiple of 2 rounds"):
        check_pipeline(tiny_config(num_hidden_layers=4), 2, 2, "interleaved", 5, 10)
    with pytest.raises(DistributedError, match="--ep 4 with --pp 2.*must divide dp = 4 ranks / --pp 2 = 2"):
        check_pipeline(cfg, 4, 2, "1f1b", 2, 8, ep=4)   # experts split over a stage's 2 replicas at most
    with pytest.raises(DistributedError, match="--ep 3 must divide n_routed_experts"):
        check_pipeline(tiny_config(num_hidden_layers=4, n_routed_experts=8), 6, 2, "1f1b", 2, 6, ep=3)
    with pytest.raises(DistributedError, match="no MoE layer"):
        check_pipeline(tiny_config(num_hidden_layers=4, first_k_dense_replace=4), 4, 2, "1f1b", 2, 8, ep=2)
    assert check_pipeline(cfg, 4, 2, "1f1b", 2, 8, ep=2) == 2    # pp 2 x ep 2 (dp 2)
    with pytest.raises(DistributedError, match="pp-schedule"):
        check_pipeline(cfg, 2, 2, "gpipe", 2, 8)
    assert check_pipeline(cfg, 4, 2, "1f1b", 2, 8) == 2          # dp = 2
    assert default_microbatches(2, 8) == 4 and default_microbatches(2, 6) == 6 and default_microbatches(4, 6) == 6


def test_pp_needs_torchrun():
    from dsv3.train.parallel.pipeline import PipelineTraining
    with pytest.raises(DistributedError, match="torchrun --nproc-per-node 2"):
        PipelineTraining.from_cfg(TrainConfig(pp=2, device="cpu"))


def test_bubble_fractions():
    # 1F1B: (P-1)/(M+P-1); interleaved with 2 chunks halves the idle time; ZB-V and DualPipeV are
    # bubble-free with equal F, B, W; everything is 0 at P = 1
    assert bubble_fraction("1f1b", 4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction("interleaved", 4, 8) == pytest.approx(1.5 / (1.5 + 8))
    assert bubble_fraction("zbv", 4, 8) == 0.0 and bubble_fraction("dualpipev", 4, 8) == 0.0
    assert bubble_fraction("zbv", 4, 8, w=0.5) > 0          # W smaller than B leaves a bubble
    assert bubble_fraction("1f1b", 1, 8) == 0.0
    assert bubble_fraction("1f1b", 4, 64) < bubble_fraction("1f1b", 4, 8)
