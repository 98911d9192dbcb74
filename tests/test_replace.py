"""Explicit module replacement (dsv3.replace) and the default device rule (dsv3.device)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv3.device import resolve_device
from dsv3.replace import adopt_tensors, replace_module


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 2))
        self.register_buffer("kept", torch.arange(3.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)
        self.child = nn.Linear(2, 2)


def test_replace_module_keeps_the_position_and_returns_the_old_one():
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    names = [n for n, _ in model.named_modules()]
    old = model[1][1]
    new = nn.Linear(3, 1)
    assert replace_module(model, "1.1", new) is old
    assert model[1][1] is new and [n for n, _ in model.named_modules()] == names
    with pytest.raises(AttributeError):
        replace_module(model, "1.7", new)
    with pytest.raises(TypeError, match="not a module"):
        replace_module(WithBuffers(), "w", new)
    with pytest.raises(ValueError, match="root"):
        replace_module(model, "", new)


def test_adopt_tensors_takes_parameters_and_buffers_by_reference():
    old = WithBuffers().eval()
    new = nn.Module()
    adopt_tensors(new, old)
    assert new.w is old.w and new.kept is old.kept and new.scratch is old.scratch
    assert list(new.state_dict()) == ["w", "kept"]                 # persistence as in old
    assert not hasattr(new, "child") and new.training is False
    with_children = adopt_tensors(nn.Module(), old, children=True)
    assert with_children.child is old.child
    assert list(with_children.state_dict()) == list(old.state_dict())


def test_adopt_tensors_refuses_leftover_parameters():
    with pytest.raises(ValueError, match="bias"):
        adopt_tensors(nn.Linear(2, 3), nn.Linear(2, 3, bias=False))


def test_resolve_device():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == auto and resolve_device("") == auto
    assert resolve_device("cpu") == torch.device("cpu")
    d = torch.device("cpu")
    assert resolve_device(d) is d
    with pytest.raises(RuntimeError):
        resolve_device("gpu")
