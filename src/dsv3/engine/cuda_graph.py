"""Static-shape steps of the main model and its MTP module, replayed from CUDA graphs or compiled.

A step of ``n`` query rows (one token per decoding sequence, or a sequence's last token plus its
speculative drafts when verifying, or the MTP module's catch-up and draft tokens) is padded to the
smallest bucket ``b >= n`` (1, 2, 4, 8, 16, 24, 32, ... up to ``max_num_seqs * max_query_len``) and
runs on fixed buffers: token ids ``[b]``, positions ``[b]``, write slots ``[b]``, block tables
``[b, max_blocks]`` (``max_blocks`` covers ``max_model_len``; an uncaptured step reads only the
columns its sequences use, see :meth:`CUDAGraphDecoder.table_width`) and, for the MTP module, the
hidden states it continues from ``[b, D]``. Every row attends over its own sequence up to its own
position (the paged cache's rows form), so rows of one sequence are causal among themselves.
Padding rows decode token 0 at position 0, read one slot and write their latents to the cache's
scratch block, so they never touch a real sequence; their outputs are dropped.

What runs is the model's own forward, ``model.hidden_states`` (``model.mtp_states`` for the MTP
module), the same call the eager runner makes. With every shape fixed, the whole forward (RMSNorms,
MLA projections, the paged-cache write, the Triton decode kernel, the router and the experts) is
captured once per bucket on CUDA and replayed with one launch. With ``compile=True`` the step goes
through ``torch.compile`` (one graph per bucket; on a CPU inductor turns it into C++, on CUDA the
compiled step is then captured), with the routed-experts implementation chosen for the bucket
(:func:`dsv3.engine.experts.choose_experts`) swapped into the model for the duration of the call.
Without compile or capture (CPU) the buffers run eagerly, which is how the padding logic is tested.
"""

from __future__ import annotations

import warnings

import torch

from ..model import Transformer
from .compile_options import decode_compile_options, skip_guard_eval
from .experts import build_experts, choose_experts, swap_experts
from .paged_cache import PagedBatch, PagedLatentCache

# Row counts that get their own graph (those above the row capacity are dropped, the capacity added).
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)



class CUDAGraphDecoder:
    """Runs static-shape steps of ``model`` over ``cache``: query rows of at most ``max_query_len``
    tokens per sequence, at most ``max_num_seqs`` sequences.

    Args:
        max_num_seqs: the most sequences a step takes (larger steps fall back to the eager runner).
        max_model_len: the longest sequence; fixes the block-table width.
        capture: capture CUDA graphs (default: when the cache is on CUDA). Without it the static
            buffers run eagerly; a capture that fails (an op that syncs with the host) warns once and
            falls back to that.
        compile: run the steps through ``torch.compile`` (one graph per step kind and bucket; the
            first step of each pays the compilation). With ``capture`` too (the default on CUDA) the
            compiled step is what gets captured: inductor fuses the step's many small kernels, the
            graph removes their launches.
        max_query_len: the most tokens one sequence brings to a step (``1 + num_speculative_tokens``
            when the engine verifies MTP drafts; 1 for plain decoding).
    """

    def __init__(self, model: Transformer, cache: PagedLatentCache, max_num_seqs: int, max_model_len: int,
                 capture: bool | None = None, buckets: tuple[int, ...] = DEFAULT_BUCKETS, compile: bool = False,
                 max_query_len: int = 1):
        if max_num_seqs < 1 or max_model_len < 1 or max_query_len < 1:
            raise ValueError(f"need max_num_seqs, max_model_len and max_query_len >= 1, got {max_num_seqs}, "
                             f"{max_model_len}, {max_query_len}")
        self.model, self.cache = model, cache
        dev = cache.kv.device
        self.capture = dev.type == "cuda" if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need the cache on a CUDA device, it is on {dev}")
        self.steps = {"main": self._forward, "mtp": self._forward_mtp}
        # The compiled callables wrap these very methods: eager and compiled steps are one forward.
        # Inductor options by device (compile_options.py: what was measured and what is adopted).
        self.compile_options = decode_compile_options(dev) if compile else None
        self.skip_guard_eval = compile and skip_guard_eval(dev)
        self.compiled = ({k: torch.compile(f, dynamic=False, fullgraph=True, options=self.compile_options)
                          for k, f in self.steps.items()} if compile else None)
        self.max_num_seqs, self.max_query_len = max_num_seqs, max_query_len
        self.max_rows = max_num_seqs * max_query_len
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.buckets = sorted({b for b in buckets if b < self.max_rows} | {self.max_rows})
        rows = self.max_rows
        self.ids = torch.zeros(rows, dtype=torch.long, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.slots = torch.full((rows,), cache.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.zeros(rows, self.max_blocks, dtype=torch.int32, device=dev)
        self.hidden: torch.Tensor | None = None      # [rows, D] the MTP module's input, made on first use
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}           # main-model step per bucket
        self.outputs: dict[int, torch.Tensor] = {}
        self.mtp_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.mtp_outputs: dict[int, torch.Tensor] = {}
        self._pool = None
        self._experts: dict[str, dict] = {}          # implementation name -> {moe: experts module}
        self._bucket_experts: dict[int, dict] = {}   # bucket -> one of those
        self._compiled_once: set[tuple[str, int]] = set()

    def fits(self, items) -> bool:
        """Whether a step of these (tokens, start, block table) items can run here."""
        return (len(items) <= self.max_num_seqs and all(len(toks) <= self.max_query_len for toks, _, _ in items)
                and all(len(t) <= self.max_blocks for _, _, t in items))

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    # ------------------------------------------------------------------ the two steps
    def _meta(self, b: int, tables: torch.Tensor) -> PagedBatch:
        pos = self.positions[:b]
        return PagedBatch(self.cache, self.slots[:b], block_tables=tables, context_lens=pos + 1)

    def _forward(self, b: int, tables: torch.Tensor) -> torch.Tensor:
        """The main model on the first ``b`` rows of the buffers, reading the block tables
        ``tables [b, width]`` (a view of the buffer) -> final normed hidden [b, D]."""
        h, _, _ = self.model.hidden_states(self.ids[:b][None], cache=self._meta(b, tables), absorb=True,
                                           positions=self.positions[:b])
        return h[0]

    def _forward_mtp(self, b: int, tables: torch.Tensor) -> torch.Tensor:
        """The MTP module on the first ``b`` rows (tokens t_{i+1}, hidden h_i) -> its hidden [b, D]."""
        return self.model.mtp_states(self.ids[:b][None], self.hidden[:b][None], self.positions[:b],
                                     cache=self._meta(b, tables), absorb=True)[0]

    def _step(self, kind: str, b: int, tables: torch.Tensor) -> torch.Tensor:
        """One step, eager or compiled; a compiled one runs with the bucket's experts swapped in."""
        if self.compiled is None:
            return self.steps[kind](b, tables)
        previous = swap_experts(self._experts_for(b))
        try:
            if (kind, b) in self._compiled_once:
                if self.skip_guard_eval:
                    # This bucket's graph exists and nothing a guard checks changes between steps
                    # (compile_options.py): let dynamo evaluate only the guards that pick the graph.
                    with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                        return self.compiled[kind](b, tables)
                return self.compiled[kind](b, tables)
            # Each bucket is a graph of its own: allow that many recompilations of this step (dynamo's
            # default limit, 8, would run the larger buckets eagerly).
            limit = max(torch._dynamo.config.recompile_limit, 2 * len(self.buckets))
            try:
                with torch._dynamo.config.patch(recompile_limit=limit):
                    out = self.compiled[kind](b, tables)
            except Exception as e:  # noqa: BLE001 - whatever stops the compiler; a real bug re-raises eagerly
                # e.g. experts of another implementation that read token counts on the host (a
                # data-dependent shape): the step cannot be one graph. Decode eagerly on the static
                # buffers rather than fail.
                warnings.warn(f"torch.compile cannot take the {kind} decode step whole ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0]}); running the static steps eagerly",
                              RuntimeWarning, stacklevel=4)
                self.compiled = None
            else:
                self._compiled_once.add((kind, b))
                return out
        finally:
            swap_experts(previous)
        return self.steps[kind](b, tables)

    def _experts_for(self, b: int) -> dict:
        """The experts replacements of a bucket of ``b`` rows (built once per implementation)."""
        chosen = self._bucket_experts.get(b)
        if chosen is None:
            gate = next((p for n, p in self.model.named_parameters() if n.endswith("experts.gate_proj")), None)
            name = None if gate is None else choose_experts(b, self.model.config.num_experts_per_tok, gate)
            if name is not None and name not in self._experts:
                self._experts[name] = build_experts(self.model, name)
            chosen = self._bucket_experts[b] = self._experts.get(name, {})   # {} for a dense model
        return chosen

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
        """Copy the step's rows into the buffers (each token a row); rows n..b-1 become padding."""
        bs = self.cache.block_size
        ids, pos, slots, tables = [], [], [], []
        for toks, start, table in items:
            padded = table + [0] * (self.max_blocks - len(table))
            for j, tok in enumerate(toks):
                p = start + j
                ids.append(tok)
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                tables.append(padded)
        pad = b - len(ids)
        ids += [0] * pad
        pos += [0] * pad
        slots += [self.cache.scratch_slot] * pad
        tables += [[0] * self.max_blocks] * pad
        host = torch.tensor([ids, pos, slots], dtype=torch.long)
        self.ids[:b].copy_(host[0], non_blocking=True)
        self.positions[:b].copy_(host[1], non_blocking=True)
        self.slots[:b].copy_(host[2], non_blocking=True)
        self.tables[:b].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)

    def _capture(self, kind: str, b: int) -> None:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), then capture.
        # The buffers hold the current step, so these runs do its real work (same latents, same slots).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):                            # (a compiled step compiles here)
                self._step(kind, b, self.tables[:b])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._step(kind, b, self.tables[:b])
        self._pool = graph.pool()
        graphs, outputs = (self.graphs, self.outputs) if kind == "main" else (self.mtp_graphs, self.mtp_outputs)
        graphs[b], outputs[b] = graph, out

    @torch.inference_mode()
    def run(self, items) -> torch.Tensor:
        """Main model over each item's tokens (tokens, position of the first, block table)
        -> final normed hidden states of all rows, item by item ``[sum of tokens, D]``."""
        return self._run("main", items)

    @torch.inference_mode()
    def run_mtp(self, items, hidden: torch.Tensor) -> torch.Tensor:
        """The MTP module: item tokens are t_{i+1}, ``hidden [rows, D]`` the matching h_i, row by row
        -> the module's hidden states ``[rows, D]`` (before its norm). Writes the MTP cache layer."""
        if self.hidden is None:
            self.hidden = torch.zeros(self.max_rows, hidden.shape[-1], dtype=hidden.dtype, device=self.ids.device)
        self.hidden[:hidden.shape[0]].copy_(hidden)
        return self._run("mtp", items)

    def _run(self, kind: str, items) -> torch.Tensor:
        n = sum(len(toks) for toks, _, _ in items)
        b = self.bucket(n)
        self._load(items, b)
        if not self.capture:
            tables = self.tables[:b, :self.table_width(items)]
            if self.compiled is not None:
                torch._dynamo.maybe_mark_dynamic(tables, 1)      # one graph per bucket, any width
            return self._step(kind, b, tables)[:n]
        graphs, outputs = (self.graphs, self.outputs) if kind == "main" else (self.mtp_graphs, self.mtp_outputs)
        if b not in graphs:
            try:
                self._capture(kind, b)
            except Exception as e:  # noqa: BLE001 - e.g. an op that reads a value on the host
                warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "decoding eagerly on static shapes instead", RuntimeWarning, stacklevel=3)
                torch.cuda.synchronize()
                self.capture = False
                return self._run(kind, items)
        graphs[b].replay()
        # A copy: the engine keeps hidden states across steps (MTP), the graph overwrites its output.
        return outputs[b][:n].clone()
