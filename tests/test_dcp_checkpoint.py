"""Sharded checkpoints (torch.distributed.checkpoint) resume at another world size and layout.

The reference is an uninterrupted 2-rank FSDP2 + expert-parallel (ep 2) run of 4 steps that saves a
sharded checkpoint at step 2 and ``final`` at step 4. Its step-2 checkpoint is then resumed at
  - 2 ranks, ep 2 (the same layout): every later loss and the final weights bit-identical, because
    the same ranks sum the same numbers in the same order; this is what shows the restore is exact;
  - 2 ranks, ep 1 (FSDP2 only: the experts a DTensor over both ranks, not EP slices);
  - 1 process without a process group;
  - 4 ranks, ep 4 (two experts per rank) and 4 ranks, ep 2 (each EP slice FSDP-sharded over 2 ranks:
    the nested offsets);
  - 4 ranks as pipeline stages, pp 2 x dp 2;
and the 4-rank ep-2 run's ``final`` (saved at 4 ranks) is extended by one step in one process, next
to the reference's ``final`` extended the same way. A 2-rank pipeline run (pp 2, 1f1b: each rank
holds one stage's tensors) saves at step 2 and resumes in one process and at 4 ranks with ep 2.
The issue's example: a 4-rank pp 2 x ep 2 run (each stage's experts split over its 2 replicas; its
losses agree with the reference's) saves at step 2 and resumes in one process and at 4 ranks with
ep 4 (no pipeline), with its own next losses. Across layouts the next losses agree to a
relative 1e-6, not bit for bit: the model and optimizer state are restored exactly, but a different
layout sums a step's losses and gradients in another order (per-rank token means averaged over
ranks, FSDP's reduce-scatter), which moves fp32 results by a few ulps (measured up to 1.6e-7
relative, loss ~7.6); a wrong restore moves them by ~1e-2. The integer expert counts are
all-reduced, so the router biases agree exactly.

An SFT run saved at 2 ranks resumes in one process the same way. Also: the torch and python RNGs
restored as they were at the save, one shard file per rank, checkpoint directories complete only with all their shards,
``final/`` the plain HF layout (dsv3.LLM generates from it; its weights equal the sharded copy of
the same step read in one process), and a clear error where a single-process reader meets shards.

Processes are forked (not spawned) from the test process: start-up then costs no re-import.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shutil
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.checkpoint import CheckpointError, load_pretrained
from dsv3.train.state import (STATE_DIR, SHARDED_MARKER, list_checkpoints, load_training_state, read_trainer_state,
                              resume_point, state_dir)
from dsv3.train.trainer import TrainConfig, prepare_data, train

STEPS = 4
MODEL = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, q_lora_rank=24,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=8,
             n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1)
RTOL = 1e-6


def run_config(cache: Path, out: Path, **over) -> TrainConfig:
    """4 steps of a global batch of 4 sequences, a sharded checkpoint at step 2, evals at 2 and 4."""
    base = dict(data=[str(cache / "corpus")], cache_dir=str(cache), out=str(out), max_steps=STEPS, batch_size=4,
                seq_len=32, lr=1e-2, warmup_steps=1, save_every=2, eval_every=2, eval_batches=1, vocab_size=384,
                tokenizer_train_mb=0.1, val_fraction=0.2, progress=False, sample_tokens=0,
                model_overrides=dict(MODEL), device="cpu", bias_update_rate=1e-2,
                bias_update_schedule="none")
    base.update(over)
    return TrainConfig(**base)


def sft_config(tmp: Path, out: str):
    """3 SFT steps of 4 packed rows (the global batch) from the 2-rank run's final model, a checkpoint at 2."""
    from dsv3.post.sft import SFTConfig
    return SFTConfig(model=str(tmp / "ep2" / "final"), data=[str(tmp / "chat.jsonl")], out=str(tmp / out),
                     max_steps=3, batch_size=4, seq_len=48, lr=3e-3, warmup_steps=0, save_every=2, eval_every=2,
                     val_fraction=0.2, progress=False, device="cpu")


def metrics(out: Path, key: str = "loss") -> tuple[list[float], list[float]]:
    """(per-step training losses ``key``, per-eval validation losses)."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r[key] for r in recs if "kind" not in r], [r["val_loss"] for r in recs if r.get("kind") == "eval"]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def copy_run(src: Path, dst: Path) -> None:
    """The run directory up to its step-2 checkpoint (``final`` left out, so resuming starts at step 2)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("final", "final.*"))


def fork(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp
    mp.start_processes(fn, args=(world, *args), nprocs=world, join=True, start_method="fork")


def _quiet(*_a, **_k):
    pass


def _record_rng_at_saves(where: Path) -> None:
    """Write this process's torch and python RNG states at every checkpoint save to ``where/RUN-NAME.*``."""
    import random
    from safetensors.torch import save_file
    from dsv3.train.parallel import checkpoint
    original = checkpoint.save_parallel_checkpoint
    where.mkdir()

    def spy(ctx, out_dir, name, *args, **kwargs):
        save_file({"torch": torch.get_rng_state()}, str(where / f"{Path(out_dir).name}-{name}.safetensors"))
        (where / f"{Path(out_dir).name}-{name}.json").write_text(json.dumps(random.getstate()))
        return original(ctx, out_dir, name, *args, **kwargs)
    checkpoint.save_parallel_checkpoint = spy   # the forked process's copy of the module


class _NoTokenizer:
    def save(self, path) -> None:
        pass


def _save_partial_optimizer_state(tmp: Path) -> None:
    """A sharded checkpoint of an EP model whose MTP module never had a gradient (no AdamW state for
    it), plus every AdamW moment gathered to full size by the EP and FSDP collectives, for the parent
    to compare with what one process reads back."""
    from safetensors.torch import save_file
    from conftest import tiny_config
    from dsv3 import Transformer
    from dsv3.train.optim import build_optimizer
    from dsv3.train.parallel.checkpoint import gather_full
    from dsv3.train.parallel.dist import init_distributed
    from dsv3.train.parallel.training import ParallelTraining
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_group=2, topk_group=1))
    runner = ParallelTraining(init_distributed("cpu"), ep=2)
    runner.parallelize(model, log=_quiet)
    opt = build_optimizer(model, 1e-2)
    x = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(runner.rank))
    out = model(x[:, :-1])
    (out[0] if isinstance(out, tuple) else out).square().mean().backward()   # main logits only: no MTP gradient
    opt.step()
    runner.save(tmp / "partial", "checkpoint-1", model, _NoTokenizer(), opt, {"step": 1})
    names = {id(p): n for n, p in model.named_parameters()}
    from dsv3.train.parallel.expert_parallel import ExpertParallelExperts
    full = {}
    for p, st in opt.state.items():
        owner = model.get_submodule(names[id(p)].rsplit(".", 1)[0])
        ep = owner if isinstance(owner, ExpertParallelExperts) else None
        full[names[id(p)]] = gather_full(st["exp_avg"], ep)
    if runner.is_main:
        save_file(full, str(tmp / "partial-exp-avg.safetensors"))


def _worker(rank: int, world: int, cache: str, tmp: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{world}", rank=rank, world_size=world)
    try:
        cache_p, tmp_p = Path(cache), Path(tmp)
        if world == 2:
            _record_rng_at_saves(tmp_p / f"rng-{rank}")
            train(run_config(cache_p, tmp_p / "ep2", ep=2), log=_quiet)
            from dsv3.post.sft import sft
            sft(sft_config(tmp_p, "sft2"), log=_quiet)     # SFT's checkpoints are sharded the same way
            train(run_config(cache_p, tmp_p / "pp2", pp=2), log=_quiet)   # pipeline stages, 1f1b
            _save_partial_optimizer_state(tmp_p)
            resumes = {"again": ("ep2", dict(ep=2)), "fsdp": ("ep2", dict(ep=1))}
        else:
            train(run_config(cache_p, tmp_p / "pp2ep2", pp=2, ep=2), log=_quiet)   # pp 2 x ep 2, 1f1b
            resumes = {"four_ep4": ("ep2", dict(ep=4)), "four_ep2": ("ep2", dict(ep=2)),
                       "ep_to_pp2_dp2": ("ep2", dict(pp=2)), "pp_to_four_ep2": ("pp2", dict(ep=2)),
                       "pp2ep2_to_four_ep4": ("pp2ep2", dict(ep=4))}
        for name, (src, layout) in resumes.items():
            if rank == 0:
                copy_run(tmp_p / src, tmp_p / name)
            dist.barrier()
            train(run_config(cache_p, tmp_p / name, **layout), resume=True, log=_quiet)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A small real-text corpus with its tokenizer and token shards built once."""
    d = tmp_path_factory.mktemp("dcp_cache")
    (d / "corpus").mkdir()
    for mod in (argparse, textwrap, inspect, dataclasses, json):
        src = inspect.getsource(mod)
        for j in range(0, len(src), 3000):
            (d / "corpus" / f"{mod.__name__}_{j}.txt").write_text(src[j:j + 3000])
    prepare_data(run_config(d, d / "unused"), d)
    return d


def assert_close_losses(got: Path, want: Path, what: str, key: str = "loss") -> None:
    for g, w in zip(metrics(got, key), metrics(want, key)):
        assert len(g) == len(w), what
        torch.testing.assert_close(torch.tensor(g, dtype=torch.float64), torch.tensor(w, dtype=torch.float64),
                                   rtol=RTOL, atol=0, msg=what)


def biases(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in w.items() if k.endswith("e_score_correction_bias")}


def test_sharded_checkpoints_resume_at_other_layouts(cache, tmp_path, one_thread):
    from dsv3.tasks import Arithmetic, problems
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(p.sft_record()) + "\n"
                                                 for p in problems(Arithmetic(max_value=99), 30, 0)))
    fork(_worker, 2, str(cache), str(tmp_path))
    ref = tmp_path / "ep2"
    ref_loss, ref_val = metrics(ref)
    assert len(ref_loss) == STEPS and len(ref_val) == 2

    # the layout on disk: the state directory holds one shard file per rank and is listed complete
    ckpt = ref / "checkpoint-2"
    shards = state_dir(ckpt)
    assert shards is not None and shards.parent.name == STATE_DIR
    info = read_trainer_state(ckpt)["sharded"]
    assert (info["world_size"], info["ep"]) == (2, 2)
    files = sorted(p.name for p in shards.glob("*.safetensors"))
    assert files == info["files"] and len(files) == 2, files
    assert (ckpt / SHARDED_MARKER).is_file() and (ckpt / "config.json").is_file()
    assert not list(ckpt.glob("*.safetensors"))      # no gathered weights for a step checkpoint
    with pytest.raises(CheckpointError, match="sharded"):
        load_training_state(ckpt, None)             # the single-process reader says what it met
    # a shard missing: the checkpoint is not complete, resume falls back (here: to nothing)
    broken = tmp_path / "broken"
    copy_run(ref, broken)
    next(state_dir(broken / "checkpoint-2").glob("*.safetensors")).unlink()
    assert state_dir(broken / "checkpoint-2") is None and list_checkpoints(broken) == []
    assert resume_point(broken) is None

    # the RNGs come back as they were at the save (rank 0's; every rank's are the same here)
    import random
    from dsv3 import Transformer
    from dsv3.config import ModelConfig
    from dsv3.train.optim import build_optimizer
    from dsv3.train.parallel.checkpoint import load_sharded_checkpoint
    for r in (0, 1):
        assert torch.equal(load_file(str(tmp_path / f"rng-{r}" / "ep2-checkpoint-2.safetensors"))["torch"],
                           load_file(str(tmp_path / "rng-0" / "ep2-checkpoint-2.safetensors"))["torch"])
    torch.manual_seed(12345)
    random.seed(12345)
    model = Transformer(ModelConfig.from_json_file(ckpt))
    assert load_sharded_checkpoint(ckpt, model, build_optimizer(model, 0.0))["step"] == 2
    assert torch.equal(torch.get_rng_state(), load_file(str(tmp_path / "rng-0" / "ep2-checkpoint-2.safetensors"))["torch"])
    assert json.loads(json.dumps(random.getstate())) == json.loads((tmp_path / "rng-0" / "ep2-checkpoint-2.json").read_text())

    # parameters without AdamW state (no gradient yet) come back without one; the rest exactly
    from conftest import tiny_config
    model = Transformer(tiny_config(n_group=2, topk_group=1))
    opt = build_optimizer(model, 1e-2)
    load_sharded_checkpoint(tmp_path / "partial" / "checkpoint-1", model, opt)
    want = load_file(str(tmp_path / "partial-exp-avg.safetensors"))
    got = {n: opt.state[p]["exp_avg"] for n, p in model.named_parameters() if p in opt.state}
    assert got.keys() == want.keys() and not any(n.startswith("mtp.") for n in got)
    assert any(n.endswith("experts.gate_proj") for n in got)
    for n in got:
        assert torch.equal(got[n], want[n]), n

    # same layout: bit-identical continuation and final weights
    again = tmp_path / "again"
    assert metrics(again) == (ref_loss, ref_val)
    a, b = final_weights(ref), final_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # one process, no process group: the sharded state read whole
    one = tmp_path / "one"
    copy_run(ref, one)
    train(run_config(cache, one, ep=1), resume=True, log=_quiet)
    assert metrics(one)[0][:2] == ref_loss[:2]    # the resumed run keeps the steps before the checkpoint

    # SFT saved at 2 ranks, resumed in one process (its model built from the base, then the shards)
    from dsv3.post.sft import sft
    assert read_trainer_state(tmp_path / "sft2" / "checkpoint-2")["sharded"]["world_size"] == 2
    copy_run(tmp_path / "sft2", tmp_path / "sft1")
    sft(sft_config(tmp_path, "sft1"), resume=True, log=_quiet)
    assert_close_losses(tmp_path / "sft1", tmp_path / "sft2", "sft", key="lm_loss")

    # final/: the HF layout, equal to the sharded copy of the same step resharded into one process
    from dsv3.train.parallel.checkpoint import export_pretrained
    exported = export_pretrained(ref / "final", tmp_path / "exported")
    x, y = load_pretrained(ref / "final").state_dict(), load_pretrained(exported).state_dict()
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    from dsv3 import LLM
    from dsv3.engine.sampling import SamplingParams
    from dsv3.sample import generate
    prompt = list(range(5, 17))
    out = LLM(str(ref / "final"), device="cpu").generate([prompt], SamplingParams(temperature=0, max_tokens=6,
                                                                                  ignore_eos=True))
    assert out[0].token_ids == generate(load_pretrained(exported), prompt, 6, temperature=0)

    # pipeline stages (pp 2): each rank writes its stage's tensors; resumed in one process
    pp = tmp_path / "pp2"
    assert read_trainer_state(pp / "checkpoint-2")["sharded"]["pp"] == 2
    assert len(list(state_dir(pp / "checkpoint-2").glob("*.safetensors"))) == 2
    copy_run(pp, tmp_path / "pp_to_one")
    train(run_config(cache, tmp_path / "pp_to_one"), resume=True, log=_quiet)

    fork(_worker, 4, str(cache), str(tmp_path))
    four = tmp_path / "four_ep2"
    assert len(read_trainer_state(four / "final")["sharded"]["files"]) == 4
    # pp 2 x ep 2: four shard files (each rank its stage's tensors, its EP slice of the experts);
    # resumed in one process (and at 4 ranks with ep 4, above)
    ppep = tmp_path / "pp2ep2"
    info = read_trainer_state(ppep / "checkpoint-2")["sharded"]
    assert (info["world_size"], info["pp"], info["dp"], info["ep"]) == (4, 2, 2, 2)
    assert len(list(state_dir(ppep / "checkpoint-2").glob("*.safetensors"))) == 4
    copy_run(ppep, tmp_path / "pp2ep2_to_one")
    train(run_config(cache, tmp_path / "pp2ep2_to_one"), resume=True, log=_quiet)
    runs = {"fsdp": ref, "one": ref, "four_ep4": ref, "four_ep2": ref, "ep_to_pp2_dp2": ref,
            "pp_to_one": pp, "pp_to_four_ep2": pp,
            "pp2ep2": ref, "pp2ep2_to_one": ppep, "pp2ep2_to_four_ep4": ppep}
    for name, want in runs.items():
        assert_close_losses(tmp_path / name, want, name)
        got = biases(final_weights(tmp_path / name))
        for k, v in biases(final_weights(want)).items():
            assert torch.equal(got[k], v), (name, k)

    # saved at 4 ranks (final), extended in one process: the step after agrees with the reference's
    for run in (ref, four):
        train(run_config(cache, run, ep=1), resume=True, max_steps=STEPS + 1, log=_quiet)
    torch.testing.assert_close(torch.tensor(metrics(four)[0][-1], dtype=torch.float64),
                               torch.tensor(metrics(ref)[0][-1], dtype=torch.float64), rtol=RTOL, atol=0)
