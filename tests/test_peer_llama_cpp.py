"""The llama.cpp benchmark adapter without llama.cpp: the reason it gives when llama-cpp-python is
missing, and its argument checks (running llama.cpp is in tests/interop/test_llama_cpp.py)."""

from __future__ import annotations

import sys

import pytest

from dsv3.bench.peers.llama_cpp import llama_cpp_unavailable, run_llama_cpp


def test_reason_when_llama_cpp_python_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # makes `import llama_cpp` raise ImportError
    reason = llama_cpp_unavailable()
    assert reason is not None and "llama-cpp-python is not installed" in reason


@pytest.mark.parametrize("prompts, n, threads, batch, match", [
    ([], 4, 1, 1, "non-empty"),
    ([[1, 2], []], 4, 1, 1, "non-empty"),
    ([[1, 2]], 0, 1, 1, "max_new_tokens"),
    ([[1, 2]], 4, 0, 1, "threads"),
    ([[1, 2]], 4, 1, 0, "batch"),
])
def test_bad_arguments_are_refused_before_loading(tmp_path, prompts, n, threads, batch, match):
    with pytest.raises(ValueError, match=match):
        run_llama_cpp(tmp_path / "absent.gguf", prompts, n, threads, batch)
