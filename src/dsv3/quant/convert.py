"""``dsv3 convert --to fp8 | --to bf16 SRC DST``: rewrite a checkpoint in the official FP8 layout or back.

Streams shard by shard, tensor by tensor (memory: about one shard), keeping the shard file names:
  --to fp8   every weight the official checkpoints keep in FP8 (``hf_layout.quantizable``: linear
             layers of attention and MLPs/experts) becomes ``float8_e4m3fn`` + ``weight_scale_inv``
             per 128x128 block; embedding, head, router gate, norms and MTP ``eh_proj`` become bf16,
             the router's ``e_score_correction_bias`` stays fp32; ``config.json`` gets the
             ``quantization_config`` (with ``scale_fmt: ue8m0`` for power-of-two scales, as V3.1).
  --to bf16  FP8 weights are dequantized (``q * scale`` per block) to bf16, scales dropped,
             ``quantization_config`` removed.
Tokenizer and generation files are copied; training state (optimizer, trainer state) is not.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .. import fp8
from ..checkpoint import (INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE, CheckpointError, TensorReader, checkpoint_files,
                          write_safetensors)
from ..config import ConfigError, ModelConfig
from ..hf_layout import fp8_quantization_config, quantizable

TARGETS = ("fp8", "bf16")
# Files beside the weights that describe the model and are copied as they are.
_COPIED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".md")
_NOT_COPIED = {"config.json", INDEX_FILE, "trainer_state.json"}
_KEEP_FP32 = "e_score_correction_bias"   # the router's selection bias: fp32 in the official checkpoints


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, to: str,
                       block: tuple[int, int] = fp8.DEFAULT_BLOCK, scale_fmt: str | None = None,
                       log=print) -> dict:
    """Convert checkpoint directory ``src`` into ``dst`` (``to`` = ``fp8`` or ``bf16``); returns a summary."""
    src, dst = Path(src), Path(dst)
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: must be one of {TARGETS}")
    fp8.check_scale_fmt(scale_fmt)
    if not (src / "config.json").exists():
        raise CheckpointError(f"{src}: no config.json (not a checkpoint directory)")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the destination must differ from the source")
    raw = json.loads((src / "config.json").read_text())
    try:
        ModelConfig.from_hf(raw)
    except ConfigError as e:
        raise CheckpointError(f"{src / 'config.json'}: {e}") from e
    files = checkpoint_files(src)
    reader = TensorReader(files)
    names = set(files)
    src_fp8 = [n for n in names if reader.info(n)[1] == "F8_E4M3"]
    if to == "fp8" and src_fp8:
        raise CheckpointError(f"{src}: already holds FP8 weights (e.g. {sorted(src_fp8)[0]}); "
                              "convert it --to bf16 first to re-quantize with other settings")
    src_block = tuple((raw.get("quantization_config") or {}).get("weight_block_size") or fp8.DEFAULT_BLOCK)

    dst.mkdir(parents=True, exist_ok=True)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    weight_map: dict[str, str] = {}
    total = 0
    stats = {"quantized": 0, "dequantized": 0, "bytes_in": 0, "bytes_out": 0}
    for f in sorted(by_file):
        reader.close_all_but(f)
        out: dict[str, torch.Tensor] = {}
        for name in sorted(by_file[f]):
            t = reader.get(name)
            stats["bytes_in"] += t.numel() * t.element_size()
            for k, v in _convert_tensor(name, t, to, block, scale_fmt, src_block, reader, names, stats):
                out[k] = v.contiguous()
        tmp = dst / (f.name + ".tmp")
        write_safetensors(out, tmp, metadata={"format": "pt"})  # the umask's mode, not 0600
        os.replace(tmp, dst / f.name)
        for k, v in out.items():
            weight_map[k] = f.name
            total += v.numel() * v.element_size()
        log(f"{f.name}: {len(out)} tensors")
    stats["bytes_out"] = total
    if (src / INDEX_FILE).exists():
        (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    elif len(by_file) != 1 or next(iter(by_file)).name != SINGLE_FILE:
        raise CheckpointError(f"{src}: unexpected shard layout")

    raw.pop("quantization_config", None)
    if to == "fp8":
        raw["quantization_config"] = fp8_quantization_config(block, scale_fmt)
    raw["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in _COPIED_SUFFIXES and p.name not in _NOT_COPIED:
            shutil.copy2(p, dst / p.name)
    return {"src": str(src), "dst": str(dst), "to": to, "block": list(block), "scale_fmt": scale_fmt, **stats}


def _convert_tensor(name, t, to, block, scale_fmt, src_block, reader, names, stats):
    """The tensor(s) that checkpoint tensor ``name`` becomes."""
    if to == "fp8":
        if quantizable(name) and t.is_floating_point():
            if t.dim() != 2:
                raise CheckpointError(f"{name}: FP8 quantization needs a 2-D weight, got shape {list(t.shape)}")
            q, s = fp8.quantize_blockwise(t, block, scale_fmt)
            stats["quantized"] += 1
            return [(name, q), (name + SCALE_SUFFIX, s)]
    else:
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in names:
            return []                                  # consumed with its weight
        if t.dtype == fp8.FP8_DTYPE:
            scale = name + SCALE_SUFFIX
            if scale not in names:
                raise CheckpointError(f"{name}: FP8 tensor without {scale!r}")
            stats["dequantized"] += 1
            return [(name, fp8.dequantize_blockwise(t, reader.get(scale), src_block, torch.bfloat16))]
    if t.is_floating_point() and not name.endswith(_KEEP_FP32):
        t = t.to(torch.bfloat16)
    return [(name, t)]
