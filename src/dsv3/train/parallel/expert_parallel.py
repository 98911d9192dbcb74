"""Expert parallelism: the routed experts of every MoE layer sharded over an EP process group.

With an EP group of ``ep`` ranks, rank ``r`` of the group holds experts
``[r * E/ep, (r + 1) * E/ep)`` (contiguous, so router group ``g`` of ``n_group = ep`` groups is
exactly the experts of EP rank ``g``). One MoE forward on each rank:

    route locally         topk [T, k]  (the router, shared experts and attention stay data parallel)
    dispatch              all_to_all_single: every (token, slot) row goes to the rank owning its expert
    compute               each local expert runs on the rows it received, from all ranks
    combine               all_to_all_single back, then sum_k gate_k * expert_k(x) on the token's own rank

Split sizes vary per step (they are whatever the router chose), so the counts are exchanged first
with one small all-to-all. The gate weight is applied after the return trip, so only activations
travel; gradients flow back through the same two all-to-alls in reverse. No token is dropped and
an expert that gets no rows still takes part in the graph (its gradient is zero, never missing), so
every rank reduces the same set of gradients.

Node-limited routing (DeepSeek-V3 §3.2 / §2.1.2) is the router's group rule with ``n_group`` = EP
ranks (or nodes): each token then reaches at most ``topk_group`` ranks; see :func:`ranks_per_token`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...model.moe import MoE, RoutedExperts
from .dist import DistributedError


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with variable split sizes; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty((sum(ctx.send), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), output_split_sizes=ctx.send,
                               input_split_sizes=ctx.recv, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group=None) -> torch.Tensor:
    """Send ``x[sum(send[:j]) : sum(send[:j+1])]`` to rank j of ``group``; receive ``recv[j]`` rows from
    rank j, concatenated in rank order. Differentiable."""
    return _AllToAll.apply(x, list(send), list(recv), group)


class ExpertParallelExperts(nn.Module):
    """This rank's share of the routed experts: stacked gate/up ``[E_local, I, D]``, down ``[E_local, D, I]``.

    Same parameter names as :class:`~dsv3.model.moe.RoutedExperts` (a slice along dim 0) and the same
    call, ``(x [T, D], weights [T, k], topk [T, k]) -> [T, D]``, with global expert ids in ``topk``.
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int, group=None):
        super().__init__()
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if n_experts % self.ep_size:
            raise ValueError(f"n_routed_experts={n_experts} is not divisible by the expert-parallel size "
                             f"{self.ep_size}; every EP rank must hold the same number of experts")
        self.n_experts = n_experts
        self.n_local = n_experts // self.ep_size
        self.first = self.ep_rank * self.n_local           # global id of this rank's first expert
        self.gate_proj = nn.Parameter(torch.empty(self.n_local, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(self.n_local, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(self.n_local, hidden_size, intermediate_size))

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: RoutedExperts, group=None) -> ExpertParallelExperts:
        """Take this rank's slice of a full (identical on every rank) :class:`RoutedExperts`."""
        E, I, D = experts.gate_proj.shape
        m = cls(E, D, I, group)
        m.to(device=experts.gate_proj.device, dtype=experts.gate_proj.dtype)
        rows = slice(m.first, m.first + m.n_local)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(m, name).copy_(getattr(experts, name)[rows])
        return m

    def extra_repr(self) -> str:
        return (f"experts {self.first}..{self.first + self.n_local - 1} of {self.n_experts} "
                f"(EP rank {self.ep_rank} of {self.ep_size})")

    def forward(self, x: torch.Tensor, weights: torch.Tensor, topk: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights/topk [T, k] (global expert ids) -> sum_k weight * expert_k(x)  [T, D]."""
        T, k = topk.shape
        ep, n_local = self.ep_size, self.n_local
        flat = topk.flatten()
        order = flat.argsort(stable=True)                   # slots sorted by expert = by destination rank
        token = order // k
        counts = torch.bincount(flat, minlength=self.n_experts)                       # [E]
        # how many rows each rank sends to each of our experts: [source rank, local expert]
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(ep, n_local)
        send = counts.view(ep, n_local).sum(1).tolist()
        recv = recv_counts.sum(1).tolist()

        # dispatch: rows arrive grouped by source rank, and by expert within each source
        received = all_to_all(x.index_select(0, token), send, recv, self.group)        # [N, D]
        expert_of_row = torch.arange(n_local, device=x.device).repeat(ep).repeat_interleave(recv_counts.flatten())
        by_expert = expert_of_row.argsort(stable=True)                                  # regroup by expert
        rows = received.index_select(0, by_expert)
        per_expert = recv_counts.sum(0).tolist()
        outs = []
        # Every local expert runs, even on zero rows: its parameters stay in the graph (zero gradient),
        # so all ranks reduce the same gradients whatever the routing.
        for chunk, w_gate, w_up, w_down in zip(rows.split(per_expert), self.gate_proj.unbind(0),
                                               self.up_proj.unbind(0), self.down_proj.unbind(0)):
            h = F.silu(chunk @ w_gate.T) * (chunk @ w_up.T)                              # [n, I]
            outs.append(h @ w_down.T)                                                     # [n, D]
        y = torch.cat(outs).to(x.dtype)
        # back to arrival order, then home: the inverse of the regrouping and of the dispatch
        y = y.index_select(0, by_expert.argsort())
        y = all_to_all(y, recv, send, self.group)                                        # [T*k, D]

        # combine on the token's own rank, the gate weight of each slot in the same sorted order
        route_w = weights.flatten()[order].unsqueeze(-1)                                 # [T*k, 1] fp32
        out = torch.zeros_like(x)
        out.index_add_(0, token, (y * route_w).to(out.dtype))
        return out


def apply_expert_parallel(model: nn.Module, group=None) -> int:
    """Replace the routed experts of every MoE layer of ``model`` (main and MTP) by this rank's EP shard.

    Call it on a model whose weights are identical on every rank (same seed or same checkpoint),
    before FSDP. Returns the number of MoE layers converted.
    """
    n = 0
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if type(module.experts) is not RoutedExperts:  # e.g. FP8 training experts: their GEMMs would be lost
            raise DistributedError(f"{name}.experts is a {type(module.experts).__name__}; expert parallelism "
                                   "shards plain RoutedExperts only (use --ep 1 with --fp8)")
        module.experts = ExpertParallelExperts.from_experts(module.experts, group)
        n += 1
    return n


def expert_owner(model: nn.Module, name: str) -> ExpertParallelExperts | None:
    """The EP experts module holding tensor ``name`` (a parameter or state-dict key of ``model``), if any."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return owner if isinstance(owner, ExpertParallelExperts) else None


def ranks_per_token(topk: torch.Tensor, n_experts: int, ep_size: int) -> torch.Tensor:
    """topk [T, k] global expert ids -> [T] how many distinct EP ranks each token is dispatched to."""
    rank = topk // (n_experts // ep_size)                                               # [T, k]
    hit = torch.zeros(topk.shape[0], ep_size, dtype=torch.bool, device=topk.device)
    return hit.scatter_(1, rank, True).sum(1)


def max_ranks_per_token(n_experts: int, n_group: int, topk_group: int, top_k: int, ep_size: int) -> int:
    """The most EP ranks one token can reach under the router's group rule (node-limited routing).

    Router group g holds experts ``[g*E/n_group, (g+1)*E/n_group)`` and EP rank r holds
    ``[r*E/ep, (r+1)*E/ep)``. When one divides the other, each kept group touches at most
    ``ceil(ep / n_group)`` ranks, so a token reaches at most ``topk_group * ceil(ep / n_group)`` of them;
    with ``n_group == ep`` that is the paper's "at most M nodes" with ``M = topk_group``.
    """
    bound = min(ep_size, top_k)
    if n_group > 1 and (n_group % ep_size == 0 or ep_size % n_group == 0):
        bound = min(bound, topk_group * -(-ep_size // n_group))
    return bound
