"""Distributed training on CPU (gloo): FSDP2 and FSDP2 + expert parallelism against one process.

One pair of processes is spawned for the whole file (process start-up dominates the cost) and does
every distributed check in one process group:
  - expert-parallel dispatch/combine equals the single-device experts, forward and backward, for
    skewed routings (experts with zero tokens, a rank that sends nothing to the other, a rank with
    no tokens at all);
  - the GPU configuration (bf16 mixed-precision policy, fp32 routers, EP) runs and gives a
    bf16-level loss;
  - a 2-rank FSDP2-only run and a 2-rank FSDP2 + EP run (node-limited routing, n_group = EP ranks)
    log the same losses as the single-process run (same global batch and seed) within 1e-5, and all
    ranks hold identical selection biases after every update;
  - a single-process checkpoint resumes at 2 ranks (with EP) with the same next losses;
  - SFT (the same training loop) at 2 ranks logs the same assistant-token losses as in one process,
    although the ranks' slices hold different numbers of assistant tokens;
  - GRPO at 2 ranks (each rank samples half the prompts on a gathered copy of the sharded policy)
    samples the same completions and logs the same rewards, losses and greedy eval as in one process.
The parent then resumes the 2-rank EP run's checkpoint in one process: same next losses.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAIN_MODEL, gloo_group, source_corpus, tiny_config
from dsv3.model.moe import RoutedExperts, Router
from dsv3.train.parallel.expert_parallel import max_ranks_per_token, ranks_per_token
from dsv3.train.parallel.parallelize import check_ep
from dsv3.train.parallel.dist import DistributedError
from dsv3.train.parallel.training import ParallelTraining
from dsv3.train.state import read_trainer_state
from dsv3.train.trainer import TrainConfig, prepare_data, train

WORLD = 2
STEPS = 4
MODEL = dict(TRAIN_MODEL, n_group=2, topk_group=1)


def run_config(cache: Path, out: Path, **over) -> TrainConfig:
    """4 steps of 2 micro-batches x 4 sequences (the global batch), checkpoint at step 2."""
    base = dict(data=[str(cache / "corpus")], cache_dir=str(cache), out=str(out), max_steps=STEPS, batch_size=4,
                seq_len=32, grad_accum=2, lr=1e-2, warmup_steps=1, save_every=2, eval_every=2, eval_batches=1,
                vocab_size=384, tokenizer_train_mb=0.1, val_fraction=0.2, progress=False, sample_tokens=4,
                model_overrides=dict(MODEL), device="cpu", bias_update_rate=1e-2,
                bias_update_schedule="none")
    base.update(over)
    return TrainConfig(**base)


def losses(out: Path) -> tuple[list[float], list[float], list[float]]:
    """Per-step training losses, per-eval validation losses, per-step global gradient norms."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in recs if "kind" not in r]
    return ([r["loss"] for r in steps], [r["val_loss"] for r in recs if r.get("kind") == "eval"],
            [r["grad_norm"] for r in steps])


def sft_config(tmp: Path, out: str):
    """3 SFT steps of 4 packed rows (the global batch) from the single-process run's final model."""
    from dsv3.post.sft import SFTConfig
    return SFTConfig(model=str(tmp / "single" / "final"), data=[str(tmp / "chat.jsonl")], out=str(tmp / out),
                     max_steps=3, batch_size=4, seq_len=48, lr=3e-3, warmup_steps=0, save_every=2, eval_every=2,
                     val_fraction=0.2, progress=False, device="cpu")


def grpo_config(tmp: Path, out: str):
    """2 GRPO steps of 4 prompts x 3 samples (two prompts per rank), micro-batches of 3 completions,
    a checkpoint and a greedy eval after each step, from the single-process SFT model; the reward
    (VOWEL_TASK) differs between almost any two completions, so every group has advantages. (The
    logged kl / clip_frac / ratio_mean are token means per micro-batch, weighted by completions, so
    they depend on how completions fall into micro-batches: 3 = one group keeps that the same.)"""
    from dsv3.post.grpo import GRPOConfig
    return GRPOConfig(model=str(tmp / "sft1" / "final"), task=str(tmp / "vowels.py"), out=str(tmp / out), max_steps=2,
                      prompts_per_step=4, group_size=3, max_new_tokens=6, lr=3e-3, seed=3, micro_batch=3,
                      save_every=1, eval_every=1, eval_problems=3, progress=False, device="cpu")


VOWEL_TASK = """
prompts = ["What is 2 + 3?", "Sort: 3 1 2", "Name a colour.", "Balanced? ()"]
def reward(prompt, completion):
    return sum(c in "aeiou" for c in completion) / max(1, len(completion)) + 0.01 * len(completion)
"""


def grpo_records(out: Path) -> tuple[list[dict], list[dict]]:
    """(step records without their timings, eval records)."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [{k: v for k, v in r.items() if k not in ("sample_s", "step_s")} for r in recs if "kind" not in r]
    return steps, [r for r in recs if r.get("kind") == "eval"]


def sft_losses(out: Path) -> tuple[list[float], list[float], list[float]]:
    """Per-step assistant-token losses, per-eval validation losses, per-step gradient norms."""
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in recs if "kind" not in r]
    return ([r["lm_loss"] for r in steps], [r["val_loss"] for r in recs if r.get("kind") == "eval"],
            [r["grad_norm"] for r in steps])


def biases(ckpt: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(ckpt / "model.safetensors"))
    return {k: v for k, v in t.items() if k.endswith("e_score_correction_bias")}


# ----------------------------------------------------------------------------- the two workers
def _check_expert_parallel(rank: int) -> None:
    """EP experts == single-device experts (forward, input/gate/expert gradients) on skewed routings."""
    import torch.distributed as dist
    from dsv3.train.parallel.expert_parallel import ExpertParallelExperts
    E, D, I, k = 8, 6, 5, 2
    g = torch.Generator().manual_seed(0)  # same weights and token sets on both ranks
    ref = RoutedExperts(E, D, I).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    ep = ExpertParallelExperts.from_experts(ref, None)
    assert (ep.first, ep.n_local) == (rank * 4, 4)
    cases = [  # per rank: expert ids [T, k]
        # rank 0 keeps to its own experts 0,1 (sends nothing to rank 1); rank 1 uses 0, 2, 5;
        # experts 3, 4, 6, 7 get no token at all
        [torch.tensor([[0, 1]] * 6), torch.tensor([[5, 0], [2, 5], [0, 2], [5, 2], [2, 0]])],
        # rank 1 has no tokens; rank 0 sends everything to rank 1's experts
        [torch.tensor([[7, 4], [4, 6], [6, 7]]), torch.zeros(0, 2, dtype=torch.long)],
    ]
    for topks in cases:
        xs = [torch.randn(len(t), D, generator=g, dtype=torch.float64) for t in topks]
        ws = [torch.rand(len(t), k, generator=g, dtype=torch.float64) for t in topks]
        x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
        x_ref, w_ref = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
        for m in (ref, ep):
            m.zero_grad()
        out = ep(x, w, topks[rank])
        expected = ref(x_ref, w_ref, topks[rank])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
        up = torch.randn(out.shape, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        (out * up).sum().backward()
        if expected.requires_grad:  # a rank without tokens: the reference never touches its inputs
            (expected * up).sum().backward()
        for got, want in ((x.grad, x_ref.grad), (w.grad, w_ref.grad)):
            torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=0, atol=1e-12)
        for name in ("gate_proj", "up_proj", "down_proj"):
            # an expert's gradient gathers the tokens of every rank: the sum of the local references'
            full = getattr(ref, name).grad
            full = torch.zeros_like(getattr(ref, name)) if full is None else full.clone()
            dist.all_reduce(full)
            got = getattr(ep, name).grad
            assert got is not None, f"{name}: local experts must get a (zero) gradient even without tokens"
            torch.testing.assert_close(got, full[ep.first:ep.first + ep.n_local], rtol=0, atol=1e-12)


def _check_mixed_precision_path(rank: int) -> None:
    """The GPU configuration (bf16 FSDP2 policy, fp32 routers, EP) runs here too: bf16-level loss."""
    import torch.distributed as dist
    from dsv3 import Transformer
    from dsv3.train.parallel.dist import init_distributed
    from dsv3.train.parallel.parallelize import clip_grad_norm, parallelize
    from dsv3.train.trainer import compute_losses
    cfg = tiny_config(n_group=2, topk_group=1)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ctx = init_distributed("cpu")
    parallelize(model, ctx, ep=2, mixed_precision=True)
    window = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    tc = TrainConfig()
    expected = float(compute_losses(ref, window, tc)["loss"])
    loss = compute_losses(model, window[2 * rank: 2 * rank + 2], tc)["loss"]
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    assert abs(float(mean) / 2 - expected) < 2e-3, (float(mean) / 2, expected)   # bf16 weights; 1e-4 seen
    assert torch.isfinite(torch.tensor(clip_grad_norm(model, 1.0, ctx)))
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32     # fp32 master weights, sharded
    assert model.layers[1].mlp.experts.gate_proj.grad.dtype == torch.float32


def _train_recording_biases(cfg: TrainConfig, resume: bool = False) -> list[torch.Tensor]:
    """Run the trainer; return every selection bias right after each aux-loss-free update."""
    from dsv3.train import balance
    seen = []
    original = balance.update_bias

    def spy(router, counts, gamma):
        original(router, counts, gamma)
        seen.append(router.e_score_correction_bias.detach().clone())

    balance.update_bias = spy
    try:
        train(cfg, resume=resume)
    finally:
        balance.update_bias = original
    return seen


def _worker(rank: int, cache: str, tmp: str) -> None:
    import torch.distributed as dist
    with gloo_group(rank, WORLD, tmp):
        _check_expert_parallel(rank)
        _check_mixed_precision_path(rank)
        cache_p, tmp_p = Path(cache), Path(tmp)
        runs = {"fsdp": run_config(cache_p, tmp_p / "fsdp"),
                "ep": run_config(cache_p, tmp_p / "ep", ep=2)}
        for name, cfg in runs.items():
            seen = _train_recording_biases(cfg)
            assert seen and any(b.abs().sum() > 0 for b in seen)
            everyone = [None] * WORLD
            dist.all_gather_object(everyone, [b.tolist() for b in seen])
            assert everyone[0] == everyone[1], f"{name}: ranks hold different selection biases"
        # a single-process checkpoint resumes at 2 ranks with EP (the parent saved it)
        _train_recording_biases(dataclasses.replace(run_config(cache_p, tmp_p / "resume2"), ep=2), resume=True)
        from dsv3.post.sft import sft
        sft(sft_config(tmp_p, "sft2"), log=lambda *a: None)
        from dsv3.post.grpo import grpo
        grpo(grpo_config(tmp_p, "grpo2"), log=lambda *a: None)


# ----------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A small real-text corpus with its tokenizer and token shards built once."""
    d = tmp_path_factory.mktemp("dist_cache")
    source_corpus(d / "corpus", ("argparse", "textwrap", "inspect", "dataclasses", "json"), chunk=3000)
    prepare_data(run_config(d, d / "unused"), d)
    return d


def test_single_process_needs_no_process_group_and_checks_ep():
    assert ParallelTraining.from_env(None, 1) is None          # plain path: nothing distributed
    with pytest.raises(DistributedError, match="torchrun"):
        ParallelTraining.from_env(None, 2)
    c = tiny_config(n_routed_experts=8)
    with pytest.raises(DistributedError, match="divide the number of ranks"):
        check_ep(c, 4, 3)
    with pytest.raises(DistributedError, match="n_routed_experts"):
        check_ep(tiny_config(n_routed_experts=6, n_group=2, topk_group=1), 4, 4)


def test_node_limited_routing_reaches_at_most_topk_group_ranks():
    # n_group = EP ranks = 4, topk_group = 2: a token's experts sit on at most 2 of the 4 ranks
    g = torch.Generator().manual_seed(0)
    for topk_group, bound in ((2, 2), (4, 4)):
        c = tiny_config(n_routed_experts=16, n_group=4, topk_group=topk_group, num_experts_per_tok=4)
        r = Router(c)
        with torch.no_grad():
            r.weight.copy_(torch.randn(r.weight.shape, generator=g))
            r.e_score_correction_bias.copy_(torch.randn(16, generator=g) * 0.1)
        _, topk = r(torch.randn(512, c.hidden_size, generator=g))
        reach = ranks_per_token(topk, 16, 4)
        assert max_ranks_per_token(16, 4, topk_group, 4, 4) == bound
        assert int(reach.max()) == bound   # reached (so the measure can fail), never exceeded
    # the count itself, by hand: experts 0..3 on rank 0, 4..7 on rank 1
    assert ranks_per_token(torch.tensor([[0, 3], [1, 6], [7, 4]]), 8, 2).tolist() == [1, 2, 1]


def test_fsdp_and_expert_parallel_match_single_process(cache, tmp_path, one_thread):
    import torch.multiprocessing as mp
    # single-process reference, and its step-2 checkpoint for the workers to resume at 2 ranks
    ref = run_config(cache, tmp_path / "single")
    train(ref)
    shutil.copytree(tmp_path / "single", tmp_path / "resume2", ignore=shutil.ignore_patterns("final"))
    # SFT data and its single-process reference, from that run's model
    from dsv3.post.sft import sft
    from dsv3.tasks import Arithmetic, problems
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(p.sft_record()) + "\n"
                                                 for p in problems(Arithmetic(max_value=99), 30, 0)))
    sft(sft_config(tmp_path, "sft1"), log=lambda *a: None)
    from dsv3.post.grpo import grpo
    (tmp_path / "vowels.py").write_text(VOWEL_TASK)
    grpo(grpo_config(tmp_path, "grpo1"), log=lambda *a: None)

    mp.spawn(_worker, args=(str(cache), str(tmp_path)), nprocs=WORLD, join=True)

    ref_loss, ref_val, ref_norm = losses(tmp_path / "single")
    assert len(ref_loss) == STEPS
    for name in ("fsdp", "ep", "resume2"):
        got_loss, got_val, got_norm = losses(tmp_path / name)
        torch.testing.assert_close(torch.tensor(got_loss), torch.tensor(ref_loss), rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(torch.tensor(got_val), torch.tensor(ref_val), rtol=0, atol=1e-5, msg=name)
        # AdamW hardly sees a gradient's scale; the global norm does (e.g. experts' mean over all ranks)
        torch.testing.assert_close(torch.tensor(got_norm), torch.tensor(ref_norm), rtol=1e-5, atol=0, msg=name)
        # integer expert counts, all-reduced: the same bias updates as one process, exactly
        for k, b in biases(tmp_path / "single" / "final").items():
            assert torch.equal(biases(tmp_path / name / "final")[k], b), (name, k)
    # the gathered final checkpoint is the plain single-process layout with the same weights. AdamW's
    # per-element normalization amplifies float noise (~1e-7 relative: another summation order) where
    # an element's gradients nearly cancel across steps; measured up to 4e-5 after 4 steps at lr 1e-2,
    # in an expert that gets few tokens, hence 1e-4 here (a wrong update is ~lr = 1e-2)
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ep" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)

    # saved at 2 ranks (EP), resumed in one process: the same next losses
    shutil.copytree(tmp_path / "ep", tmp_path / "resume1", ignore=shutil.ignore_patterns("final"))
    saved = read_trainer_state(tmp_path / "resume1" / "checkpoint-2")
    assert saved["world_size"] == WORLD and saved["train_config"]["ep"] == 2
    train(dataclasses.replace(ref, out=str(tmp_path / "resume1"), ep=1), resume=True)
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "resume1")[0]), torch.tensor(losses(tmp_path / "ep")[0]),
                               rtol=0, atol=1e-5)
    assert len(losses(tmp_path / "resume1")[0]) == STEPS

    # SFT at 2 ranks: every term a mean over the global batch's assistant tokens, as in one process
    ref_loss, ref_val, ref_norm = sft_losses(tmp_path / "sft1")
    got_loss, got_val, got_norm = sft_losses(tmp_path / "sft2")
    assert len(ref_loss) == 3 and len(ref_val) == 2
    torch.testing.assert_close(torch.tensor(got_loss), torch.tensor(ref_loss), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got_val), torch.tensor(ref_val), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got_norm), torch.tensor(ref_norm), rtol=1e-5, atol=0)
    assert read_trainer_state(tmp_path / "sft2" / "final")["world_size"] == WORLD

    # GRPO at 2 ranks: the same samples (per-completion seeds), rewards and update as one process
    ref_steps, ref_evals = grpo_records(tmp_path / "grpo1")
    got_steps, got_evals = grpo_records(tmp_path / "grpo2")
    assert len(ref_steps) == len(got_steps) == 2 and len(ref_evals) == 3
    assert read_trainer_state(tmp_path / "grpo2" / "final")["world_size"] == WORLD
    assert all(s["reward_std"] > 0 and s["grad_norm"] > 0 and s["kl"] >= 0 for s in ref_steps)  # a real update
    assert ref_steps[1]["kl"] > 0                            # the policy moved away from the reference
    exact = ("step", "reward_mean", "reward_std", "accuracy", "format_rate", "completion_len", "lr")
    for a, b in zip(ref_steps, got_steps):
        assert {k: b[k] for k in exact} == {k: a[k] for k in exact}
        for k in ("loss", "kl", "clip_frac", "ratio_mean"):
            assert b[k] == pytest.approx(a[k], rel=0, abs=1e-5), k
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert [e["accuracy"] for e in got_evals] == [e["accuracy"] for e in ref_evals]
    a = load_file(str(tmp_path / "grpo1" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "grpo2" / "final" / "model.safetensors"))
    for k in a:  # AdamW amplifies float noise where gradients nearly cancel (see above): 1e-4
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
