"""Quantized inference applied from outside the reference model: FP8 weights kept as FP8.

``quantize_model(model)`` swaps the linear layers that the official checkpoints store in FP8 for
:class:`~dsv3.quant.linear.FP8Linear` / :class:`~dsv3.quant.linear.FP8RoutedExperts`;
``load_pretrained(path, keep_fp8=True)`` does the same while loading an FP8 checkpoint.
"""

from .linear import FP8Linear, FP8RoutedExperts, fp8_linear, quantize_model, replace_with_fp8

__all__ = ["FP8Linear", "FP8RoutedExperts", "fp8_linear", "quantize_model", "replace_with_fp8"]
