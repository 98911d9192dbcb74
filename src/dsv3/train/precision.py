"""The training precision: ``--dtype bf16 | fp32 | auto`` of pre-training, SFT and GRPO.

bf16 is mixed precision: ``torch.autocast`` runs the GEMMs (linears, matmuls, SDPA) in bf16 while
the master weights, gradients and AdamW state stay fp32; the router's logits and scores stay fp32
(model/moe.py switches autocast off there); norms, softmax and the loss are computed in fp32
(model/norm.py, kernels/linear_cross_entropy.py). fp32 runs no autocast at all, so its losses are
those of a run without this module, bit for bit.

``auto`` (the default) is bf16 where the hardware has bf16 units -- a CUDA GPU, or a CPU with
AMX-BF16 / AVX512-BF16 (:func:`dsv3.cpu.has_bf16_units`) -- and fp32 elsewhere: on a CPU without
them a bf16 GEMM converts through fp32 and is slower than fp32 (docs/engine-performance.md). The
decode rule (:func:`dsv3.cpu.auto_dtype`) also times GEMVs, because batch-1 decoding streams weights;
training GEMMs have thousands of rows, where the units alone decide.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..knobs import knob

TRAIN_DTYPES = ("auto", "bf16", "fp32")


def dtype_knob():
    """The ``dtype`` field of a training config (TrainConfig, SFTConfig, GRPOConfig): one declaration."""
    return knob("auto", "training precision: bf16 autocast (fp32 master weights, router and loss) or fp32; auto: "
                        "bf16 where the GPU/CPU has bf16 units (AMX, AVX512-BF16), else fp32",
                choices=TRAIN_DTYPES)


def train_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype ``dtype`` (one of :data:`TRAIN_DTYPES`) means on ``device``: bfloat16 or float32."""
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(TRAIN_DTYPES)}")
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16
    if dev.type == "cpu":
        from ..cpu import has_bf16_units
        return torch.bfloat16 if has_bf16_units() else torch.float32
    return torch.float32


def autocast(device: torch.device | str, dtype: str = "auto"):
    """The forward's precision context on ``device``: ``torch.autocast`` in bf16, or nothing for fp32."""
    dev = torch.device(device)
    if train_dtype(dtype, dev) == torch.bfloat16:
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return nullcontext()
