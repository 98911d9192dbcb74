"""Fixed-size blocks of the paged latent cache: allocation, reference counts, prefix caching.

A sequence's cache is a block table: block ``i`` holds the latents of its positions
``[i*block_size, (i+1)*block_size)``. A block whose ``block_size`` tokens are all computed gets a
hash chained over the whole prefix (``hash(previous block hash, its tokens)``), so another request
whose prompt starts with the same tokens can share it instead of recomputing it. Freed blocks keep
their hash until they are handed out again (least recently freed first), so a cached prefix
survives its first request.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}          # prefix hash -> block
        self.prefix_hits = 0                      # tokens served from the prefix cache

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take(self) -> int:
        b, _ = self.free_blocks.popitem(last=False)
        if self.block_hash[b] is not None:       # evict its cached prefix
            self.cached.pop(self.block_hash[b], None)
            self.block_hash[b] = None
        self.ref[b] = 1
        return b

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], list[int]]:
        """Cached full blocks covering the longest prefix of ``tokens`` (always leaving >= 1 token to
        compute, whose logits are needed). Returns (block table, chain hashes) with references taken."""
        table, hashes, h = [], [], None
        if not self.prefix_caching:
            return table, hashes
        bs = self.block_size
        for i in range((len(tokens) - 1) // bs):
            h = hash((h, tuple(tokens[i * bs:(i + 1) * bs])))
            b = self.cached.get(h)
            if b is None:
                break
            if self.ref[b] == 0:
                del self.free_blocks[b]
            self.ref[b] += 1
            table.append(b)
            hashes.append(h)
        self.prefix_hits += len(table) * bs
        return table, hashes

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Append blocks to ``table`` until it holds ``num_tokens``; False (and no change) if short."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need > self.num_free:
            return False
        for _ in range(max(0, need)):
            table.append(self._take())
        return True

    def register(self, table: list[int], hashes: list[int], tokens: list[int], num_computed: int) -> None:
        """Give hashes to the blocks of ``table`` that are now full of computed tokens."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        h = hashes[-1] if hashes else None
        for i in range(len(hashes), num_computed // bs):
            h = hash((h, tuple(tokens[i * bs:(i + 1) * bs])))
            hashes.append(h)
            b = table[i]
            if h not in self.cached and self.block_hash[b] is None:
                self.cached[h] = b
                self.block_hash[b] = h

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block; unreferenced blocks return to the free list (cache kept)."""
        for b in reversed(table):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_blocks[b] = None
        table.clear()
