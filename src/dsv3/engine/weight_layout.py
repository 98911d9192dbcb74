"""Column-major ``Linear`` weights: the layout a CPU decodes fp32 models fastest from.

``F.linear(x, W)`` computes ``x @ W.T``. With ``W [out, in]`` stored row-major (as checkpoints and
``nn.Linear`` keep it) the GEMM library sees a transposed right operand; with ``W`` stored
column-major (``W.T`` contiguous) it sees a plain ``[in, out]`` matrix. For the 1-8 rows of a decode
step, with weights coming from memory rather than cache, MKL streams the plain layout much faster
on the project's AVX2 CPU (cold cache, one thread, the 8192 x 256 head): 0.33 vs 0.80 ms at 1 row,
0.55 vs 1.35 ms at 2 rows, 1.31 vs 2.02 ms at 8 rows; never slower for the prompt's large row
counts (docs/engine-performance.md). The values are untouched: only the strides change, so
``weight.shape``, ``state_dict()`` keys and every ``.view`` of a weight along its output rows stay
valid.

One exception stays row-major: MLA's ``kv_b_proj`` (:data:`ROW_MAJOR`). Decoding never multiplies
by it as a Linear; the absorbed attention reads it as ``W_UK [H, nope, r]`` and ``W_UV [H, v, r]``
views (``MLA.absorbed_weights``) in two batched products with one row per head, whose per-head
matrices are plain (or plainly transposed) in the row-major layout. ``small`` preset, batch 1, one
thread: the eager step 1.10x faster row-major (MKL's ``bmm``); compiled (inductor writes one-row
batched products as loops vectorized along the latent ``r``) the two products alone 1.34-1.43x,
the whole step par within noise. Measured in docs/engine-performance.md.

Applied by :class:`dsv3.LLM` to the model it loads itself on a CPU. A model handed to the engine is
left as it is: it may be the one being trained (GRPO rollouts), whose optimizer and checkpoint
writer expect the usual layout.
"""

from __future__ import annotations

import torch
from torch import nn

# Linear layers (by attribute name) kept row-major: read through per-head views, not called (see above).
ROW_MAJOR = ("kv_b_proj",)


def column_major_linears(model: nn.Module) -> int:
    """Re-store every plain ``nn.Linear`` weight of ``model`` column-major, in place; returns how many.

    Only float32 weights: for bf16/fp16 on a CPU without native support the column-major layout is
    ~10x *slower* (the 8192 x 256 head at 8 rows: 58 vs 5 ms), so those stay as they are. Also
    skipped: weights shared with another module (a tied ``lm_head`` is the embedding table, whose
    row gathers want row-major); FP8 layers are not ``nn.Linear``; the :data:`ROW_MAJOR` ones.
    """
    seen: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    changed = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if name.rpartition(".")[2] in ROW_MAJOR:
                continue
            if type(module) is not nn.Linear or w is None or w.dim() != 2 or w.dtype != torch.float32:
                continue
            if seen[id(w)] > 1 or w.stride() == (1, w.shape[0]):
                continue
            w.data = w.data.t().contiguous().t()           # same values, strides (1, out)
            changed += 1
    return changed
