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
    finish_reason: str | None = None          # "stop" | "length" | "abort"
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
    # Stop strings (:meth:`match_stop`): output[text_from:text_upto] is the lookback window the new
    # tokens' text is diffed against (byte-level BPE splits characters across tokens); of the text so
    # far only the last (longest stop - 1) characters are kept, since a new match ends in new text.
    text_from: int = 0
    text_upto: int = 0
    text_len: int = 0                         # characters of output text decoded so far
    text_tail: str = ""
    stop_text_len: int | None = None          # a stop string ended the output: the text before it is this long

    def reset_cache_state(self) -> None:
        """Forget everything cached (preemption): it will all be recomputed."""
        self.num_computed = self.mtp_computed = 0
        self.pending_hidden.clear()
        self.draft = []
        self.draft_probs = None

    def match_stop(self, tokenizer) -> bool:
        """Decode the output tokens not yet decoded and look for the request's stop strings in the new
        text (and the tail that a match ending there can start in); True, with :attr:`stop_text_len`
        set, when one matched. Tokens that end inside a UTF-8 character are decoded again next time."""
        head = tokenizer.decode(self.output[self.text_from:self.text_upto], skip_special_tokens=True)
        chunk = tokenizer.decode(self.output[self.text_from:], skip_special_tokens=True)[len(head):]
        settled = not chunk.endswith("\ufffd")
        text = self.text_tail + (chunk if settled else chunk.rstrip("\ufffd"))
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.stop_text_len = self.text_len - len(self.text_tail) + min(hits)
            return True
        if settled:
            keep = max(map(len, self.params.stop)) - 1
            self.text_len += len(chunk)
            self.text_tail = text[-keep:] if keep else ""
            self.text_from, self.text_upto = self.text_upto, len(self.output)
        return False

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
