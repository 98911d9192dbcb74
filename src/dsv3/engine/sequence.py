"""One request's state in the engine: its tokens, cache blocks and progress."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"      # not admitted yet, or preempted (its cache was dropped; recomputed later)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None          # "stop" | "length"
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    num_computed: int = 0                     # tokens whose latents are in the cache
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    num_preemptions: int = 0
    # MTP speculative decoding: draft tokens to verify next step (and their draft distributions
    # when sampling), and the main-model hidden states of positions [mtp_computed, num_computed)
    # that the MTP module has not consumed yet.
    draft: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    mtp_computed: int = 0
    pending_hidden: list[torch.Tensor] = field(default_factory=list)

    def reset_cache_state(self) -> None:
        """Forget everything cached (preemption): it will all be recomputed."""
        self.num_computed = self.mtp_computed = 0
        self.pending_hidden.clear()
        self.draft = []
        self.draft_probs = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def __len__(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_uncomputed(self) -> int:
        return len(self) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
