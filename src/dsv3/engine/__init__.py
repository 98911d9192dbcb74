"""Inference engine: sequences, paged latent cache, scheduler, runner, sampling, speculative decoding."""

from .llm import LLM, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
