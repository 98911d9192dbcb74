"""Pipeline parallelism on ``torch.distributed.pipelining``, applied to the single-device model from outside.

    dsv3 train --pp P [--pp-schedule 1f1b|interleaved|zbv|dualpipev] [--microbatches M]   (under torchrun)

The reference :class:`~dsv3.model.Transformer` is built whole on every rank (same seed or checkpoint),
then :func:`split_model` cuts it into *stage modules* that hold references to its own submodules (no
copy of a weight, no second forward of a block: each stage calls the model's ``Block`` modules in
order) and prunes every submodule this rank does not own from the model (``model.layers[i]`` becomes
an ``nn.Identity``, ``embed_tokens``/``norm``/``lm_head`` ``None``, ``mtp`` empty), so
``model.parameters()`` and ``model.state_dict()`` are this rank's part under the single-process names.
The pipeline runtime is PyTorch's: :class:`PipelineStage` and one of its schedules.

Stages and placement (``P`` pipeline ranks, ``S`` stages):

- ``1f1b``: ``S = P``, stage ``s`` on rank ``s`` (``Schedule1F1B``).
- ``interleaved``: ``S = 2P`` virtual stages, looped: stage ``s`` on rank ``s % P``
  (``ScheduleInterleaved1F1B``).
- ``zbv`` / ``dualpipev``: ``S = 2P``, V-shaped: rank ``r`` holds stages ``r`` and ``2P-1-r``
  (``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV``; backward split into input and weight parts).

The main layers are split as evenly as possible (``num_hidden_layers >= S``; left-over layers go to
the middle stages, since the first stage also embeds and the last runs the head and the MTP blocks).

Where the head, MTP and embedding live, and why. The first stage embeds the tokens. The last stage
holds the final norm, ``lm_head`` and the MTP modules, and computes the whole per-microbatch loss
itself (main CE + lambda * mean MTP CE, fused head + CE as in one process), so the schedules'
split backward (input grads, then weight grads of ``stage.submod``) sees every weight the loss
uses. MTP depth k needs the embedding of tokens ``i+k``, from the table the first stage owns (DeepSeek-V3
shares it between the main model and MTP). The last stage receives the window as a keyword
argument (the schedules pass ``step`` kwargs to the local stages, the activations only carry ``h``)
and looks the tokens up itself:

- V-shaped schedules put the first and last stage on the same rank (this is why DualPipe is a V): both stage
  modules hold the *same* ``nn.Embedding``; its gradient accumulates from both uses, as in one process.
- Otherwise the last stage's rank holds a read-only copy of the table. After the backward its
  gradient is summed into the owner's (an all-reduce over the pair {first-stage rank, last-stage
  rank}); the owner's AdamW updates the one real parameter, and the copy is refreshed from it
  (a broadcast over the pair) before the next forward. The copy is in no optimizer and no
  checkpoint. This costs one table-sized all-reduce and broadcast per step instead of sending the
  ``[mb, S, D]`` embeddings through every stage for every microbatch. Tied input/output embeddings
  (``tie_word_embeddings``) are refused (the head and the table would live on different ranks).

Losses equal one process. The schedules run ``M`` microbatches of ``b = B / M`` sequences; every
term of the single-process loss is a mean over sequences (CE and MTP over equally many tokens per
sequence, the sequence-wise balance loss per sequence), so each microbatch contributes ``term / M``
(``scale_grads=False``: the loss is already scaled). The sequence-wise balance loss of a router lives
in its stage: a stage that is not the last attaches its routers' ``alpha * L_seq / M`` to its output
activation with an identity autograd function whose backward feeds the loss a gradient of 1, so the
schedule's backward carries it; the last stage adds its own to the loss. The classic batch-wise aux
loss (``--aux-loss-alpha``) is not a per-sequence mean and is refused with ``--pp``.

Aux-loss-free biases. Each stage sums its routers' expert counts over the step's microbatches; the
runner all-reduces the counts of *every* router (zeros where a rank does not hold it) over all
ranks (pipeline stages x data-parallel replicas), which is exactly the single-process count of the
global batch, and each rank applies the update to the routers it holds. Routers of a stage with
replicas are updated identically on each.

Data parallel: ``world = pp x dp`` on a ``(dp, pp)`` device mesh, rank ``r`` is pipeline rank
``r % pp`` of replica ``r // pp`` (a replica's stages adjacent: on GPUs, one node's NVLink). With
``dp > 1`` each replica trains its ``B / dp`` slice and every stage is FSDP2-sharded over its ``dp``
replicas (each block a unit, then the stage); the schedules defer the reduce-scatter to the last
backward of a step (``PipelineStage`` drives FSDP), which averages the gradients over the replicas.
The embedding copy is sharded like the table, so the pair's sums run on matching shards; FSDP2
cannot put one module under two roots, so with ``dp > 1`` the V's rank 0 uses a (local) copy too.

Expert parallel (``--ep E``, ``E`` dividing ``dp``): each stage's MoE layers run expert parallel over
that stage's replicas, the ``dp`` ranks holding the same pipeline rank. The replicas are cut into EP
groups of ``E`` consecutive replicas, on a ``(ep_rep, ep, pp)`` mesh (rank ``r``: pipeline rank
``r % pp``, replica ``d = r // pp`` = EP rank ``d % E`` of group ``d // E``); as in
:mod:`~.parallelize`, EP rank ``e`` keeps experts ``[e E_n/E, (e+1) E_n/E)`` and the ``dp / E``
replicas holding the same slice (``ep_rep``) shard it with FSDP2. A stage's all-to-alls run on its
own EP group only; every replica of a pipeline rank runs the same schedule, so they meet in the same
order. Under the split backward of zbv / dualpipev the all-to-alls lie on the path to the stage's
input, so they run in the input-gradient pass; the weight pass only multiplies locally. Expert
gradients arrive summed over the EP group (the all-to-all's backward), FSDP2 sums over ``ep_rep``
and divides by ``dp``: the mean over the global batch, like every other gradient. Routing stays on
the token's rank, so the routers' counts, summed over all ranks as above, are still the global
batch's. Checkpoints present each expert piece as a piece of the full ``[E_n, ...]`` tensor (on the
stage's ``(ep, ep_rep)`` mesh, :func:`~.checkpoint.expert_view`), so an EP pipeline checkpoint
resumes at any layout.

Checkpoints go through the sharded checkpoint of ``checkpoint.py`` (torch.distributed.checkpoint):
each rank's pruned model holds its stages' tensors under the single-process names, so DCP saves the
union and any layout (another pp x dp, FSDP, one process) resumes it; ``final/`` is also exported as
the plain HF model, gathered on rank 0. A single-process checkpoint resumes under ``--pp`` (every rank
reads it whole and keeps its tensors and AdamW state, matched by name).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ...model import Transformer
from ...model.moe import MoE, Router
from .dist import DistContext, DistributedError
from .expert_parallel import ExpertParallelExperts, apply_expert_parallel, expert_owner
from .training import ParallelTraining

SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipev")


# ------------------------------------------------------------------------------------- theory
def stages_per_rank(schedule: str) -> int:
    """Virtual stages each pipeline rank holds under ``schedule``."""
    check_schedule(schedule)
    return 1 if schedule == "1f1b" else 2


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise DistributedError(f"--pp-schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def bubble_fraction(schedule: str, pp: int, microbatches: int, f: float = 1.0, b: float = 1.0,
                    w: float = 1.0) -> float:
    """The idle fraction of a pipeline step in theory, for ``pp`` ranks and ``microbatches`` microbatches.

    ``f``, ``b``, ``w``: one microbatch's forward, input-backward and weight-backward time on one
    rank's whole slice of the model (a full backward is ``b + w``); equal by default (the usual
    assumption, ``B ~ W ~ F`` for a transformer layer). With per-rank idle time ``T_idle`` and work
    ``M (f + b + w)``, the fraction is ``T_idle / (T_idle + M (f + b + w))``, where ``T_idle`` is

    - 1f1b: ``(P-1)(f+b+w)`` (Narayanan et al. 2021);
    - interleaved, 2 virtual stages per rank: ``(P-1)(f+b+w)/2``;
    - zbv: ``(P-1)(f+b-2w)/2`` clamped at 0 -- zero with equal times (Qi et al. 2024, ZB-V);
    - dualpipev: ``(P/2-1)(f&b+b-3w)/2`` clamped at 0, with ``f&b = f+b`` (no compute/communication
      overlap; the DualPipe README's formula with per-chunk times, i.e. half a rank's slice).
    """
    check_schedule(schedule)
    P, M = pp, microbatches
    if P < 1 or M < 1:
        raise ValueError(f"pp and microbatches must be >= 1, got {P}, {M}")
    if P == 1:
        return 0.0
    if schedule == "1f1b":
        idle = (P - 1) * (f + b + w)
    elif schedule == "interleaved":
        idle = (P - 1) * (f + b + w) / 2
    elif schedule == "zbv":
        idle = max(0.0, (P - 1) * (f + b - 2 * w) / 2)
    else:
        idle = max(0.0, (P / 2 - 1) * ((f + b) + b - 3 * w) / 2)
    return idle / (idle + M * (f + b + w))


# ------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class PipelineLayout:
    """Which stage holds which layers and lives on which pipeline rank."""

    pp: int
    schedule: str
    stage_layers: tuple[tuple[int, ...], ...]      # stage -> main-layer indices
    stage_rank: tuple[int, ...]                     # stage -> pipeline rank

    @property
    def n_stages(self) -> int:
        return len(self.stage_layers)

    def local_stages(self, pp_rank: int) -> list[int]:
        """The stages of pipeline rank ``pp_rank``, in stage order (what the schedules expect)."""
        return [s for s, r in enumerate(self.stage_rank) if r == pp_rank]


def plan_layout(num_layers: int, pp: int, schedule: str) -> PipelineLayout:
    """Split ``num_layers`` main layers over the stages of ``schedule`` at ``pp`` pipeline ranks."""
    n = pp * stages_per_rank(schedule)
    if num_layers < n:
        raise DistributedError(f"--pp {pp} with --pp-schedule {schedule} needs {n} stages, but the model has "
                               f"only {num_layers} layers (at least one per stage)")
    sizes = [num_layers // n] * n
    extra = num_layers - sum(sizes)
    middle_out = sorted(range(n), key=lambda s: (abs(s - (n - 1) / 2), s))   # middle stages first
    for s in middle_out[:extra]:
        sizes[s] += 1
    layers, start = [], 0
    for size in sizes:
        layers.append(tuple(range(start, start + size)))
        start += size
    if schedule == "1f1b":
        ranks = list(range(pp))
    elif schedule == "interleaved":
        ranks = [s % pp for s in range(n)]
    else:
        ranks = [s if s < pp else n - 1 - s for s in range(n)]
    return PipelineLayout(pp, schedule, tuple(layers), tuple(ranks))


def check_pipeline(config, world_size: int, pp: int, schedule: str, microbatches: int, batch_size: int,
                   ep: int = 1, aux_loss_alpha: float = 0.0, fp8: bool = False) -> int:
    """Clear errors for a pipeline set-up that can't work; returns the data-parallel size."""
    check_schedule(schedule)
    if pp < 1:
        raise DistributedError(f"--pp must be >= 1, got {pp}")
    if world_size % pp:
        raise DistributedError(f"--pp {pp} must divide the number of ranks ({world_size}); world = pp x dp")
    dp = world_size // pp
    if ep < 1:
        raise DistributedError(f"--ep must be >= 1, got {ep}")
    if ep > 1:
        if dp % ep:
            raise DistributedError(f"--ep {ep} with --pp {pp}: each stage's experts are split over its data-parallel "
                                   f"replicas, so --ep must divide dp = {world_size} ranks / --pp {pp} = {dp}")
        if config.n_routed_experts % ep:
            raise DistributedError(f"--ep {ep} must divide n_routed_experts ({config.n_routed_experts})")
        if not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
            raise DistributedError(f"--ep {ep}: the model has no MoE layer to shard")
    if fp8:
        raise DistributedError("--fp8 does not compose with --pp yet")
    if aux_loss_alpha:
        raise DistributedError("--aux-loss-alpha (the batch-wise aux loss) is not a per-sequence mean and would "
                               "change with the microbatch split; with --pp use --seq-aux-alpha")
    if config.tie_word_embeddings:
        raise DistributedError("--pp does not support tie_word_embeddings (embedding and head on different stages)")
    plan_layout(config.num_hidden_layers, pp, schedule)
    if batch_size % dp:
        raise DistributedError(f"--batch-size {batch_size} is the global batch; it must be divisible by the "
                               f"data-parallel size {dp} (= {world_size} ranks / --pp {pp})")
    local = batch_size // dp
    if microbatches < 1 or local % microbatches:
        raise DistributedError(f"--microbatches {microbatches} must divide the per-replica batch {local} "
                               f"(--batch-size {batch_size} / dp {dp})")
    n = pp * stages_per_rank(schedule)
    need = {"1f1b": pp, "interleaved": 1, "zbv": n, "dualpipev": n}[schedule]
    if microbatches < need:   # 1f1b, dualpipev: torch's minimum; zbv: its V needs one per stage to fill
        raise DistributedError(f"--pp-schedule {schedule} at --pp {pp} needs at least {need} microbatches, "
                               f"got {microbatches}")
    rounds = max(1, microbatches // pp)
    if schedule == "interleaved" and microbatches % rounds:
        raise DistributedError(f"--pp-schedule interleaved runs microbatches in rounds of about --pp ({pp}): "
                               f"--microbatches {microbatches} must be a multiple of {rounds} rounds")
    return dp


def default_microbatches(pp: int, local_batch: int) -> int:
    """The smallest count >= 2 x pp dividing the per-replica batch (2 per stage for 1f1b, 1 per
    virtual stage otherwise: what ZB-V and DualPipeV need to fill the V), else the batch itself (one
    sequence per microbatch; :func:`check_pipeline` then says if that is too few)."""
    for m in range(2 * pp, local_batch + 1):
        if local_batch % m == 0:
            return m
    return local_batch


# ------------------------------------------------------------------------------------- stages
class AttachLoss(torch.autograd.Function):
    """``h`` unchanged in forward; in backward, gradient 1 to the scalar ``aux`` (as if it had been
    added to the final loss). Carries a stage's balance losses through the pipeline's backward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return h.clone()   # not a view: the schedules detach stage outputs in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


@dataclass
class LossSettings:
    """The loss terms' weights (from the TrainConfig) and what divides them: the number of pipeline
    microbatches in an optimizer step (schedule microbatches x grad_accum)."""

    mtp_weight: float
    seq_aux_alpha: float
    divisor: int
    fused_ce: bool = True


class StageModule(nn.Module):
    """One pipeline stage of a :class:`Transformer`: references to its embedding (first stage), its
    run of blocks, and (last stage) the final norm, head and MTP modules.

    ``forward(x, window=None)``: first stage ``x = token ids [b, S]``, else the previous stage's
    hidden states ``[b, S, D]``; returns the hidden states, or on the last stage the microbatch's
    loss ``[1]`` (already divided by the step's microbatch count). ``window [b, S+1]`` (last stage only) is
    the training window: its tokens for MTP, its shifted tokens as targets.
    """

    def __init__(self, model: Transformer, layer_ids, first: bool, last: bool, router_names: dict,
                 losses: LossSettings, embed: nn.Embedding | None = None):
        super().__init__()
        self.first, self.last, self.losses = first, last, losses
        self.rope = model.rope
        self.embed_tokens = embed if embed is not None else (model.embed_tokens if first or last else None)
        self.layers = nn.ModuleList(model.layers[i] for i in layer_ids)
        self.layer_ids = tuple(layer_ids)
        if last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self.routers = [(router_names[id(m)], m) for m in self.modules() if isinstance(m, Router)]
        self.evaluating = False   # set by the runner: record per-microbatch eval statistics
        self.reset_records()

    def reset_records(self) -> None:
        """Forget the step's summed expert counts and logged loss values."""
        self.counts: dict[str, torch.Tensor] = {}
        self.logged: dict[str, float] = {}
        self.eval_stats: list[dict] = []

    def _log(self, key: str, value: float) -> None:
        self.logged[key] = self.logged.get(key, 0.0) + value

    def forward(self, x: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed_tokens(x) if self.first else x                       # [b, S, D]
        b, S = h.shape[:2]
        positions = torch.arange(S, device=h.device)
        cos, sin = self.rope(positions)
        for layer in self.layers:
            h = layer(h, cos, sin)
        if self.last:
            loss = self._loss(h, window, cos, sin)
        aux = self._balance(b)
        if self.last:   # [1]: the schedule concatenates the last stage's outputs over microbatches
            return (loss + aux if aux is not None else loss).reshape(1)
        h = h.float()   # the activations sent on are fp32 (the stages' static shapes), also under autocast
        return AttachLoss.apply(h, aux) if aux is not None else h

    def _balance(self, b: int) -> torch.Tensor | None:
        """This stage's routers: sum their expert counts; their sequence-wise balance loss / M."""
        from ..balance import sequence_balance_loss
        total = None
        for name, r in self.routers:
            if r.last_counts is None:
                continue
            c = r.last_counts.detach()
            self.counts[name] = c.clone() if name not in self.counts else self.counts[name] + c
            if self.losses.seq_aux_alpha and r.last_scores is not None:
                term = self.losses.seq_aux_alpha * sequence_balance_loss(r.last_scores, r.last_topk, b)
                total = term if total is None else total + term
        if total is None:
            return None
        total = total / self.losses.divisor
        self._log("balance_loss", float(total.detach()))
        self._log("loss", float(total.detach()))
        return total

    def _loss(self, h: torch.Tensor, window: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The last stage: main CE + lambda * mean MTP CE over this microbatch, / M (as compute_losses)."""
        if window is None:
            raise RuntimeError("the last pipeline stage needs the training window (window= keyword)")
        x, y = window[:, :-1], window[:, 1:]
        hn = self.norm(h)
        # Transformer's own MTP code, run on this stage: it reads ``self.mtp`` and ``self.embed_tokens``
        mtp_h = Transformer.mtp_hidden_states(self, x, hn, cos, sin)
        head = self.lm_head.weight
        if self.losses.fused_ce and torch.is_grad_enabled() and not self.evaluating:
            from ...kernels.linear_cross_entropy import linear_cross_entropy
            lm = linear_cross_entropy(hn, head, y)
            mtp = [linear_cross_entropy(hk, head, y[:, k:]) for k, hk in enumerate(mtp_h, start=1)]
            mtp_pred = None
        else:
            logits = self.lm_head(hn).float()
            V = logits.shape[-1]
            lm = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            mtp_logits = [self.lm_head(hk).float() for hk in mtp_h]
            mtp = [F.cross_entropy(lg.reshape(-1, V), y[:, k:].reshape(-1)) for k, lg in enumerate(mtp_logits, start=1)]
            mtp_pred = mtp_logits[0].argmax(-1) if mtp_logits else None
        M = self.losses.divisor
        total = lm
        self._log("lm_loss", float(lm.detach()) / M)
        if mtp:
            m = torch.stack(mtp).mean()
            total = total + self.losses.mtp_weight * m
            self._log("mtp_loss", float(m.detach()) / M)
        self._log("loss", float(total.detach()) / M)
        if self.evaluating:   # per-microbatch statistics (evaluation)
            stat = {"lm_sum": float(lm) * y.numel(), "n_tok": y.numel()}
            if mtp_pred is not None:
                stat.update(mtp_hit=int((mtp_pred == window[:, 2:]).sum()), mtp_n=mtp_pred.numel())
            self.eval_stats.append(stat)
        return total / M


def _router_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules() if isinstance(m, Router)}


def split_model(model: Transformer, layout: PipelineLayout, pp_rank: int, losses: LossSettings,
                embed_copy: bool) -> list[StageModule]:
    """This rank's stage modules (in stage order), and ``model`` pruned to what they hold.

    ``embed_copy``: the last stage is on this rank but the first is not, so it gets a read-only copy
    of the embedding table (see the module docstring).
    """
    names = _router_names(model)
    local = layout.local_stages(pp_rank)
    last = layout.n_stages - 1
    copy = None
    if embed_copy:
        w = model.embed_tokens.weight
        copy = nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            copy.weight.copy_(w)
    stages = [StageModule(model, layout.stage_layers[s], s == 0, s == last, names, losses,
                          embed=copy if s == last else None) for s in local]
    owned = {i for s in local for i in layout.stage_layers[s]}
    for i in range(len(model.layers)):
        if i not in owned:
            model.layers[i] = nn.Identity()
    if 0 not in local:
        model.embed_tokens = None
    if last not in local:
        model.norm, model.lm_head, model.mtp = None, None, nn.ModuleList()
    return stages


def _schedule_class(schedule: str):
    from torch.distributed.pipelining import (Schedule1F1B, ScheduleDualPipeV, ScheduleInterleaved1F1B,
                                              ScheduleZBVZeroBubble)
    return {"1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble,
            "dualpipev": ScheduleDualPipeV}[schedule]


# ------------------------------------------------------------------------------------- the runner
class PipelineTraining(ParallelTraining):
    """:class:`ParallelTraining` for ``--pp P``: pipeline stages x data-parallel replicas.

    The training loop calls the same methods; a training micro-batch (``grad_accum`` of them per step)
    is one :meth:`forward_backward` that runs the schedule over its ``M`` microbatches.
    """

    def __init__(self, ctx: DistContext, pp: int, schedule: str, microbatches: int | None, ep: int = 1):
        super().__init__(ctx, ep=ep)
        check_schedule(schedule)
        if pp < 1 or ctx.world_size % pp:
            raise DistributedError(f"--pp {pp} must divide the number of ranks ({ctx.world_size}); world = pp x dp")
        self.pp, self.schedule_name, self.requested_microbatches = pp, schedule, microbatches
        self.dp = ctx.world_size // pp
        self.pp_rank, self.dp_rank = ctx.rank % pp, ctx.rank // pp
        # (dp, pp) mesh: rank r = d * pp + p; "pp" groups a replica's stages, "dp" a stage's replicas
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh(ctx.device.type, (self.dp, pp), mesh_dim_names=("dp", "pp"))
        self.pp_group, self.dp_mesh = self.mesh["pp"].get_group(), self.mesh["dp"]
        self.stages: list[StageModule] = []
        self.schedule = None
        self.ep_group = self.rep_mesh = self.expert_view_mesh = None   # made by parallelize when ep > 1

    @classmethod
    def from_cfg(cls, cfg) -> PipelineTraining:
        """Join the torchrun job for a run of ``cfg`` (a TrainConfig with ``pp > 1``)."""
        from .dist import init_distributed, world_size_from_env
        if world_size_from_env() < cfg.pp:
            raise DistributedError(f"--pp {cfg.pp} needs at least {cfg.pp} processes; launch with "
                                   f"torchrun --nproc-per-node {cfg.pp} -m dsv3 train ...")
        return cls(init_distributed(cfg.device), cfg.pp, cfg.pp_schedule, cfg.microbatches, ep=cfg.ep)

    # ------------------------------------------------------------------ data and model
    def _local_batch_size(self, global_batch: int) -> int:
        if global_batch % self.dp:
            raise DistributedError(f"--batch-size {global_batch} is the global batch; it must be divisible by "
                                   f"the data-parallel size ({self.dp})")
        return global_batch // self.dp

    def packed_batches(self, dataset, batch_size: int, seq_len: int, seed: int):
        """This replica's slice of each global batch (the pipeline ranks of a replica read the same)."""
        from ...data import PackedBatches
        return PackedBatches(dataset, self._local_batch_size(batch_size), seq_len, split="train", seed=seed,
                             rank=self.dp_rank, world_size=self.dp)

    def configure(self, cfg) -> None:
        """The run's settings (a TrainConfig: batch, sequence length, loss weights) for :meth:`parallelize`."""
        if getattr(cfg, "batch_ramp", None):
            raise DistributedError("--batch-ramp does not compose with --pp (the schedule's microbatch shape is fixed)")
        if getattr(cfg, "compile", False):
            raise DistributedError("--compile does not compose with --pp")
        self.cfg = cfg

    def parallelize(self, model: nn.Module, log=print) -> nn.Module:
        """Split ``model`` into this rank's stages (pruning the rest) and build the schedule."""
        cfg = getattr(self, "cfg", None)
        if cfg is None:
            raise RuntimeError("PipelineTraining.configure(cfg) must come before parallelize")
        c = model.config
        local_batch = self._local_batch_size(cfg.batch_size)
        M = self.requested_microbatches or default_microbatches(self.pp, local_batch)
        check_pipeline(c, self.world_size, self.pp, self.schedule_name, M, cfg.batch_size, self.ep, cfg.aux_loss_alpha,
                       cfg.fp8)
        self.microbatches, self.seq_len, self.microbatch_size = M, cfg.seq_len, local_batch // M
        self.dtype = getattr(cfg, "dtype", "fp32")   # bf16 autocast where the run asks for it
        self.full_config = c
        self.all_routers = list(_router_names(model).values())
        layout = plan_layout(c.num_hidden_layers, self.pp, self.schedule_name)
        self.layout = layout
        first_rank, last_rank = layout.stage_rank[0], layout.stage_rank[-1]
        self.embed_pair = None
        if first_rank != last_rank:   # groups are created by every rank
            for d in range(self.dp):
                g = dist.new_group([d * self.pp + first_rank, d * self.pp + last_rank])
                if d == self.dp_rank:
                    self.embed_pair = g
        self.holds_first = self.pp_rank == first_rank
        self.holds_last = self.pp_rank == last_rank
        # FSDP2 can't put one module under two roots: with replicas the V's rank 0 uses a copy too
        embed_copy = self.holds_last and (not self.holds_first or self.dp > 1)
        self.embed_local = embed_copy and self.holds_first   # owner and copy on this rank
        losses = LossSettings(cfg.mtp_weight, cfg.seq_aux_alpha, M * cfg.grad_accum, cfg.fused_ce)
        self.stages = split_model(model, layout, self.pp_rank, losses, embed_copy)
        ep_note = ""
        if self.ep > 1:   # the pruned model: this rank's stages' MoE layers (and MTP's, on the last stage)
            self._make_expert_meshes()
            n = apply_expert_parallel(model, self.ep_group)
            ep_note = (f", expert parallel {self.ep} within each stage's replicas ({c.n_routed_experts // self.ep} "
                       f"experts per rank; {n} MoE layer(s) here)")
        if self.dp > 1:
            self._shard_stages()
        self.model = model
        self._build_schedule(model, M)
        mb = self.microbatch_size
        log(f"pipeline: {self.world_size} ranks ({self.ctx.backend}) = pp {self.pp} x dp {self.dp}{' (FSDP2)' if self.dp > 1 else ''}{ep_note}, schedule "
            f"{self.schedule_name}, {layout.n_stages} stages (layers per stage "
            f"{[len(s) for s in layout.stage_layers]}, stage ranks {list(layout.stage_rank)}), {M} microbatches of "
            f"{mb} sequences; bubble in theory (F=B=W) {bubble_fraction(self.schedule_name, self.pp, M):.1%}")
        return model

    def _make_expert_meshes(self) -> None:
        """The EP groups within each stage's replicas, the ``ep_rep`` meshes FSDP2 shards each expert
        slice over, and the ``(ep, ep_rep)`` view mesh checkpoints present the experts on (collective:
        every rank builds every group)."""
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
        kind, rep = self.device.type, self.dp // self.ep
        # rank = (ep_rep index * ep + EP rank) * pp + pipeline rank = replica * pp + pipeline rank
        mesh = init_device_mesh(kind, (rep, self.ep, self.pp), mesh_dim_names=("ep_rep", "ep", "pp"))
        self.ep_group, self.rep_mesh = mesh["ep"].get_group(), mesh["ep_rep"]
        # the same ranks with dims (pp, ep, ep_rep): this rank's ["ep", "ep_rep"] slice picks the EP
        # slice along dim 0, then FSDP2's piece of it (what checkpoint.expert_view expects)
        view = DeviceMesh(kind, mesh.mesh.permute(2, 1, 0).contiguous(), mesh_dim_names=("pp", "ep", "ep_rep"))
        self.expert_view_mesh = view["ep", "ep_rep"]

    def _shard_stages(self) -> None:
        """FSDP2 over each stage's replicas: every block (main and MTP) its own unit, then the stage.

        No unit reshards after forward: its weights stay gathered from a step's first forward to its
        last backward (the pipeline reshards them then), so a step all-gathers each weight once,
        not once per microbatch. It is also what the split backward of zbv/dualpipev needs: with
        resharding, the weight-gradient pass looks up the *sharded* parameters, finds them unused in
        the graph, and those gradients never arrive (measured: the losses drift from one process
        at step 2). Memory: a stage's full weights per rank during the step, ZeRO-2-like."""
        from torch.distributed.fsdp import fully_shard
        for st in self.stages:
            for block in list(st.layers) + ([m.block for m in st.mtp] if st.last else []):
                experts = getattr(block.mlp, "experts", None) if isinstance(block.mlp, MoE) else None
                if isinstance(experts, ExpertParallelExperts):
                    # an EP slice is sharded over the replicas holding the same slice; its gradient is
                    # summed over the EP group (all-to-all backward) and over ep_rep: / dp is the mean
                    fully_shard(experts, mesh=self.rep_mesh, reshard_after_forward=False)
                    experts.set_gradient_divide_factor(float(self.dp))
                    if self.rep_mesh.size() > 1 and "gloo" in self.ctx.backend:
                        experts.set_force_sum_reduction_for_comms(True)   # gloo has no pre-multiplied sum
                fully_shard(block, mesh=self.dp_mesh, reshard_after_forward=False)
            fully_shard(st, mesh=self.dp_mesh, reshard_after_forward=False)

    def _reshard(self) -> None:
        """Stage roots back to sharded parameters (after a forward-only pass; before saving)."""
        from torch.distributed.fsdp import FSDPModule
        for st in self.stages:
            if isinstance(st, FSDPModule):
                st.reshard()

    def _build_schedule(self, model: Transformer, M: int) -> None:
        from torch.distributed.pipelining import PipelineStage
        layout, D = self.layout, model.config.hidden_size
        b = self.microbatch_size
        dev = self.device
        pipe_stages = []
        for s, module in zip(layout.local_stages(self.pp_rank), self.stages):
            # static shapes: no metadata-inference forward (which would run the routers on garbage)
            # (activations require grad: that is what sends their gradients back)
            inp = (torch.empty(b, self.seq_len, dtype=torch.long, device="meta") if s == 0 else
                   torch.empty(b, self.seq_len, D, device="meta", requires_grad=True))
            out = (torch.empty(1, device="meta", requires_grad=True) if s == layout.n_stages - 1 else
                   torch.empty(b, self.seq_len, D, device="meta", requires_grad=True))
            pipe_stages.append(PipelineStage(module, s, layout.n_stages, dev, input_args=inp, output_args=out,
                                             group=self.pp_group))
        cls = _schedule_class(self.schedule_name)
        loss_fn = _stage_loss
        if self.schedule_name == "1f1b":
            self.schedule = cls(pipe_stages[0], M, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = cls(pipe_stages, M, loss_fn=loss_fn, scale_grads=False)

    # ------------------------------------------------------------------ one step
    def routers(self) -> list[tuple[str, CountedRouter]]:
        """A view of every router of the full model for :func:`optimizer_update`: the step's summed
        counts of the local ones (None elsewhere), and the bias tensor where this rank holds it."""
        local = {name: r for st in self.stages for name, r in st.routers}
        return [(n, CountedRouter(self, n, local.get(n))) for n in self.all_routers]

    def _embedding_copy(self) -> nn.Embedding | None:
        copy = self.stages[-1].embed_tokens if self.holds_last else None
        return copy if copy is not None and copy is not getattr(self.model, "embed_tokens", None) else None

    @torch.no_grad()
    def _refresh_embedding_copy(self) -> None:
        """The last stage's copy of the table := the first stage's (local FSDP shards: same layout)."""
        copy = self._embedding_copy()
        if self.embed_local:
            _local(copy.weight).copy_(_local(self.model.embed_tokens.weight))
        elif self.embed_pair is not None and (self.holds_first or copy is not None):
            w = self.model.embed_tokens.weight if self.holds_first else copy.weight
            dist.broadcast(_local(w), group=self.embed_pair, group_src=0)

    def forward_backward(self, window: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """One micro-batch ``window [B_local, S+1]`` through the schedule (forward and backward): the
        logged loss parts of this rank, already backpropagated."""
        for st in self.stages:
            st.reset_records()
        self._refresh_embedding_copy()
        self._run(window, train=True)
        logged: dict[str, float] = {}
        for st in self.stages:
            for k, v in st.logged.items():
                logged[k] = logged.get(k, 0.0) + v
        self._step_counts = {}
        for st in self.stages:
            for k, c in st.counts.items():
                self._step_counts[k] = c if k not in self._step_counts else self._step_counts[k] + c
        loss = torch.tensor(logged.get("loss", 0.0))
        return loss, logged

    def _run(self, window: torch.Tensor, train: bool) -> None:
        x = window[:, :-1]
        args = (x,) if self.holds_first else ()
        kwargs = {"window": window} if self.holds_last else {}
        target = window if self.holds_last else None
        from ..precision import autocast
        with autocast(self.device, self.dtype):
            self._schedule_pass(args, kwargs, target, train)

    def _schedule_pass(self, args: tuple, kwargs: dict, target, train: bool) -> None:
        if train:
            self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
        elif self.schedule_name in ("zbv", "dualpipev"):
            # torch 2.13's forward-only eval() of the V schedules fails (it hands a same-rank stage a
            # backward output that was never computed); run the training step and drop its gradients
            with torch.enable_grad():
                self.schedule.step(*args, target=target, return_outputs=False, **kwargs)
            for st in self.stages:
                for p in st.parameters():
                    p.grad = None
        else:
            self.schedule.eval(*args, target=target, **kwargs)

    def reduce_step(self, sums: dict[str, float], finite: bool, counts: dict):
        """Sum the logged parts over the pipeline (mean over replicas), AND the finite flags, and sum
        every router's expert counts over all ranks (the single-process counts of the global batch)."""
        self._reduce_embedding_grad()   # (FSDP averaged the replicas' gradients in the schedule)
        keys = sorted(sums)
        vec = torch.tensor([sums[k] for k in keys] + [0.0 if finite else 1.0], dtype=torch.float64)
        self.ctx.all_reduce(vec)
        out = {k: float(vec[i]) / self.dp for i, k in enumerate(keys)}
        finite = float(vec[-1]) == 0.0
        E = self.full_config.n_routed_experts
        names = list(counts)
        if names:
            stacked = torch.zeros(len(names), E, dtype=torch.float32, device=self.device)
            for i, n in enumerate(names):
                if torch.is_tensor(counts[n]):
                    stacked[i] = counts[n].to(stacked)
            self.ctx.all_reduce(stacked)
            counts = {n: stacked[i] for i, n in enumerate(names)}
        return out, finite, counts

    @torch.no_grad()
    def _reduce_embedding_grad(self) -> None:
        """First stage's table gradient += the last stage's copy's; the copy's is dropped (it is in no
        optimizer). FSDP shards: each replica rank sums its own shard."""
        copy = self._embedding_copy()
        owner = self.model.embed_tokens.weight if self.holds_first else None
        for w in (owner, copy.weight if copy is not None else None):
            if w is not None and w.grad is None:
                w.grad = torch.zeros_like(w)
        if self.embed_local:
            _local(owner.grad).add_(_local(copy.weight.grad))
        elif self.embed_pair is not None and (owner is not None or copy is not None):
            dist.all_reduce(_local(owner.grad if owner is not None else copy.weight.grad), group=self.embed_pair)
        if copy is not None:
            copy.weight.grad = None

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Global norm over the pipeline's parameters (each counted once), clipped like torch's rule."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            sq += _local(g).detach().double().square().sum()
        dist.all_reduce(sq)   # stages are disjoint over pp, FSDP shards over dp: each element once
        norm = sq.sqrt().float()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            _local(g).mul_(coef.to(g.dtype))
        return float(norm)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor]) -> dict:
        """What :func:`dsv3.train.trainer.evaluate` reports (val loss, perplexity, MaxVio_global, MTP
        top-1), through the schedule's forward-only pass; the same on every rank."""
        for m in self.stages:
            m.eval()
            m.evaluating = True
        main = [n for n in self.all_routers if n.startswith("layers.")]
        E = self.full_config.n_routed_experts
        load = torch.zeros(len(main), E, dtype=torch.float64)
        stats = torch.zeros(4, dtype=torch.float64)       # lm_sum, n_tok, mtp_hit, mtp_n
        self._refresh_embedding_copy()
        for w in batches:
            w = w.to(self.device)
            local_b = w.shape[0]
            if local_b % self.dp:
                raise DistributedError(f"validation batch {local_b} not divisible by dp {self.dp}")
            part = local_b // self.dp
            w = w[self.dp_rank * part:(self.dp_rank + 1) * part]
            for st in self.stages:
                st.reset_records()
            self._run(w, train=False)
            for st in self.stages:
                for i, n in enumerate(main):
                    if n in st.counts:
                        load[i] += st.counts[n].double().cpu()
                for s in st.eval_stats:
                    stats += torch.tensor([s["lm_sum"], s["n_tok"], s.get("mtp_hit", 0), s.get("mtp_n", 0)],
                                          dtype=torch.float64)
        self.ctx.all_reduce(load)
        self.ctx.all_reduce(stats)
        for m in self.stages:
            m.train()
            m.evaluating = False
        self._reshard()
        from ..balance import max_violation
        val_loss = float(stats[0] / stats[1].clamp_min(1))
        rec = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if main:
            mv = max_violation(load.float())
            rec.update(maxvio_global=float(mv.mean()), maxvio_global_per_layer=[float(v) for v in mv],
                       expert_load=load.to(torch.int64).tolist())
        if stats[3] > 0:
            rec["mtp_top1_acc"] = float(stats[2] / stats[3])
        return rec

    # ------------------------------------------------------------------ checkpoints
    def gather_full_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The full model's state dict on rank 0 (None elsewhere): every stage's tensors from replica 0
        (collective)."""
        from .checkpoint import full_model_state
        self._reshard()
        full = full_model_state(model)   # collective over each stage's replicas (FSDP2 shards, EP slices)
        part = full if self.dp_rank == 0 else None
        parts = [None] * self.world_size if self.is_main else None
        dist.gather_object(part, parts, dst=0)
        if not self.is_main:
            return None
        full = {}
        for p in parts:
            full.update(p or {})
        return full

    def save(self, out_dir: Path, name: str, model: nn.Module, tokenizer, optimizer, trainer_state: dict) -> Path:
        """A sharded checkpoint (torch.distributed.checkpoint: each rank writes its stages' tensors under
        the full model's names, so any layout resumes it); ``final`` is also exported as the HF model,
        gathered on rank 0."""
        from .checkpoint import save_parallel_checkpoint
        self._reshard()
        return save_parallel_checkpoint(self.ctx, out_dir, name, model, tokenizer, optimizer, trainer_state,
                                        mesh=self.expert_view_mesh, gather=self.gather_full_state,
                                        layout={"pp": self.pp, "pp_schedule": self.schedule_name, "dp": self.dp,
                                                "ep": self.ep})

    def load(self, path: Path, model: nn.Module, optimizer) -> dict:
        """Resume from a sharded checkpoint of any layout, or a single-process one (read whole, each
        rank keeping its stages' tensors and AdamW state, matched by parameter name)."""
        from ..state import load_training_state, sharded_info
        from .checkpoint import load_full_model_state, load_sharded_checkpoint
        self._reshard()
        if sharded_info(path):
            return load_sharded_checkpoint(path, model, optimizer, mesh=self.expert_view_mesh)
        from ...checkpoint import load_pretrained
        loaded = load_pretrained(path, dtype=torch.float32).state_dict()
        load_full_model_state(model, loaded)   # this rank's tensors (its FSDP2 shards and EP slices)
        del loaded
        # (an embedding copy is refreshed from the owner before the next forward)
        return load_training_state(path, _LocalOptimizerView(optimizer, model, self.full_config))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly FSDP-sharded) tensor; in-place ops on it change the parameter."""
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def _stage_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The schedules' loss function: the last stage already returns the microbatch's loss ``[1]``."""
    return output.sum()


class CountedRouter:
    """What :func:`~dsv3.train.loop.optimizer_update` reads of a router under the pipeline: the step's
    counts summed over microbatches (``last_counts``), and the bias it updates (None off this rank)."""

    def __init__(self, runner: PipelineTraining, name: str, router: Router | None):
        self.runner, self.name, self.router = runner, name, router

    @property
    def last_counts(self):
        return getattr(self.runner, "_step_counts", {}).get(self.name)

    @property
    def e_score_correction_bias(self):
        return None if self.router is None else self.router.e_score_correction_bias


def full_group_names(config, groups: list[dict]) -> list[list[str]]:
    """The parameter names of each AdamW group a single process builds for ``config`` (the same
    :func:`~dsv3.train.optim.param_groups` rule on a weightless copy of the full model), in its order.
    ``groups``: the optimizer's param-group settings (a third group carries the latent ``lr_scale``)."""
    from ..latent_scaling import latent_projections
    from ..optim import param_groups
    with torch.device("meta"):
        m = Transformer(config)
    lr_scale = groups[2].get("lr_scale", 1.0) if len(groups) > 2 else 1.0
    names = {id(p): n for n, p in m.named_parameters()}
    built = param_groups(m, 0.0, latent_projections(m), lr_scale)
    if len(built) != len(groups):
        raise ValueError(f"optimizer has {len(groups)} parameter groups, the model's rule gives {len(built)}")
    return [[names[id(p)] for p in g["params"]] for g in built]


class _LocalOptimizerView:
    """Loads a single-process AdamW state dict (parameters by index over the whole model) into this
    rank's optimizer (its stages' parameters), matching them by name."""

    def __init__(self, optimizer, model: nn.Module, config):
        self.optimizer, self.model, self.config = optimizer, model, config

    def load_state_dict(self, full: dict) -> None:
        from .checkpoint import shard_like
        by_name = {}
        for g, members in zip(full["param_groups"], full_group_names(self.config, full["param_groups"])):
            if len(members) != len(g["params"]):
                raise ValueError(f"checkpoint optimizer group has {len(g['params'])} parameters, the model "
                                 f"{len(members)}: not this model")
            for i, n in zip(g["params"], members):
                by_name[n] = full["state"].get(i)
        names = {id(p): n for n, p in self.model.named_parameters()}
        state, groups, li = {}, [], 0
        for gi, g in enumerate(self.optimizer.param_groups):
            ids = []
            for p in g["params"]:
                st = by_name.get(names[id(p)])
                if st:
                    ep = expert_owner(self.model, names[id(p)])
                    state[li] = {k: shard_like(v, p, ep) if torch.is_tensor(v) and v.dim() > 0 else v
                                 for k, v in st.items()}
                ids.append(li)
                li += 1
            groups.append({**{k: v for k, v in full["param_groups"][gi].items() if k != "params"}, "params": ids})
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
