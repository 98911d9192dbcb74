"""Peers the benchmarks measure against, one adapter per engine: ``llama_cpp`` (llama-cpp-python, in
this process, on a GGUF from ``dsv3 export --to gguf``) and ``vllm`` (vLLM's CPU backend in its own
venv). Each exposes ``run_<engine>(...) -> dict`` with ``tokens``, ``prefill_s``, ``decode_s``,
``decode_tokens`` and ``version``, and ``<engine>_unavailable() -> str | None`` (the reason it can't
run here, or None).
"""
