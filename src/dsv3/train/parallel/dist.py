"""Starting torch.distributed from torchrun's environment, and the few collectives the trainer uses.

``torchrun --nproc-per-node N -m dsv3 train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` for each process; :func:`init_distributed` reads them and opens
the default process group: NCCL when the processes train on CUDA (one GPU per local rank), gloo on
CPU. Multi-node runs use torchrun's usual ``--nnodes/--node-rank/--rdzv-*`` flags; nothing here
changes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...config import ConfigError
from ...device import resolve_device


class DistributedError(ConfigError):
    """The run asks for a distributed set-up that can't work (bad world size, device, EP size...);
    a user error, reported by the CLI without a traceback."""


@dataclass
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_group: bool            # True when init_distributed opened the process group (and closes it)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files, logs and plots."""
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the body first (e.g. builds a shared cache on disk), then the others do."""
        if not self.is_main:
            dist.barrier()
        try:
            yield
        finally:
            if self.is_main:
                dist.barrier()

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over the whole job (moved to the communication device and back)."""
        buf = t.to(self.device)
        dist.all_reduce(buf, op=op)
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (picklable Python values only; for small metadata)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"environment variable {name}={raw!r} is not an integer") from None


def world_size_from_env() -> int:
    """The job size: the open process group's, else torchrun's ``WORLD_SIZE`` (1 outside torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def init_distributed(device: str | None = None) -> DistContext:
    """Join the job described by torchrun's environment (or the already-open default group).

    ``device``: ``"cuda"``/``"cpu"`` or None (CUDA when available). On CUDA each process takes GPU
    ``LOCAL_RANK`` and the backend is NCCL; on CPU the backend is gloo.
    """
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    kind = resolve_device(device).type
    if kind not in ("cuda", "cpu"):
        raise DistributedError(f"distributed training runs on cuda or cpu, not {device!r}")
    local_rank = _env_int("LOCAL_RANK", 0)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("--device cuda asked for, but torch sees no GPU")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                                   "use --nproc-per-node <= the GPU count")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise DistributedError(f"{var} is not set: start distributed runs with torchrun "
                                       "(e.g. torchrun --nproc-per-node 2 -m dsv3 train ...)")
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                device_id=dev if kind == "cuda" else None)
        owns = True
    backend = dist.get_backend()
    if kind == "cuda" and backend != "nccl" or kind == "cpu" and "gloo" not in backend:
        raise DistributedError(f"the open process group uses {backend!r}, which can't run on {kind}")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=dev, backend=backend, owns_group=owns)
