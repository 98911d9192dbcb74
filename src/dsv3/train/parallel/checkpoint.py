"""Checkpoints of a parallelized run, in the single-process layout, so any world size can resume them.

Saving gathers every tensor to full size -- FSDP shards with ``DTensor.full_tensor()``, expert slices
with an all-gather over the EP group -- and rank 0 writes exactly what a single-process run writes
(:func:`dsv3.train.state.save_training_checkpoint`: the HF-layout model, the AdamW state indexed by
parameter order, RNG and data state). Loading reads that full state on every rank and keeps each
rank's part: the expert slice of its EP rank, then the dim-0 chunk of its FSDP shard. A run saved at
N ranks therefore resumes at M ranks (or in one process), and ``OUT/final/`` is the plain HF layout.

Cost: rank 0 holds one full copy of the model and the optimizer moments in CPU memory while it
writes, and every rank reads the whole checkpoint when it resumes; fine up to a few billion
parameters. Past that, torch.distributed.checkpoint (sharded files) is the tool.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from ..state import load_training_state, save_training_checkpoint
from .dist import DistContext
from .expert_parallel import ExpertParallelExperts


def _ep_owner(model: nn.Module, name: str) -> ExpertParallelExperts | None:
    """The EP experts module holding tensor ``name`` (a state-dict key), if any."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return owner if isinstance(owner, ExpertParallelExperts) else None


def _reshard(model: nn.Module) -> None:
    # The root keeps its weights unsharded after a forward (no backward follows in evaluation);
    # gather and load both work on the sharded parameters.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def gather_full(t: torch.Tensor, ep: ExpertParallelExperts | None) -> torch.Tensor:
    """The full tensor behind this rank's piece ``t`` (collective: every rank calls it, in the same order)."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    if ep is not None:
        parts = [torch.empty_like(full) for _ in range(ep.ep_size)]
        dist.all_gather(parts, full.contiguous(), group=ep.group)
        full = torch.cat(parts, dim=0)
    return full.detach().cpu()


def shard_like(full: torch.Tensor, like: torch.Tensor, ep: ExpertParallelExperts | None) -> torch.Tensor:
    """This rank's piece of ``full``, laid out like ``like`` (a parameter or optimizer state); no communication."""
    if ep is not None:
        full = full[ep.first: ep.first + ep.n_local]
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)   # every rank holds ``full``: slice locally
    return full.to(like.device, like.dtype)


def plain_model(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A single-device :class:`~dsv3.model.Transformer` that takes over the gathered tensors (no copy)."""
    from ...model import Transformer
    with torch.device("meta"):  # no weights allocated: the gathered ones are assigned in
        model = Transformer(config)
    model.load_state_dict(state, assign=True)
    return model


class FullOptimizerView:
    """What the checkpoint writer reads from an optimizer (``state_dict()``), over gathered tensors."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class ShardingOptimizerView:
    """Takes a full (single-process) optimizer state dict and loads each rank's shard of it."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        self.optimizer, self.model = optimizer, model

    def load_state_dict(self, full: dict) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = {}
        for idx, st in full["state"].items():
            p = params[int(idx)]
            ep = _ep_owner(self.model, names[id(p)])
            state[idx] = {k: shard_like(v, p, ep) if k != "step" else v for k, v in st.items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict at full size, on CPU (collective)."""
    _reshard(model)
    return {name: gather_full(t, _ep_owner(model, name)) for name, t in model.state_dict().items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state dict a single process would have: ``{"state": {index: {...}}, "param_groups"}``."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = optimizer.state_dict()["param_groups"]
    state = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for idx, p in enumerate(params):
        st = optimizer.state.get(p)
        if not st:
            continue
        ep = _ep_owner(model, names[id(p)])
        state[idx] = {k: gather_full(v, ep) if torch.is_tensor(v) and v.dim() > 0 else v
                      for k, v in st.items()}
    return {"state": state, "param_groups": groups}


def save_parallel_checkpoint(ctx: DistContext, out_dir: Path, name: str, model: nn.Module, tokenizer,
                             optimizer: torch.optim.Optimizer, trainer_state: dict) -> Path:
    """Gather and write ``out_dir/name`` in the single-process layout (rank 0 writes; all ranks call it)."""
    model_state = full_model_state(model)
    optim_state = full_optimizer_state(model, optimizer)
    path = Path(out_dir) / name
    if ctx.is_main:
        path = save_training_checkpoint(out_dir, name, plain_model(model.config, model_state), tokenizer,
                                        FullOptimizerView(optim_state), dict(trainer_state, world_size=ctx.world_size))
    del model_state, optim_state
    ctx.barrier()  # nobody moves on (or deletes older checkpoints) before the new one is complete
    return path


@torch.no_grad()
def load_full_model_state(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict (e.g. ``load_pretrained(ckpt).state_dict()``) into a parallelized model."""
    _reshard(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(full))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    model.load_state_dict({n: shard_like(full[n], t, _ep_owner(model, n)) for n, t in own.items()})


def load_parallel_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Resume a parallelized run from any checkpoint (written at any world size): weights, optimizer, RNG.

    Returns the trainer state (step, data position, run config).
    """
    from ...checkpoint import load_pretrained
    loaded = load_pretrained(path, dtype=torch.float32)
    load_full_model_state(model, loaded.state_dict())
    del loaded
    return load_training_state(path, ShardingOptimizerView(optimizer, model))
