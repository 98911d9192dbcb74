"""Continuous batching: which sequences run in the next forward pass, and with how many tokens.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first (a decoding
sequence needs one token, an unfinished prompt the next chunk of it), then waiting ones are admitted
in arrival order with as much of their prompt as the budget allows (chunked prefill), reusing cached
prefix blocks. When the cache runs out of blocks the most recently admitted running sequence is
preempted: its blocks are freed and it waits to be recomputed from its prompt and output so far.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs, self.max_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        need = self.bm.blocks_needed(len(seq) + seq.params.max_tokens)
        if need > self.bm.num_blocks:
            raise ValueError(f"request needs {need} cache blocks for prompt + max_tokens, the cache has "
                             f"{self.bm.num_blocks}")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq.block_table)
        seq.block_hashes.clear()
        seq.reset_cache_state()
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next batch: (sequence, number of its uncomputed tokens to run now)."""
        budget = self.max_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq not in self.running:      # preempted by an earlier sequence of this loop
                continue
            n = min(seq.num_uncomputed, budget)
            if n <= 0:
                break
            # Draft tokens ride along when the sequence reaches its end this step (room permitting).
            if seq.draft and (seq.num_computed + n < len(seq) or n + len(seq.draft) > budget
                              or not self.bm.grow(seq.block_table, len(seq) + len(seq.draft))):
                seq.draft, seq.draft_probs = [], None
            while not self.bm.grow(seq.block_table, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                batch.append((seq, n))
                budget -= n + len(seq.draft)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                seq.block_table, seq.block_hashes = self.bm.match_prefix(seq.tokens)
                seq.num_computed = len(seq.block_table) * self.bm.block_size
                # Shared blocks carry the MTP layer's entries too; if one is slightly off for this
                # request it only lowers draft acceptance, never changes the output.
                seq.mtp_computed = seq.num_computed
            n = min(seq.num_uncomputed, budget)
            if not self.bm.grow(seq.block_table, seq.num_computed + n):
                # Don't sit on shared prefix blocks while waiting: running sequences may need them.
                self.bm.free(seq.block_table)
                seq.block_hashes.clear()
                seq.reset_cache_state()
                if not self.running:  # everything is free and it still doesn't fit (add() prevents this)
                    raise RuntimeError("cache too small for a single request")
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq.block_table)
