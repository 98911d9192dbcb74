"""``torch.compile`` for training, applied from outside the reference model ("regional" compilation).

What gets compiled, in place, on every block (main layers and MTP modules): the attention (MLA:
projections, norms, RoPE, SDPA), the norms, the dense SwiGLU MLPs and shared experts, and the
routers. On a CPU, inductor fuses their elementwise work (RMSNorm, RoPE, SiLU x up, the router's
sigmoid / group masking) into C++ loops; the matmuls stay the same library calls.

What stays eager: the routed experts, whose per-expert token counts change every step (a compiled
version would recompile or need dynamic shapes), the embedding, the head and the loss (already the
fused kernel of ``kernels/linear_cross_entropy.py``).

Identical layers share one compiled graph (parameters are graph inputs, not constants), so the
compile cost is paid once per distinct shape, during the first steps; :func:`uncompile_model`
returns the modules to eager (e.g. before generating with a cache, whose shapes change every step).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager

from torch import nn

from ..model.mla import MLA
from ..model.mlp import MLP
from ..model.moe import Router
from ..model.norm import RMSNorm

COMPILED_TYPES = (MLA, RMSNorm, MLP, Router)


def compile_model(model: nn.Module, **compile_kwargs) -> list[str]:
    """Compile ``model``'s attention, norms, dense MLPs and routers in place; returns their names.

    ``compile_kwargs`` go to ``torch.compile`` (default ``dynamic=False``: training shapes are fixed).
    Modules inside an already compiled one (e.g. MLA's own norms) are left to the outer graph.
    """
    kwargs = {"dynamic": False, **compile_kwargs}
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    inductor = kwargs.get("backend", "inductor") == "inductor"
    if inductor and on_cpu and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise RuntimeError("compile_model: inductor needs a C++ compiler (g++, c++ or clang++) on PATH for CPU kernels")
    done: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, COMPILED_TYPES):
            continue
        if any(d == "" or name.startswith(d + ".") for d in done):     # "" is the model itself
            continue
        module.compile(**kwargs)
        done.append(name)
    if not done:
        raise ValueError(f"compile_model: no {', '.join(t.__name__ for t in COMPILED_TYPES)} module in the model")
    return done


def uncompile_model(model: nn.Module) -> None:
    """Undo :func:`compile_model`: every module runs its eager forward again."""
    for module in model.modules():
        # nn.Module.compile() keeps the compiled call here; None is the module's uncompiled state.
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None


@contextmanager
def eager(model: nn.Module):
    """Inside the block every module of ``model`` runs eagerly (e.g. GRPO's rollouts with the engine's
    cache, whose shapes change every token); after it the same compiled forwards are back, so
    nothing is compiled again."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules()
                if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield model
    finally:
        for m, call in compiled:
            m._compiled_call_impl = call


def is_compiled(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a compiled forward."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
