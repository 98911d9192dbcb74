"""The DeepSeek-V3 model, one concept per file."""

from .cache import LatentCache
from .transformer import ModelOutput, Transformer

__all__ = ["LatentCache", "ModelOutput", "Transformer"]
