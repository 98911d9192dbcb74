"""Checkpoints of a parallelized run: every rank writes its own shard, any layout resumes them.

Saving (:func:`save_parallel_checkpoint`, all ranks) goes through torch.distributed.checkpoint
(DCP): ``get_state_dict`` gives the model and AdamW state as FSDP2 DTensors keyed by parameter
name, ``dcp.save`` writes them with DCP's safetensors storage (``HuggingFaceStorageWriter``, one
``shard-0000R-model-00001-of-00001.safetensors`` per rank holding that rank's pieces and the offsets
of each piece in the full tensor, in the header as JSON -- no pickle) into the checkpoint's state
directory ``OUT/train_state/NAME.ID/`` (layout and atomicity: :mod:`dsv3.train.state`). Tensors every
rank holds whole (router biases, AdamW step counts, the torch RNG) are written once. Nothing is
gathered, except for ``final``: it is also exported as the plain HF model (all-gathered, rank 0
writes), so engines and transformers load it as they are.

Loading (:func:`load_sharded_checkpoint`) asks DCP for exactly the pieces this rank holds *now*; DCP
reads the overlapping parts of the saved pieces, so a checkpoint saved at one world size / layout
resumes at any other, or in one process without a process group (plain tensors are the whole
pieces). Checkpoints written by a single process (one ``optimizer.safetensors``, HF weights) still
resume under torchrun: :func:`load_parallel_checkpoint` reads them whole and keeps each rank's part.

Expert-parallel experts are sharded by hand, not by DTensor: rank ``r`` of an EP group holds experts
``[first, first + n_local)``, and FSDP2 shards that slice again over the ``ep_rep`` ranks. For DCP each
piece is presented as what it is -- a piece of the full ``[E, ...]`` tensor -- by a DTensor view of the
same local storage on a ``(ep, ep_rep)`` mesh with placements ``(Shard(0), Shard(0))``: dim 0 split into
the EP ranks' contiguous slices, each split again exactly as FSDP2 splits it (``torch.chunk``
sizes). Saved this way the experts look like any other sharded tensor, so they reshard to another EP
size, to FSDP-only, or to one process. (``ExpertParallelExperts.first`` is the offset checked
against the view.)

Pipeline stages fit in without a change of format: a stage module keeps the full model's parameter
names, each rank's state dict then holds only its stage's entries, and DCP saves the union; the
optimizer's param groups are merged over ranks for the same reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ...checkpoint import CheckpointError, save_pretrained
from ..state import (SAVE_ID_KEY, SHARDED_MARKER, STEP_KEY, TRAINER_STATE, begin_save, commit_model, commit_state,
                     load_training_state, restore_rng, state_dir, write_trainer_state)
from .dist import DistContext
from .expert_parallel import ExpertParallelExperts

FORMAT = "torch.distributed.checkpoint"
STORAGE = "safetensors (torch.distributed.checkpoint.HuggingFaceStorageWriter, one file per rank)"


def _ep_owner(model: nn.Module, name: str) -> ExpertParallelExperts | None:
    """The EP experts module holding tensor ``name`` (a state-dict key), if any."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return owner if isinstance(owner, ExpertParallelExperts) else None


def _reshard(model: nn.Module) -> None:
    # The root keeps its weights unsharded after a forward (no backward follows in evaluation);
    # gather, save and load all work on the sharded parameters.
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# ------------------------------------------------------------------------------------- full tensors
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


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict at full size, on CPU (collective)."""
    _reshard(model)
    return {name: gather_full(t, _ep_owner(model, name)) for name, t in model.state_dict().items()}


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


@torch.no_grad()
def load_full_model_state(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Load a single-process state dict (e.g. ``load_pretrained(ckpt).state_dict()``) into a parallelized model."""
    _reshard(model)
    own = model.state_dict()
    missing = sorted(set(own) - set(full))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    model.load_state_dict({n: shard_like(full[n], t, _ep_owner(model, n)) for n, t in own.items()})


# ------------------------------------------------------------------------------------- the DCP view
def expert_mesh(ep_mesh: DeviceMesh) -> DeviceMesh:
    """The ``(ep, ep_rep)`` mesh the expert views live on, from the plan's ``(ep_rep, ep)`` mesh: the
    same ranks, transposed, so that mesh dim 0 picks the EP slice and dim 1 FSDP2's piece of it.
    Collective (it creates the process groups of a new mesh): every rank calls it once."""
    return DeviceMesh(ep_mesh.device_type, ep_mesh.mesh.transpose(0, 1).contiguous(),
                      mesh_dim_names=("ep", "ep_rep"))


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def expert_view(t: torch.Tensor, ep: ExpertParallelExperts, mesh: DeviceMesh) -> DTensor:
    """This rank's piece of an EP tensor (a parameter or its AdamW moment: FSDP2's ``Shard(0)`` DTensor of
    the local ``[n_local, ...]`` slice) as a DTensor of the full ``[E, ...]`` tensor on ``mesh``
    (:func:`expert_mesh`), sharing ``t``'s storage, so DCP writes from it and loads into it in place."""
    if not (isinstance(t, DTensor) and tuple(t.placements) == (Shard(0),)):
        raise CheckpointError(f"expert tensor of {ep.extra_repr()}: expected FSDP2's Shard(0) DTensor, "
                              f"got {type(t).__name__} {getattr(t, 'placements', '')}")
    local = t.to_local()
    shape = (ep.n_experts, *t.shape[1:])
    view = DTensor.from_local(local, mesh, (Shard(0), Shard(0)), run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))
    # the view must claim exactly the rows this rank holds: the EP slice's, then FSDP2's chunk of them
    # (DTensor's checkpoint protocol reports the chunk DCP will write / read)
    claim = view.__create_chunk_list__()[0]
    own = t.__create_chunk_list__()[0]
    if tuple(claim.sizes) != tuple(local.shape) or claim.offsets[0] != ep.first + own.offsets[0]:
        raise CheckpointError(f"expert tensor of {ep.extra_repr()}: the DCP view covers rows "
                              f"{claim.offsets[0]}+{claim.sizes[0]}, this rank holds "
                              f"{ep.first + own.offsets[0]}+{local.shape[0]}")
    return view


def _expert_owners(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Parameter name -> its EP experts module, for every hand-sharded expert tensor of ``model``."""
    return {f"{name}.{p}" if name else p: m for name, m in model.named_modules()
            if isinstance(m, ExpertParallelExperts) for p, _ in m.named_parameters(recurse=False)}


def dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, mesh: DeviceMesh | None = None
              ) -> tuple[dict, dict, dict]:
    """What DCP saves and loads for (``model``, ``optimizer``): ``{"model": ..., "optim": ..., "rng":
    {"torch": ...}}`` with the expert tensors as full-tensor views (:func:`expert_view` on ``mesh``),
    plus ``get_state_dict``'s own model and optimizer state dicts (sharing storage with it; what
    ``set_state_dict`` takes back after a load). Works with or without a process group. Tensors only:
    the optimizer's param groups (numbers) go to ``trainer_state.json``.

    A fresh optimizer gets its state created first (``get_state_dict`` runs a zero-gradient step at
    lr 0), so a load has tensors to fill.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    owners = _expert_owners(model)
    if owners and mesh is None:
        raise CheckpointError("the model has expert-parallel experts: pass the (ep, ep_rep) mesh (expert_mesh)")

    def view(name: str, t):
        if name in owners and torch.is_tensor(t) and t.dim() > 0:
            return expert_view(t, owners[name], mesh)
        return t
    state = {
        "model": {k: view(k, v) for k, v in model_sd.items()},
        "optim": {k: {s: view(k, v) for s, v in st.items()} for k, st in optim_sd["state"].items()},
        "rng": {"torch": torch.get_rng_state()},
    }
    return state, model_sd, optim_sd


def _merged_groups(groups: list[dict]) -> list[dict]:
    """The optimizer's param groups over all ranks (JSON-ready), each listing every rank's parameter
    names: ranks holding different parts of the model (pipeline stages) have different ones."""
    every = [groups]
    if dist.is_initialized():
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, groups)
    merged = [dict(g, params=list(g["params"])) for g in every[0]]
    for other in every[1:]:
        if len(other) != len(merged):
            raise CheckpointError(f"ranks have different numbers of optimizer param groups ({len(merged)} vs "
                                  f"{len(other)})")
        for g, o in zip(merged, other):
            seen = set(g["params"])
            g["params"] += [p for p in o["params"] if p not in seen]
    return json.loads(json.dumps(merged))  # tuples (betas) -> lists, as the single-process state stores them


def save_parallel_checkpoint(ctx: DistContext, out_dir: Path, name: str, model: nn.Module, tokenizer,
                             optimizer: torch.optim.Optimizer, trainer_state: dict, mesh: DeviceMesh | None = None,
                             layout: dict | None = None, gather=None) -> Path:
    """Write checkpoint ``out_dir/name`` sharded, every rank its pieces (collective; see the module docstring).

    ``mesh``: the expert mesh (:func:`expert_mesh`) when the model has EP experts. ``layout``: what
    to record about the parallel layout (e.g. ``{"ep": 2}``). ``final`` is also exported as the full
    HF model. ``gather(model)``: the full state dict on rank 0 for that export (collective; default
    :func:`full_model_state`; pipeline stages gather theirs to rank 0). Returns the model directory.
    """
    _reshard(model)
    full = (gather or full_model_state)(model) if name == "final" else None   # the only gather: the HF export
    save_id, state_tmp = ctx.broadcast_object(begin_save(out_dir, name) if ctx.is_main else None)
    state, _, optim_sd = dcp_state(model, optimizer, mesh)
    groups = _merged_groups(optim_sd["param_groups"])
    # Every rank writes its file into rank 0's temporary state directory (DCP needs storage all ranks
    # see, as any DCP checkpoint does); dcp.save returns once every file is written and fsynced.
    dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(state_tmp), save_distributed=True))
    del state
    if ctx.is_main:
        files = sorted(p.name for p in Path(state_tmp).glob("*.safetensors"))
        sharded = {"format": FORMAT, "storage": STORAGE, "world_size": ctx.world_size, **(layout or {}),
                   "files": files}
        write_trainer_state(state_tmp, dict(trainer_state, world_size=ctx.world_size, sharded=sharded), save_id,
                            groups)
        commit_state(out_dir, name, save_id, state_tmp)
        step = str(trainer_state.get("step", ""))

        def write(tmp: Path) -> None:
            if full is not None:   # final: the plain HF model, loadable by engines and transformers
                save_pretrained(plain_model(model.config, full), tmp, metadata={SAVE_ID_KEY: save_id, STEP_KEY: step})
            else:                  # the weights are in the shards; config and tokenizer describe them
                model.config.to_json_file(tmp / "config.json")
                (tmp / SHARDED_MARKER).write_text(json.dumps({
                    "save_id": save_id, "step": trainer_state.get("step"), "format": FORMAT,
                    "shards": f"../train_state/{name}.{save_id}",
                    "note": "sharded training checkpoint: resume it with `dsv3 train --resume`; the run's "
                            "final/ directory is the HF model (or export this one with "
                            "dsv3.train.parallel.checkpoint.export_pretrained)"}, indent=1) + "\n")
            tokenizer.save(tmp)
        path = commit_model(out_dir, name, save_id, write)
    else:
        path = Path(out_dir) / name
    del full
    ctx.barrier()  # nobody moves on (or deletes older checkpoints) before the new one is complete
    return path


@torch.no_grad()
def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                            mesh: DeviceMesh | None = None, rng: bool = True) -> dict:
    """Resume from sharded checkpoint ``path`` at this process's layout (any world size, or one process
    without a process group): weights, optimizer, RNG (``rng=False``: leave this process's RNGs as they
    are). Returns the trainer state.

    ``mesh``: the expert mesh (:func:`expert_mesh`) when ``model`` has EP experts."""
    s = state_dir(Path(path))
    if s is None:
        raise CheckpointError(f"{path}: not a complete training checkpoint, no training state to resume")
    trainer_state = json.loads((s / TRAINER_STATE).read_text())
    if not trainer_state.get("sharded"):
        raise CheckpointError(f"{path}: not a sharded checkpoint (a single-process one: load_training_state)")
    _reshard(model)
    state, model_sd, optim_sd = dcp_state(model, optimizer, mesh)
    reader = dcp.HuggingFaceStorageReader(str(s))
    saved = set(reader.read_metadata().state_dict_metadata)
    # A parameter that never had a gradient (e.g. MTP at --mtp-weight 0) has no AdamW state, and must
    # come back without one (a zero state would start its bias correction at another step); DCP still
    # checks that every model tensor is there.
    stateless = [k for k, st in state["optim"].items() if not any(f"optim.{k}.{n}" in saved for n in st)]
    for k in stateless:
        del state["optim"][k], optim_sd["state"][k]
    try:
        dcp.load(state, storage_reader=reader)
    except Exception as e:  # DCP reports a missing tensor or a shape mismatch as a generic exception
        raise CheckpointError(f"{path}: cannot load the sharded checkpoint into this model ({type(e).__name__}: "
                              f"{e}); was it saved by a run of another model shape?") from e
    # the tensors are filled in place; set_state_dict also takes the param groups' numbers back (not
    # strict: the stateless parameters; the model's tensors were all found above)
    set_state_dict(model, optimizer, model_state_dict=model_sd,
                   optim_state_dict={"state": optim_sd["state"], "param_groups": trainer_state["optimizer_param_groups"]},
                   options=StateDictOptions(strict=False))
    if rng:
        restore_rng(trainer_state, state["rng"]["torch"])
    return trainer_state


def load_parallel_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             mesh: DeviceMesh | None = None) -> dict:
    """Resume a parallelized run from any checkpoint: a sharded one (any layout) or a single-process one
    (read whole on every rank, each keeping its part). Returns the trainer state (step, data position,
    run config)."""
    s = state_dir(Path(path))
    if s is not None and json.loads((s / TRAINER_STATE).read_text()).get("sharded"):
        return load_sharded_checkpoint(path, model, optimizer, mesh)
    from ...checkpoint import load_pretrained
    loaded = load_pretrained(path, dtype=torch.float32)
    load_full_model_state(model, loaded.state_dict())
    del loaded
    return load_training_state(path, ShardingOptimizerView(optimizer, model))


def export_pretrained(checkpoint: Path, out: Path, tokenizer=None) -> Path:
    """Write sharded checkpoint ``checkpoint`` as a plain HF model directory ``out`` (one process, no
    process group; holds the full model in memory). Returns ``out``."""
    from ...config import ModelConfig
    from ...model import Transformer
    from ..optim import build_optimizer
    checkpoint, out = Path(checkpoint), Path(out)
    model = Transformer(ModelConfig.from_json_file(checkpoint))
    load_sharded_checkpoint(checkpoint, model, build_optimizer(model, 0.0), rng=False)
    save_pretrained(model, out)
    if tokenizer is None:
        from ...tokenizer import Tokenizer
        tokenizer = Tokenizer.load(checkpoint)
    tokenizer.save(out)
    return out
