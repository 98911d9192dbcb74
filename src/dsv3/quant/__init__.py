"""Quantized inference applied from outside the reference model: FP8 weights kept as FP8.

``quantize_model(model)`` replaces the linear layers that the official checkpoints store in FP8 by
:class:`~dsv3.quant.linear.FP8Linear` / :class:`~dsv3.quant.linear.FP8RoutedExperts`;
``load_pretrained_fp8(path)`` does the same while loading an FP8 checkpoint;
``dsv3 convert`` (:mod:`dsv3.quant.convert`) rewrites checkpoints into the FP8 layout and back.
"""

__all__ = ["FP8Linear", "FP8RoutedExperts", "fp8_linear", "quantize_model", "replace_with_fp8",
           "load_pretrained_fp8", "fp8_weight_bytes"]


def __getattr__(name):
    # Imported on first use, so that importing a light submodule (quant.memory, quant.convert) stays cheap.
    if name in ("FP8Linear", "FP8RoutedExperts", "fp8_linear", "quantize_model", "replace_with_fp8",
                "load_pretrained_fp8"):
        from . import linear
        return getattr(linear, name)
    if name == "fp8_weight_bytes":
        from . import memory
        return memory.fp8_weight_bytes
    raise AttributeError(name)
