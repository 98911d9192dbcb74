"""dsv3: DeepSeek-V3 end to end in readable PyTorch."""

from .config import ConfigError, ModelConfig, preset
from .model import LatentCache, ModelOutput, Transformer

__version__ = "0.1.0"

__all__ = ["ConfigError", "LatentCache", "ModelConfig", "ModelOutput", "Transformer", "preset",
           "load_pretrained", "save_pretrained", "CheckpointError", "LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name):
    # Checkpoint I/O pulls in safetensors; import it on first use.
    if name in ("load_pretrained", "save_pretrained", "CheckpointError"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name in ("LLM", "SamplingParams", "RequestOutput"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
