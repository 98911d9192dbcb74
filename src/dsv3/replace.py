"""Explicit module replacement: how a fast path is applied to a model from outside.

A fast path (FP8 inference or training layers, quantized layers, other expert kernels) is a module
of its own class. It is built beside the module it replaces, takes over that module's tensors *by
reference* (:func:`adopt_tensors`) and is put in its place on the parent (:func:`replace_module`).
So Parameters stay the very same objects (an optimizer built before still updates them), the
state-dict names and order are unchanged, and no class of the model is ever modified (no
``__class__`` assignment). ``dsv3.engine.experts.use_experts`` and ``dsv3.quant.weight_only``
replace modules the same way.
"""

from __future__ import annotations

from torch import nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` inside ``root`` (``setattr`` on its parent); returns the old module.

    The parent keeps the child's position, so iteration and state-dict order do not change.
    """
    if not name:
        raise ValueError("replace_module: the root module itself can't be replaced in place; use the new module")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name)          # get_submodule("") is root
    old = getattr(parent, child)                      # AttributeError names the missing child
    if not isinstance(old, nn.Module):
        raise TypeError(f"replace_module: {name!r} is a {type(old).__name__}, not a module")
    setattr(parent, child, new)
    return old


def adopt_tensors(new: nn.Module, old: nn.Module, children: bool = False) -> nn.Module:
    """Make ``new`` hold the Parameters and buffers that ``old`` holds itself, by reference, under the
    same names (buffers with the same persistence), and take its train/eval mode; returns ``new``.

    children: also take over ``old``'s child modules (e.g. a subclass of an attention module that keeps
    its projections). ``new`` must not hold other direct Parameters than ``old`` (a ``ValueError``
    otherwise): a leftover placeholder would silently change the state dict.
    """
    # Persistence is visible through the state dict: a direct buffer is persistent iff its bare name is there.
    persistent = {k for k in old.state_dict(keep_vars=True) if "." not in k}
    for name, p in old.named_parameters(recurse=False):
        new.register_parameter(name, p)
    for name, b in old.named_buffers(recurse=False):
        new.register_buffer(name, b, persistent=name in persistent)
    if children:
        for name, child in old.named_children():
            setattr(new, name, child)
    extra = sorted({n for n, _ in new.named_parameters(recurse=False)} - {n for n, _ in old.named_parameters(recurse=False)})
    if extra:
        raise ValueError(f"adopt_tensors: {type(new).__name__} holds Parameter(s) {extra} that "
                         f"{type(old).__name__} does not")
    new.training = old.training
    return new
