"""llama.cpp as a benchmark peer, through llama-cpp-python's low-level API (in this process).

:func:`run_llama_cpp` loads a GGUF (as written by ``dsv3 export --to gguf``), decodes every prompt
greedily for exactly ``max_new_tokens`` tokens (end-of-sequence ignored, no repetition penalty: the
next token is the argmax of the logits, lowest id on ties, as ``torch.argmax``), and times prefill
and decode apart, excluding the model load and one untimed warm-up decode.

Batching: ``batch`` sequences share each ``llama_decode`` call (llama.cpp's own multi-sequence
batch: one prefill call holding every prompt of the group with its ``seq_id``, then one call per
step holding the next token of every sequence), with ``n_seq_max = batch`` and a per-sequence (not
unified) KV cache. More prompts than ``batch`` run as consecutive groups.

The latent (KV) cache is stored at the weights' precision for f32 and bf16 files -- as our engine
keeps it in its compute dtype, so an "equal precision" comparison is one -- and in llama.cpp's
default f16 otherwise; ``kv_type`` overrides it and the result reports it.

Flash attention: ``flash_attn=None`` keeps llama.cpp's default (``auto``, which enables it on the
CPU) and llama.cpp then casts an f32 K/V to f16 for it (llama-graph.cpp ``build_attn_mha``):
measured on a random tiny model, logits up to ~1e-3 of their range off our fp32 with an f32
cache, against ~3e-5 with it off. ``flash_attn=False`` is the exact-f32 setting.

Weights are loaded with ``use_extra_bufts=False``: llama.cpp's CPU repacking of DeepSeek tensors
aborts (``GGML_ASSERT(*cur_backend_id != -1)``) for f16/q8_0 on AMX CPUs; the plain CPU buffers
work everywhere (and are what the interop tests measure against).
"""

from __future__ import annotations

import ctypes
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ggml_log_level of this llama.cpp (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5.
# llama-cpp-python 0.3.36 still maps the older numbering (3 = error), so its own log filter prints
# every warning; this module installs a sink of its own instead (for the whole process).
LOG_ERROR = 4
# ggml_type values (ggml.h) for the cache, and the cache type a file type gets by default
# (general.file_type: LLAMA_FTYPE_ALL_F32 = 0, LLAMA_FTYPE_MOSTLY_BF16 = 32).
KV_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}
DEFAULT_KV_TYPE = {0: "f32", 32: "bf16"}


def llama_cpp_unavailable() -> str | None:
    """Why llama.cpp can't run here (llama-cpp-python missing or its library not loadable), or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed (pip install llama-cpp-python): {e}"
    except OSError as e:  # the bundled libllama failed to load
        return f"llama-cpp-python is installed but its llama.cpp library does not load: {e}"
    return None


def llama_cpp_version() -> str:
    """``llama-cpp-python X.Y.Z`` (the package pins the llama.cpp it vendors)."""
    import llama_cpp
    return f"llama-cpp-python {llama_cpp.__version__}"


_recent_log: deque[str] = deque(maxlen=4)  # the last error lines, quoted when a load fails
_log_sink = None  # the ctypes callback, kept alive while llama.cpp may call it


def _install_log_sink(ll) -> None:
    """Errors go to stderr (and are kept for the exception message); warnings and chatter are dropped
    (a GGUF with MTP blocks warns once per MTP tensor that it leaves unused)."""
    global _log_sink
    if _log_sink is not None:
        return

    @ll.llama_log_callback
    def sink(level: int, text: bytes, user_data) -> None:
        if level == LOG_ERROR:
            _recent_log.append(text.decode("utf-8", "replace").strip())
            sys.stderr.write(text.decode("utf-8", "replace"))

    _log_sink = sink
    ll.llama_log_set(sink, ctypes.c_void_p(0))


class LlamaCppModel:
    """A loaded GGUF with one context for ``n_seq`` sequences of up to ``n_ctx_seq`` tokens each.

    kv_type: ``f32``/``f16``/``bf16``/``q8_0`` cache, None for the file's default; flash_attn: None
    for llama.cpp's ``auto`` (see the module docstring). Use as a context manager; :meth:`close`
    frees the context and the model.
    """

    def __init__(self, gguf_path: str, threads: int, n_seq: int, n_ctx_seq: int, n_batch: int,
                 kv_type: str | None = None, flash_attn: bool | None = None):
        import llama_cpp as ll

        if kv_type is not None and kv_type not in KV_TYPES:
            raise ValueError(f"kv_type {kv_type!r}: choose one of {', '.join(KV_TYPES)}")

        self.ll = ll
        if not Path(gguf_path).is_file():
            raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
        _install_log_sink(ll)
        _recent_log.clear()
        ll.llama_backend_init()
        mp = ll.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False  # see the module docstring
        self.model = ll.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}: {' | '.join(_recent_log) or 'no message'}")
        self.ctx = None
        try:
            vocab = ll.llama_model_get_vocab(self.model)
            self.n_vocab = ll.llama_vocab_n_tokens(vocab)
            self.kv_type = kv_type or DEFAULT_KV_TYPE.get(self.meta_int("general.file_type"), "f16")
            cp = ll.llama_context_default_params()
            cp.type_k = cp.type_v = KV_TYPES[self.kv_type]
            cp.flash_attn_type = {None: ll.LLAMA_FLASH_ATTN_TYPE_AUTO, True: ll.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                  False: ll.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
            self.flash_attn = "auto" if flash_attn is None else flash_attn
            cp.n_ctx = n_seq * n_ctx_seq
            cp.n_seq_max = n_seq
            cp.kv_unified = False
            cp.n_batch = n_batch
            cp.n_ubatch = min(n_batch, 512)
            cp.n_threads = cp.n_threads_batch = threads
            cp.no_perf = True
            self.ctx = ll.llama_init_from_model(self.model, cp)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {gguf_path}: "
                                   f"{' | '.join(_recent_log) or 'no message'}")
        except BaseException:
            self.close()
            raise
        self.n_batch = n_batch

    def meta_int(self, key: str) -> int | None:
        """An integer metadata value of the loaded file, or None when absent."""
        buf = ctypes.create_string_buffer(64)
        n = self.ll.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        try:
            return int(buf.value.decode()) if n >= 0 else None
        except ValueError:
            return None

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.ctx:
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.ll.llama_model_free(self.model)
            self.model = None

    def clear(self) -> None:
        """Forget every sequence's cache (between groups of prompts)."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        """One ``llama_decode`` of ``(token, position, seq_id, want_logits)`` entries; returns the
        argmax token of every entry that asked for logits, in order."""
        ll = self.ll
        batch = ll.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            batch.n_tokens = len(entries)
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(entries)} tokens")
            out = []
            for i, (_, _, _, logits) in enumerate(entries):
                if logits:
                    row = np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                    out.append(int(row.argmax()))
            return out
        finally:
            ll.llama_batch_free(batch)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits ``[len(tokens), n_vocab]`` of one sequence's forward pass from position 0 (sequence 0;
        its cache is cleared first). For parity tests."""
        ll = self.ll
        self.clear()
        batch = ll.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(tokens)
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            return np.stack([np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
                             for i in range(len(tokens))]).copy()
        finally:
            ll.llama_batch_free(batch)
            self.clear()


def _check_args(prompts: list[list[int]], max_new_tokens: int, threads: int, batch: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if threads < 1 or batch < 1:
        raise ValueError(f"threads and batch must be >= 1, got threads={threads}, batch={batch}")


def run_llama_cpp(gguf_path, prompts: list[list[int]], max_new_tokens: int, threads: int, batch: int = 1,
                  kv_type: str | None = None, flash_attn: bool | None = None) -> dict:
    """Greedy-decode ``prompts`` (token ids) with llama.cpp, ``batch`` sequences per ``llama_decode``.

    Returns ``tokens`` (the ``max_new_tokens`` new ids of each prompt, in order), ``prefill_s`` (until
    every sequence has its first new token), ``decode_s`` (the other steps), ``decode_tokens``
    (``len(prompts) * (max_new_tokens - 1)``), ``load_s`` (model and context, not in the timings),
    ``batch``, ``kv_type`` (the cache type used), ``flash_attn`` and ``version``. kv_type and
    flash_attn: see :class:`LlamaCppModel`.
    """
    prompts = [[int(t) for t in p] for p in prompts]
    _check_args(prompts, max_new_tokens, threads, batch)
    batch = min(batch, len(prompts))
    groups = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    n_ctx_seq = max(len(p) for p in prompts) + max_new_tokens
    n_batch = max(sum(len(p) for p in g) for g in groups)

    t0 = time.perf_counter()
    with LlamaCppModel(gguf_path, threads, batch, n_ctx_seq, n_batch, kv_type, flash_attn) as m:
        load_s = time.perf_counter() - t0
        bad = [t for p in prompts for t in p if not 0 <= t < m.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of {m.n_vocab}")
        # Warm-up (untimed): the first decode sets up thread pools and compute buffers.
        m.decode([(t, i, 0, i == len(prompts[0]) - 1) for i, t in enumerate(prompts[0])])
        m.clear()

        tokens: list[list[int]] = []
        prefill_s = decode_s = 0.0
        for group in groups:
            t0 = time.perf_counter()
            entries = [(t, i, s, i == len(p) - 1) for s, p in enumerate(group) for i, t in enumerate(p)]
            out = [[tok] for tok in m.decode(entries)]
            prefill_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for step in range(1, max_new_tokens):
                nxt = m.decode([(o[-1], len(p) + step - 1, s, True) for s, (p, o) in enumerate(zip(group, out))])
                for o, tok in zip(out, nxt):
                    o.append(tok)
            decode_s += time.perf_counter() - t0
            tokens += out
            m.clear()
    return {"tokens": tokens, "prefill_s": prefill_s, "decode_s": decode_s,
            "decode_tokens": len(prompts) * (max_new_tokens - 1), "load_s": load_s, "batch": batch,
            "kv_type": m.kv_type, "flash_attn": m.flash_attn, "version": llama_cpp_version()}
