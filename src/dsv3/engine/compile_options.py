"""The inductor options the compiled decode step is built with, chosen by the device it runs on.

:func:`decode_compile_options` is what :class:`dsv3.engine.cuda_graph.CUDAGraphDecoder` passes to
``torch.compile(..., options=...)``. The choice is per device type because what pays differs: on a
CPU the step is a few hundred small C++ loops and library calls whose per-call launch cost (Python
wrapper, argument checks) is a large part of a small model's step; on CUDA the compiled step is
captured in a CUDA graph, which removes launch cost anyway.

:data:`CANDIDATES` names the options ``benchmarks/decode_inductor_options_cpu.py`` measured; the
results and the reasons for what is (and is not) adopted are in benchmarks/RESULTS.md ("inductor
options of the compiled decode step").
"""

from __future__ import annotations

import torch

# Everywhere: round to bf16/fp16 wherever eager does (inductor otherwise keeps fused intermediates
# in fp32), so compiled decoding stays as close to the eager engine as it can.
BASE_OPTIONS = {"emulate_precision_casts": True}

# What each candidate switch adds to BASE_OPTIONS (inductor config keys).
CANDIDATES: dict[str, dict] = {
    # C++ wrapper: the generated module calls its kernels from C++ instead of a Python function.
    "cpp_wrapper": {"cpp_wrapper": True},
    # Parameters and buffers become constants of the graph (constant folding, prepacked weights).
    "freezing": {"freezing": True},
    # Inductor's CPU GEMM templates against ATen's, picked per shape by timing at compile time.
    "max_autotune": {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
    # The generated wrapper's checks of every input's sizes, strides and alignment on each call.
    "no_asserts": {"size_asserts": False, "scalar_asserts": False, "alignment_asserts": False},
}

# Not an inductor option: once a bucket's graph exists, call it with dynamo evaluating only the guards
# that tell its cached graphs apart (torch.compiler.set_stance(skip_guard_eval_unsafe=True)).
SKIP_GUARD_EVAL = "skip_guard_eval"
SWITCHES = tuple(CANDIDATES) + (SKIP_GUARD_EVAL,)

# The switches adopted per device type (RESULTS.md, "inductor options of the compiled decode step"):
# - cpu: cpp_wrapper. The demo model's batch-1 step 3.91 -> 3.39 ms (1.15x; per round 0.86-1.65x)
#   in interleaved rounds, same greedy tokens: the Python wrapper's ~90 input checks, ~100 library
#   calls and ~70 kernel launches per step move into C++.
# - not freezing: with cpp_wrapper and skip_guard_eval its step was within the noise (3.25 vs 3.31 ms
#   without it; per round vs base 0.67-1.71x), and freezing's contract (parameters may be folded into the
#   graph as constants) is one a later in-place weight change would break: a model object trained on
#   after LLM(model, compile=True), or load_state_dict. (torch 2.13 here still passes the parameters
#   in as inputs, tests/test_compile_options.py passes with it on; nothing guarantees that.) Note
#   that dynamo reuses a graph across engines whose models have the same shapes and options (a
#   second such engine "compiled" in 0.4 s), which is safe only while weights stay graph inputs.
# - not skip_guard_eval: within the noise (3.31 vs 3.39 ms with cpp_wrapper; alone 0.92x) and unsafe
#   by name: a guard that would have failed (another model's dtype, a swapped module) goes unnoticed.
# - not no_asserts (measured with skip_guard_eval: 3.46 ms, no better than cpp_wrapper): the size
#   checks are the wrapper's last safety net.
# - int8 (--quantize int8, demo model): cpp_wrapper 1.04x (per round 1.01-1.04x); freezing with
#   max_autotune (CPP,ATEN GEMM templates) 1.00x: the step's _weight_int8pack_mm calls stay library calls.
# - cuda: nothing new; the compiled step is captured in a CUDA graph, which removes the wrapper's
#   launch cost anyway (and cpp_wrapper was not measured with capture).
ADOPTED: dict[str, tuple[str, ...]] = {"cpu": ("cpp_wrapper",), "cuda": ()}


def check_switches(switches) -> None:
    """Raise a ValueError naming any switch that is not one of :data:`SWITCHES`."""
    bad = [s for s in switches if s not in SWITCHES]
    if bad:
        raise ValueError(f"unknown compile switch(es) {bad}; choose from {list(SWITCHES)}")


def options_for(switches: tuple[str, ...] | list[str]) -> dict:
    """BASE_OPTIONS plus the inductor options of each named switch of :data:`CANDIDATES`."""
    check_switches(switches)
    opts = dict(BASE_OPTIONS)
    for s in switches:
        opts.update(CANDIDATES.get(s, {}))
    return opts


def adopted(device: torch.device | str) -> tuple[str, ...]:
    """The switches adopted for ``device``'s type (none for a type not measured)."""
    return ADOPTED.get(torch.device(device).type, ())


def decode_compile_options(device: torch.device | str) -> dict:
    """The ``torch.compile`` options of a decode step whose cache lives on ``device``."""
    return options_for(adopted(device))


def skip_guard_eval(device: torch.device | str) -> bool:
    """Whether compiled decode steps on ``device`` run with dynamo's guard evaluation cut to the
    differentiating guards (only for buckets that have compiled, see ``CUDAGraphDecoder``)."""
    return SKIP_GUARD_EVAL in adopted(device)
