"""Greedy generation with vLLM's offline ``LLM``, run as a script inside the vLLM venv.

    .venv-vllm/bin/python src/dsv3/bench/peers/vllm_worker.py REQUEST.json RESULT.json

This file imports only vLLM and the standard library: it runs under vLLM's own Python and torch
(``.venv-vllm``), never inside dsv3's process, so it must not import ``dsv3``. The caller
(:mod:`dsv3.bench.peers.vllm`) writes the request, sets the thread environment before vLLM starts
(``VLLM_CPU_OMP_THREADS_BIND``, ``OMP_NUM_THREADS``, ``VLLM_CPU_KVCACHE_SPACE``: they are read when
vLLM is imported and when its engine process starts), and reads the result file. vLLM logs to
stdout/stderr, so the result goes to a file, not to stdout.

Request (JSON object): ``model`` (directory), ``prompts`` (lists of token ids), ``max_new_tokens``,
``batch`` (``max_num_seqs``), ``dtype``, ``attention_backend`` (``null`` lets vLLM choose),
``native_rope`` (bool: vLLM's PyTorch RoPE instead of its C++ ``rotary_embedding`` op, see
:mod:`dsv3.bench.peers.vllm`), ``max_model_len``, ``warmup`` (bool), ``skip_tokenizer`` (bool).

Result: ``tokens`` (per prompt, the ``max_new_tokens`` generated ids), ``load_s`` (engine start:
weights, cache allocation, warm-up profiling), ``prefill_s`` (a ``max_tokens=1`` run over all prompts:
the prefill of the batch plus one sampled token each), ``generate_s`` (the full run), ``decode_s``
(``generate_s - prefill_s``: the decode steps after the first token), ``decode_tokens``
(``len(prompts) * (max_new_tokens - 1)``), ``version``, ``attention_backend``, ``native_rope``, ``dtype``.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Python puts this script's folder first on sys.path, and beside this file lies dsv3's adapter
# `vllm.py`, which would shadow the real vllm package: take the folder off the path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _run(req: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in req["prompts"]]
    n_new = int(req["max_new_tokens"])
    kwargs = dict(
        model=req["model"],
        dtype=req["dtype"],
        max_num_seqs=int(req["batch"]),
        max_model_len=int(req["max_model_len"]),
        # Eager: no torch.compile / graph capture at start-up (minutes on a small CPU; our side is
        # eager too unless asked otherwise).
        enforce_eager=True,
        # A second run over the same prompts would otherwise reuse the first run's prefill, and the
        # decode time (full run minus prefill run) would come out too small.
        enable_prefix_caching=False,
        skip_tokenizer_init=bool(req.get("skip_tokenizer", False)),
        seed=0,
    )
    if req.get("attention_backend"):
        kwargs["attention_backend"] = req["attention_backend"]
    if req.get("native_rope", True):
        # "-name" switches a custom op off: RotaryEmbedding then runs its forward_native.
        kwargs["compilation_config"] = {"custom_ops": ["-rotary_embedding"]}

    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load_s = time.perf_counter() - t0

    def params(max_tokens: int) -> SamplingParams:
        # Greedy, exactly max_tokens per prompt (ignore_eos), token ids only.
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)

    if req.get("warmup", True):
        # First calls pay one-off costs (thread pools, first allocations); keep them out of the timings.
        llm.generate(prompts, params(2), use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(prompts, params(1), use_tqdm=False)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params(n_new), use_tqdm=False)
    generate_s = time.perf_counter() - t0

    tokens = [list(o.outputs[0].token_ids) for o in outs]       # outputs come back in prompt order
    return {
        "tokens": tokens,
        "load_s": load_s,
        "prefill_s": prefill_s,
        "generate_s": generate_s,
        "decode_s": max(generate_s - prefill_s, 0.0),
        "decode_tokens": len(prompts) * (n_new - 1),
        "version": vllm.__version__,
        "attention_backend": req.get("attention_backend"),    # None: vLLM's own choice
        "native_rope": bool(req.get("native_rope", True)),
        "dtype": req["dtype"],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        req = json.load(f)
    result = _run(req)
    with open(argv[2], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
