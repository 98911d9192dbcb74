"""The one step that makes the single-device model data and expert parallel, applied from outside it.

    model = Transformer(config)                  # identical on every rank (same seed / checkpoint)
    plan = parallelize(model, ctx, ep=8)         # in place; returns the meshes it used

Layout for ``W`` ranks and an expert-parallel size ``ep`` (``W % ep == 0``):

- ``dp`` mesh, all ``W`` ranks: FSDP2 (``fully_shard``) shards every non-expert parameter (attention,
  dense MLPs, shared experts, routers, norms, embedding, head, MTP) over all ranks, block by block
  and then the root, so each block's weights are all-gathered just before it runs and its gradients
  reduce-scattered (averaged) right after its backward.
- ``(ep_rep, ep)`` mesh: EP groups are runs of ``ep`` consecutive ranks (one node, when ``ep`` is
  the GPUs per node). Inside a group the routed experts are split (``ExpertParallelExperts``);
  the ``W / ep`` ranks holding the same expert slice (``ep_rep``) shard it further with FSDP2.
  Expert gradients arrive summed over the EP group (the all-to-all's backward), so the experts'
  FSDP divides by ``W`` instead of its own size: every gradient is then the mean over the global batch.
- On CUDA a mixed-precision policy (bf16 parameters for compute, fp32 gradient reduction, fp32
  master weights); routers keep fp32 parameters, as the model computes routing in fp32.

With ``ep == 1`` this is plain FSDP2 data parallelism (experts sharded like any other weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ...model.moe import MoE
from .dist import DistContext, DistributedError
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel


@dataclass
class ParallelPlan:
    """The meshes a parallelized model lives on (needed again to save, load and clip it)."""

    world_size: int
    ep: int
    dp_mesh: DeviceMesh                  # all ranks: FSDP of the non-expert weights
    ep_mesh: DeviceMesh                  # (ep_rep, ep): EP groups and the replicas of each expert slice
    mixed_precision: bool

    @property
    def ep_group(self):
        return self.ep_mesh["ep"].get_group()


def check_ep(config, world_size: int, ep: int) -> None:
    """Clear errors for an expert-parallel size that can't work with this job and model."""
    if ep < 1:
        raise DistributedError(f"--ep must be >= 1, got {ep}")
    if world_size % ep:
        raise DistributedError(f"--ep {ep} must divide the number of ranks ({world_size})")
    if ep > 1 and config.n_routed_experts % ep:
        raise DistributedError(f"--ep {ep} must divide n_routed_experts ({config.n_routed_experts})")
    if ep > 1 and not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        raise DistributedError(f"--ep {ep}: the model has no MoE layer to shard")


def _blocks(model: nn.Module) -> list[nn.Module]:
    """Main transformer blocks, then each MTP module's block."""
    return list(model.layers) + [m.block for m in model.mtp]


def parallelize(model: nn.Module, ctx: DistContext, ep: int = 1, mixed_precision: bool | None = None,
                reshard_after_forward: bool = True) -> ParallelPlan:
    """Shard ``model`` (a :class:`~dsv3.model.Transformer` on ``ctx.device``, same weights on every rank)
    in place: expert parallelism over groups of ``ep`` ranks, then FSDP2 over all ranks.

    ``mixed_precision``: bf16 compute with fp32 reduction (default: on for CUDA, off on CPU).
    ``reshard_after_forward``: free each block's gathered weights after its forward (re-gather them
    for backward); False trades memory for one all-gather less per block.
    """
    W = ctx.world_size
    check_ep(model.config, W, ep)
    if mixed_precision is None:
        mixed_precision = ctx.device.type == "cuda"
    kind = ctx.device.type
    dp_mesh = init_device_mesh(kind, (W,), mesh_dim_names=("dp",))
    ep_mesh = init_device_mesh(kind, (W // ep, ep), mesh_dim_names=("ep_rep", "ep"))
    plan = ParallelPlan(W, ep, dp_mesh, ep_mesh, mixed_precision)

    if mixed_precision:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # experts: bf16 weights, but their fp32 gate weights (an input) must not be cast down
        experts_mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                          cast_forward_inputs=False)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)
    else:
        mp = experts_mp = fp32 = MixedPrecisionPolicy()
    if ep > 1:
        apply_expert_parallel(model, plan.ep_group)

    for block in _blocks(model):
        moe = block.mlp if isinstance(block.mlp, MoE) else None
        if moe is not None and isinstance(moe.experts, ExpertParallelExperts):
            rep_mesh = ep_mesh["ep_rep"]
            fully_shard(moe.experts, mesh=rep_mesh, mp_policy=experts_mp, reshard_after_forward=reshard_after_forward)
            # summed over the EP group by the all-to-all backward; FSDP sums over the replicas: / W overall
            moe.experts.set_gradient_divide_factor(float(W))
            if rep_mesh.size() > 1 and "gloo" in ctx.backend:
                moe.experts.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        if moe is not None and mixed_precision:
            fully_shard(moe.gate, mesh=dp_mesh, mp_policy=fp32, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root (embedding, head, final norm, MTP glue) stays gathered between forward and backward:
    # the head is the last thing forward uses and the first backward needs.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return plan


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, ctx: DistContext) -> float:
    """Clip the global gradient norm of a parallelized model to ``max_norm``; returns the norm before.

    After :func:`parallelize` every parameter element lives on exactly one rank (FSDP shards are
    disjoint, and so are EP slices x their FSDP shards), so the global squared norm is one sum of
    local squares, all-reduced. Same rule as ``torch.nn.utils.clip_grad_norm_`` (scale by
    ``max_norm / (norm + 1e-6)`` when that is below 1); also correct when experts and the rest live
    on different meshes, which that function cannot mix.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for g in grads:
        sq += _local(g).detach().float().square().sum()
    dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)     # exactly torch's rule (a non-finite norm poisons
    for g in grads:                                        # the gradients; the trainer then skips the step)
        _local(g).mul_(coef.to(g.dtype))
    return float(norm)
