"""What training does differently under torchrun, behind one object the training loop calls.

In a single process :meth:`ParallelTraining.from_env` returns None and the loop uses
:class:`dsv3.train.loop.SingleProcess`, which has the same methods doing the plain thing. With
``WORLD_SIZE > 1`` it joins the job and then:

- ``batch_size`` is the *global* micro-batch: each step takes the same ``batch_size`` windows as a
  single process would, and rank r trains on its ``batch_size / W`` slice of them. So the loss, the
  gradients (FSDP averages them) and the run's checkpoints mean the same at any world size.
- expert counts are summed over all ranks before the aux-loss-free bias update, so every rank
  applies the same update (biases stay identical); the sequence-wise balance loss is per sequence
  and each sequence lives on one rank, so sharding does not change it. (The classic batch-wise
  aux loss, ``--aux-loss-alpha``, is computed over each rank's own slice of the micro-batch.)
- logged losses are averaged over ranks; the gradient norm is global; a step is skipped on every
  rank when any rank saw a non-finite loss.
- rank 0 alone writes metrics and plots; every rank writes its shard of each checkpoint
  (torch.distributed.checkpoint, ``checkpoint.py``), and ``final`` is also gathered to the HF layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .dist import DistContext, DistributedError, init_distributed, world_size_from_env


class ParallelTraining:
    """FSDP2 (+ expert parallel) training over torch.distributed; see the module docstring."""

    def __init__(self, ctx: DistContext, ep: int = 1):
        self.ctx, self.ep = ctx, ep
        self.plan = None

    @classmethod
    def from_env(cls, device: str | None = None, ep: int = 1) -> ParallelTraining | None:
        """Join the torchrun job, or None when this is a single process (then ``ep`` must be 1)."""
        if world_size_from_env() <= 1:
            if ep != 1:
                raise DistributedError(f"--ep {ep} needs at least {ep} processes; launch with "
                                       f"torchrun --nproc-per-node {ep} -m dsv3 train ...")
            return None
        return cls(init_distributed(device), ep)

    # ------------------------------------------------------------------ who am I
    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def main_first(self):
        """Context manager: rank 0 runs the body first (tokenizer, token shards), then the others."""
        return self.ctx.main_first()

    def barrier(self) -> None:
        """Wait for every rank."""
        self.ctx.barrier()

    # ------------------------------------------------------------------ data and model
    def _local_batch_size(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            raise DistributedError(f"--batch-size {global_batch} is the global batch; it must be divisible by "
                                   f"the number of ranks ({self.world_size})")
        return global_batch // self.world_size

    def packed_batches(self, dataset, batch_size: int, seq_len: int, seed: int):
        """This rank's slice of each global training batch (all ranks advance one shared position)."""
        from ...data import PackedBatches
        return PackedBatches(dataset, self._local_batch_size(batch_size), seq_len, split="train", seed=seed,
                             rank=self.rank, world_size=self.world_size)

    def parallelize(self, model: nn.Module, log=print) -> nn.Module:
        """Expert parallel over ``ep`` ranks, then FSDP2 over all; returns the same (sharded) model."""
        from .expert_parallel import max_ranks_per_token
        from .parallelize import parallelize
        c = model.config
        self.plan = parallelize(model, self.ctx, ep=self.ep)
        msg = (f"distributed: {self.world_size} ranks ({self.ctx.backend}), FSDP2 over all ranks, "
               f"expert parallel size {self.ep}")
        if self.ep > 1:
            reach = max_ranks_per_token(c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok, self.ep)
            msg += (f"; {c.n_routed_experts // self.ep} experts per rank, each token reaches at most {reach} "
                    f"of {self.ep} EP ranks (n_group={c.n_group}, topk_group={c.topk_group})")
        if self.plan.mixed_precision:
            msg += "; bf16 parameters for compute, fp32 reduction"
        log(msg)
        return model

    # ------------------------------------------------------------------ one step
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        from .parallelize import clip_grad_norm
        return clip_grad_norm(model, max_norm, self.ctx)

    def reduce_step(self, sums: dict[str, float], finite: bool, counts: dict):
        """Average the logged losses over ranks, AND the finite flags, sum the expert counts.

        ``counts`` maps router names to ``[E]`` token counts of this rank (or 0 for a router that did
        not run); the result holds the global counts, the same on every rank.
        """
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys] + [0.0 if finite else 1.0], dtype=torch.float64)
        self.ctx.all_reduce(vec)
        out = {k: float(vec[i]) / self.world_size for i, k in enumerate(keys)}
        finite = float(vec[-1]) == 0.0
        names = [n for n, c in counts.items() if torch.is_tensor(c)]
        if names:
            stacked = torch.stack([counts[n] for n in names])                   # [routers, E]
            self.ctx.all_reduce(stacked)
            counts = dict(counts, **{n: stacked[i] for i, n in enumerate(names)})
        return out, finite, counts

    def token_shares(self, counts: torch.Tensor) -> tuple[list[float], torch.Tensor]:
        """Token-mean losses over the global batch: for this rank's token counts ``[T]`` (one per loss
        term), (``count * W / global count`` per term, the global counts ``[T]``). A rank's mean of a
        term times its share, averaged over the ranks (as FSDP averages gradients), is the term's mean
        over all the ranks' tokens."""
        total = counts.detach().to(torch.float64).cpu()
        self.ctx.all_reduce(total)
        shares = (counts.detach().to(torch.float64).cpu() * self.world_size / total.clamp_min(1)).tolist()
        return shares, total

    # ------------------------------------------------------------------ checkpoints
    def _expert_mesh(self):
        """The (ep, ep_rep) mesh DCP sees the EP experts on, made on first use (collective, like the
        save and load that ask for it); None without expert parallelism."""
        if self.plan is None or self.plan.ep == 1:
            return None
        if getattr(self, "_ep_view_mesh", None) is None:
            from .checkpoint import expert_mesh
            self._ep_view_mesh = expert_mesh(self.plan.ep_mesh)
        return self._ep_view_mesh

    def save(self, out_dir: Path, name: str, model: nn.Module, tokenizer, optimizer, trainer_state: dict) -> Path:
        """Write a sharded checkpoint, every rank its pieces (collective); ``final`` is also exported
        as the full HF model."""
        from .checkpoint import save_parallel_checkpoint
        return save_parallel_checkpoint(self.ctx, out_dir, name, model, tokenizer, optimizer, trainer_state,
                                        mesh=self._expert_mesh(), layout={"ep": self.ep})

    def load(self, path: Path, model: nn.Module, optimizer) -> dict:
        """Resume from a checkpoint saved at any world size and layout, sharded or single-process;
        returns its trainer state."""
        from .checkpoint import load_parallel_checkpoint
        return load_parallel_checkpoint(path, model, optimizer, mesh=self._expert_mesh())

    def sampling_model(self, model: nn.Module, final: Path):
        """A single-device copy of the saved ``final`` checkpoint (rank 0 samples from it without the
        other ranks; ``model`` is sharded)."""
        from ...checkpoint import load_pretrained
        return load_pretrained(final, dtype=torch.float32).to(self.device)

    def gathered_model(self, model: nn.Module) -> nn.Module:
        """A single-device copy of the sharded ``model`` with its current weights, on every rank
        (collective: all ranks call it; e.g. GRPO samples its rollouts with it). Costs one all-gather
        of the weights and a full copy per rank."""
        from .checkpoint import full_model_state, plain_model
        return plain_model(model.config, full_model_state(model)).to(self.device).requires_grad_(False)

    def gather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------ the end
    def finish(self, summary: dict | None) -> dict:
        """Share rank 0's run summary with every rank, then leave the process group."""
        summary = self.ctx.broadcast_object(summary)
        if not self.is_main:
            summary = dict(summary, rank=self.rank)
        self.ctx.close()
        return summary
