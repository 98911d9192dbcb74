"""Static-shape decode steps of the main model, replayed from CUDA graphs (one per batch bucket).

A decode step of ``n`` sequences is padded to the smallest bucket ``b >= n`` (1, 2, 4, 8, 16, 24,
32, ... up to ``max_num_seqs``) and runs on fixed buffers: token ids ``[b]``, positions ``[b]``,
write slots ``[b]`` and block tables ``[b, max_blocks]`` (``max_blocks`` covers ``max_model_len``; an
uncaptured step reads only the columns its sequences use, see :meth:`CUDAGraphDecoder.table_width`).
Padding rows decode token 0 at position 0, read one slot and write their latents to the cache's
scratch block, so they never touch a real sequence; their outputs are dropped. With every shape
fixed, the whole forward (RMSNorms, MLA projections, the paged-cache write, the Triton decode
kernel, the router and the grouped-GEMM experts) is captured once per bucket and replayed with one
launch. On the CPU the same buffers run eagerly (which is how the padding logic is tested there) or,
with ``compile=True``, through ``torch.compile`` of :func:`dsv3.engine.compiled.decode_hidden`, one
graph per bucket, which inductor turns into C++. On CUDA ``compile=True`` compiles the step (Triton
kernels fusing its elementwise work) and then captures the compiled step in the bucket's CUDA graph.
"""

from __future__ import annotations

import warnings

import torch

from ..model import Transformer
from .paged_cache import PagedBatch, PagedLatentCache

# Batch sizes that get their own graph (those above max_num_seqs are dropped, max_num_seqs added).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class CUDAGraphDecoder:
    """Runs one-token-per-sequence steps of ``model`` over ``cache`` on static buffers.

    Args:
        max_num_seqs: the largest batch it takes (larger steps fall back to the eager runner).
        max_model_len: the longest sequence; fixes the block-table width.
        capture: capture CUDA graphs (default: when the cache is on CUDA). Without it the static
            buffers run eagerly; a capture that fails (an op that syncs with the host) warns once and
            falls back to that.
        compile: run the step through ``torch.compile`` (one graph per bucket; the first step of each
            bucket pays the compilation). With ``capture`` too (the default on CUDA) the compiled step
            is what gets captured: inductor fuses the step's many small kernels, the graph removes
            their launches.
    """

    def __init__(self, model: Transformer, cache: PagedLatentCache, max_num_seqs: int, max_model_len: int,
                 capture: bool | None = None, buckets: tuple[int, ...] = DEFAULT_BUCKETS, compile: bool = False):
        if max_num_seqs < 1 or max_model_len < 1:
            raise ValueError(f"need max_num_seqs >= 1 and max_model_len >= 1, got {max_num_seqs}, {max_model_len}")
        self.model, self.cache = model, cache
        dev = cache.kv.device
        self.capture = dev.type == "cuda" if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need the cache on a CUDA device, it is on {dev}")
        # emulate_precision_casts: round to bf16/fp16 wherever eager does (inductor otherwise keeps fused
        # intermediates in fp32), so compiled decoding stays as close to the eager engine as it can.
        self._compiled = (torch.compile(self._forward_composed, dynamic=False, fullgraph=True,
                                        options={"emulate_precision_casts": True}) if compile else None)
        self.max_num_seqs = max_num_seqs
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.buckets = sorted({b for b in buckets if b < max_num_seqs} | {max_num_seqs})
        self.ids = torch.zeros(max_num_seqs, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_num_seqs, dtype=torch.long, device=dev)
        self.slots = torch.full((max_num_seqs,), cache.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(max_num_seqs, self.max_blocks, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._pool = None

    def fits(self, items) -> bool:
        """Whether a step of these (tokens, start, block table) items can run here."""
        return len(items) <= self.max_num_seqs and all(len(t) <= self.max_blocks for _, _, t in items)

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _forward(self, b: int, tables: torch.Tensor) -> torch.Tensor:
        """The decode step on the first ``b`` rows of the buffers, reading the block tables
        ``tables [b, width]`` (a view of the buffer) -> final normed hidden [b, D]."""
        pos = self.positions[:b]
        meta = PagedBatch(self.cache, self.slots[:b], block_tables=tables, context_lens=pos + 1)
        h, _, _ = self.model.hidden_states(self.ids[:b][None], cache=meta, absorb=True, positions=pos)
        return h[0]

    def _forward_composed(self, b: int, tables: torch.Tensor) -> torch.Tensor:
        """The same step through :func:`decode_hidden` (what ``torch.compile`` takes whole)."""
        from .compiled import decode_hidden
        pos = self.positions[:b]
        meta = PagedBatch(self.cache, self.slots[:b], block_tables=tables, context_lens=pos + 1)
        return decode_hidden(self.model, self.ids[:b], pos, meta)

    def table_width(self, items) -> int:
        """Block-table columns an uncaptured step reads: the longest table among ``items``, at least 2.

        The CPU reference attention reads every slot of every column, so a step must not read
        ``max_model_len`` worth of slots when the sequences are short (with the default 2048, every
        step read 2,048 slots per row and layer). The floor of 2 keeps the width symbolic in
        the compiled graph (torch.compile specializes sizes 0 and 1), so one graph per batch bucket
        serves every width. CUDA graphs keep the full width: their addresses and shapes are fixed, and
        the Triton kernel stops at each row's context length anyway.
        """
        return min(self.max_blocks, max(2, max(len(t) for _, _, t in items)))

    def _load(self, items, b: int) -> None:
        """Copy the step's inputs into the buffers; rows n..b-1 become padding."""
        bs, n = self.cache.block_size, len(items)
        ids, pos, slots, tables = [], [], [], []
        for toks, start, table in items:
            ids.append(toks[0])
            pos.append(start)
            slots.append(table[start // bs] * bs + start % bs)
            tables.append(table + [0] * (self.max_blocks - len(table)))
        pad = b - n
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.cache.scratch_slot] * pad
        tables += [[0] * self.max_blocks] * pad
        host = torch.tensor([ids, pos, slots], dtype=torch.long)
        self.ids[:b].copy_(host[0], non_blocking=True)
        self.positions[:b].copy_(host[1], non_blocking=True)
        self.slots[:b].copy_(host[2], non_blocking=True)
        self.tables[:b].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)

    def _capture(self, b: int) -> None:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), then capture.
        # The buffers hold the current step, so these runs do its real work (same latents, same slots).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        step = self._compiled if self._compiled is not None else self._forward
        with torch.cuda.stream(stream):
            for _ in range(2):                            # (a compiled step compiles here)
                step(b, self.tables[:b])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step(b, self.tables[:b])
        self._pool = graph.pool()
        self.graphs[b], self.outputs[b] = graph, out

    @torch.inference_mode()
    def run(self, items) -> torch.Tensor:
        """One token per item: (tokens [1], position, block table) -> final normed hidden [n, D]."""
        n = len(items)
        b = self.bucket(n)
        self._load(items, b)
        if not self.capture:
            tables = self.tables[:b, :self.table_width(items)]
            if self._compiled is None:
                return self._forward(b, tables)[:n]
            torch._dynamo.maybe_mark_dynamic(tables, 1)      # one graph per bucket, any width
            return self._compiled(b, tables)[:n]
        if b not in self.graphs:
            try:
                self._capture(b)
            except Exception as e:  # noqa: BLE001 - e.g. an op that reads a value on the host
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "decoding eagerly on static shapes instead", RuntimeWarning, stacklevel=2)
                torch.cuda.synchronize()
                self.capture = False
                return self.run(items)
        self.graphs[b].replay()
        # A copy: the engine keeps hidden states across steps (MTP), the graph overwrites its output.
        return self.outputs[b][:n].clone()
