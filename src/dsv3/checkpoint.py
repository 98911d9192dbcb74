"""Checkpoints in the Hugging Face layout: ``config.json`` + safetensors (sharded with an index).

One name table (:data:`~dsv3.hf_layout.NAME_TABLE`) maps our parameter names to the checkpoint's.
Loading builds the model on the meta device, allocates it once, then streams tensors one at a time
from memory-mapped shards into place, so peak memory is about the final model size. Official FP8
weights (``float8_e4m3fn`` + ``weight_scale_inv``) are dequantized into the requested dtype on the
way in (or kept FP8: :func:`dsv3.quant.load_pretrained_fp8`). Weights are only ever read from safetensors, never from pickle.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import fp8
from .config import ConfigError, DeploymentWarning, ModelConfig
# The name table lives in hf_layout (quant and train follow it too); checkpoint re-exports it.
from .hf_layout import MTP_SHARED_COPIES, NAME_TABLE  # noqa: F401
from .hf_layout import fp8_block, fp8_quantization_config, hf_names, name_map, quantizable, shared_copy_names
from .model import Transformer
from .model.moe import Router

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


class CheckpointError(RuntimeError):
    """A checkpoint can't be read or doesn't fit the model; the message names the file or tensor."""


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_FP8_DTYPES = {"F8_E4M3"}


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index or the single file's header."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise CheckpointError(f"{index} lists {f.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if single.exists():
        return {name: single for name in _open(single).keys()}
    pickles = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    hint = f" (found {', '.join(sorted(pickles))}: pickle files are never loaded, convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file, truncated or corrupt? ({e})") from e


class TensorReader:
    """Memory-mapped access to tensors across shards, each file opened once."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.handles: dict[Path, object] = {}

    def _handle(self, name: str):
        f = self.files[name]
        if f not in self.handles:
            self.handles[f] = _open(f)
        return self.handles[f]

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        h = self._handle(name)
        try:
            sl = h.get_slice(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.files[name]}: index lists tensor {name!r}, file does not hold it") from e
        return tuple(sl.get_shape()), sl.get_dtype()

    def close_all_but(self, file: Path) -> None:
        """Unmap every shard except ``file``, so finished shards stop counting towards memory."""
        for f in [f for f in self.handles if f != file]:
            del self.handles[f]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r}: {e}") from e


def _resolve_dtype(dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype if dtype is not None else (config.torch_dtype or "float32")
    if name in ("float8_e4m3fn", "fp8"):
        name = "bfloat16"  # FP8 checkpoints dequantize to bf16 unless told otherwise
    name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16"}.get(name, name)
    d = getattr(torch, str(name), None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise CheckpointError(f"dtype {name!r} is not a floating-point torch dtype")
    return d


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, max_seq_len: int | None = None,
                    strict: bool = True,
                    prepare: Callable[[Transformer, frozenset[str]], None] | None = None) -> Transformer:
    """Load a DeepSeek-V3/V2 checkpoint in the HF layout into a :class:`~dsv3.Transformer`.

    dtype: the parameters' dtype (default: the checkpoint's ``torch_dtype``; FP8 -> bfloat16).
    device: where to allocate (default CPU). max_seq_len: the run's context (matters only for
    ``yarn_mode="past_original"``). strict: unexpected tensors are an error (else a warning).
    A checkpoint without any MTP tensors (e.g. exported by transformers) loads without MTP.
    prepare: ``prepare(model, stored_fp8)`` runs on the model while it is still on the meta device,
    with the checkpoint names of the tensors stored as FP8; it may replace layers (e.g. by ones that
    hold ``float8_e4m3fn`` buffers), and the loader then fills whatever the model holds: a tensor
    stored in FP8 goes into an FP8 buffer as it is and is dequantized into any other.
    :func:`dsv3.quant.load_pretrained_fp8` loads this way, keeping FP8 weights FP8.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    try:
        config = ModelConfig.from_json_file(path)
    except ConfigError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    reader = TensorReader(checkpoint_files(path))
    names = set(reader.files)
    if config.num_nextn_predict_layers and not any(
            n.startswith(f"model.layers.{config.num_hidden_layers}.") for n in names):
        warnings.warn(f"{path}: config has num_nextn_predict_layers={config.num_nextn_predict_layers} but the "
                      "checkpoint holds no MTP weights; loading without MTP", stacklevel=2)
        config = config.replace(num_nextn_predict_layers=0)
    dtype = _resolve_dtype(dtype, config)
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = Transformer(config, max_seq_len=max_seq_len)
    model.to(dtype)
    for m in model.modules():  # the router's selection bias stays fp32, as in the official checkpoints
        if isinstance(m, Router) and m.e_score_correction_bias is not None:
            m.e_score_correction_bias.data = m.e_score_correction_bias.data.float()
    block = fp8_block(config)
    if prepare is not None:
        prepare(model, frozenset(n for n in names if reader.info(n)[1] in _FP8_DTYPES))
    targets = name_map(model)
    shared = shared_copy_names(config)

    # Check everything against the headers before reading any data.
    scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
    unexpected = sorted(n for n in names - scales if n not in targets and n not in shared
                        # transformers writes zero-width shared experts when n_shared_experts is 0
                        and 0 not in reader.info(n)[0])
    unexpected += sorted(s for s in scales if s[: -len(SCALE_SUFFIX)] not in names)
    if unexpected:
        msg = f"{path}: unexpected tensor(s) not in the model: {', '.join(unexpected[:5])}" + (
            f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
        if strict:
            raise CheckpointError(msg)
        warnings.warn(msg, stacklevel=2)
    missing = sorted(n for n in targets if n not in names)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s): {', '.join(missing[:5])}"
                              + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    state = model.state_dict(keep_vars=True)
    plan = []
    for hf, (ours, e) in targets.items():
        shape, st_dtype = reader.info(hf)
        want = tuple(state[ours].shape[1:] if e is not None else state[ours].shape)
        if shape != want:
            raise CheckpointError(f"{reader.files[hf].name}: tensor {hf!r} has shape {list(shape)}, "
                                  f"the model expects {list(want)}")
        if st_dtype in _FP8_DTYPES:
            scale_name = hf + SCALE_SUFFIX
            if scale_name not in names:
                raise CheckpointError(f"{reader.files[hf].name}: FP8 tensor {hf!r} has no {scale_name!r}")
            s_shape, _ = reader.info(scale_name)
            if len(shape) != 2 or s_shape != fp8.scale_shape(shape, block):
                raise CheckpointError(f"{reader.files[scale_name].name}: {scale_name!r} has shape {list(s_shape)}, "
                                      f"expected {list(fp8.scale_shape(shape, block))} for {list(shape)} "
                                      f"in {block[0]}x{block[1]} blocks")
        elif st_dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{reader.files[hf].name}: tensor {hf!r} has dtype {st_dtype}, "
                                  "expected a floating-point dtype (F32/F16/BF16 or F8_E4M3 with scales)")
        plan.append((hf, ours, e, st_dtype))

    # One allocation, then stream tensor by tensor, shard by shard (mmap'd, so pages come and go).
    model.to_empty(device=device)
    state = model.state_dict(keep_vars=True)  # the freshly allocated tensors
    plan.sort(key=lambda p: (str(reader.files[p[0]]), p[0]))
    with torch.no_grad():
        for hf, ours, e, st_dtype in plan:
            reader.close_all_but(reader.files[hf])
            t = reader.get(hf)
            target = state[ours] if e is None else state[ours][e]
            if st_dtype in _FP8_DTYPES and target.dtype != fp8.FP8_DTYPE:
                t = fp8.dequantize_blockwise(t, reader.get(hf + SCALE_SUFFIX), block, dtype=torch.float32)
            target.copy_(t)
    model.config = config
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or e.g. '5GB', '500MB'")
    unit = m.group(2).upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


def _current_umask() -> int:
    # Linux shows it without changing it; elsewhere set-and-restore (briefly visible to other threads).
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plainly created file gets under the process umask (0o644 under umask 022)."""
    return 0o666 & ~_current_umask()


def write_safetensors(tensors: dict[str, torch.Tensor], file: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the file mode the umask gives (``save_file`` goes through a
    private temporary file and leaves 0o600, so other users -- a serving engine's account -- can't read it)."""
    save_file(tensors, str(file), metadata=metadata)
    os.chmod(file, default_file_mode())


def weights_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a checkpoint directory's (first) safetensors file; empty when it has none.

    Raises :class:`CheckpointError` when the directory holds no readable weights."""
    files = sorted(set(checkpoint_files(Path(path)).values()))
    if not files:
        raise CheckpointError(f"{path}: the index lists no weight files")
    return dict(_open(files[0]).metadata() or {})


def _atomic_write_json(obj, file: Path) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")  # a plain open(): the mode follows the umask
    os.replace(tmp, file)


def _write_generation_config(config: ModelConfig, path: Path) -> None:
    """``generation_config.json`` with the token ids, as transformers derives it from ``config.json``
    (deployment engines read the stop token from here). Settings already in the file are kept."""
    file = path / GENERATION_CONFIG_FILE
    gen: dict = {"_from_model_config": True}
    if file.exists():
        try:
            gen = json.loads(file.read_text())
        except json.JSONDecodeError:
            pass  # unreadable: replaced
    for key in ("bos_token_id", "eos_token_id"):
        value = getattr(config, key)
        if value is None:
            gen.pop(key, None)
        else:
            gen[key] = value
    if config.extra.get("pad_token_id") is not None:
        gen["pad_token_id"] = config.extra["pad_token_id"]
    _atomic_write_json(gen, file)


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
                    dtype: torch.dtype | None = None, fp8_weights: bool = False,
                    block_size: tuple[int, int] = fp8.DEFAULT_BLOCK, metadata: dict[str, str] | None = None) -> None:
    """Write ``model`` in the HF layout: ``config.json``, ``generation_config.json`` and safetensors,
    sharded above ``max_shard_size``.

    fp8_weights: store linear weights as ``float8_e4m3fn`` + ``weight_scale_inv`` per ``block_size``
    block, as the official V3 release does (adds ``quantization_config``). dtype: cast the rest.
    metadata: extra string pairs for every safetensors header (read back by :func:`weights_metadata`).
    Each file is written under a temporary name and renamed, the index (or single file) last, so an
    interrupted save never looks complete. Files get the umask's mode. A shape that vLLM and SGLang
    can't serve (:meth:`ModelConfig.deployment_warnings`) is reported once per save as a
    :class:`~dsv3.config.DeploymentWarning`.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    for message in config.deployment_warnings():
        warnings.warn(f"{path}: {message}", DeploymentWarning, stacklevel=2)
    header = {"format": "pt", **(metadata or {})}
    limit = _parse_size(max_shard_size)
    tensors: list[tuple[str, torch.Tensor]] = []
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        for hf, e in hf_names(name, tuple(t.shape), config):
            tensors.append((hf, t if e is None else t[e]))
        for copy_name, ours in shared_copy_names(config).items():
            if ours == name:
                tensors.append((copy_name, t))

    def prepare(hf: str, t: torch.Tensor):
        t = t.detach()
        if t.dtype == fp8.FP8_DTYPE or hf.endswith(SCALE_SUFFIX):  # already FP8 (dsv3.quant): as it is
            return [(hf, t.contiguous().clone())]
        if fp8_weights and quantizable(hf):
            q, s = fp8.quantize_blockwise(t, block_size)
            return [(hf, q), (hf + SCALE_SUFFIX, s)]
        if dtype is not None and t.is_floating_point() and not hf.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        return [(hf, t.contiguous().clone())]  # own storage: safetensors refuses shared/viewed tensors

    # Greedy sharding in name order; sizes are known before any tensor is converted.
    def nbytes(hf: str, t: torch.Tensor) -> int:
        if fp8_weights and quantizable(hf):
            return t.numel() + 4 * math.prod(fp8.scale_shape(tuple(t.shape), block_size))
        return t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())

    tensors.sort(key=lambda x: x[0])
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for hf, t in tensors:
        n = nbytes(hf, t)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((hf, t))
        size += n

    hf_config = config.to_hf()
    hf_config.pop("quantization_config", None)  # describes the weights as written below, if at all
    if any(t.dtype == fp8.FP8_DTYPE for _, t in tensors):  # a model holding FP8 layers keeps its layout
        hf_config["quantization_config"] = dict(config.quantization_config or fp8_quantization_config())
    elif fp8_weights:
        hf_config["quantization_config"] = fp8_quantization_config(block_size)
    stored = dtype if dtype is not None else (torch.bfloat16 if fp8_weights else model.embed_tokens.weight.dtype)
    hf_config["torch_dtype"] = str(stored).replace("torch.", "")
    _atomic_write_json(hf_config, path / "config.json")
    _write_generation_config(config, path)

    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for fname, shard in zip(names, shards):
        out = {}
        for hf, t in shard:
            for k, v in prepare(hf, t):
                out[k] = v
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        tmp = path / (fname + ".tmp")
        write_safetensors(out, tmp, metadata=header)
        if n > 1 or fname != SINGLE_FILE:
            os.replace(tmp, path / fname)
        else:
            final_single = tmp
    # Remove files of an older save that this one doesn't use.
    keep = set(names)
    for old in list(path.glob("model*.safetensors")):
        if old.name not in keep:
            old.unlink()
    if n == 1:
        (path / INDEX_FILE).unlink(missing_ok=True)
        os.replace(final_single, path / SINGLE_FILE)
    else:
        _atomic_write_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                           path / INDEX_FILE)
