"""Training checkpoints of a LoRA run (``dsv3 sft --lora-rank``): the adapter instead of the model.

The adapters themselves (modules, PEFT layout, merge) are :mod:`dsv3.lora`, which inference loads
too; only the checkpointing of a training run is training's.
"""

from __future__ import annotations

from pathlib import Path

from ..lora import load_adapter, save_adapter


class AdapterCheckpoints:
    """A training runner (:class:`~dsv3.train.loop.SingleProcess`'s interface) whose checkpoints hold
    the adapter instead of the model: ``OUT/NAME/`` gets ``adapter_config.json`` (its
    ``base_model_name_or_path`` pointing to ``base``), ``adapter_model.safetensors`` (carrying the save
    id, so the checkpoint rules of :mod:`dsv3.train.state` hold: atomic, complete only with its state)
    and the tokenizer; ``OUT/train_state/`` as usual (the optimizer then only has adapter moments).
    Everything else is the wrapped runner's."""

    def __init__(self, runner, base: str):
        self.runner, self.base = runner, base

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def save(self, out_dir: Path, name: str, model, tokenizer, optimizer, trainer_state: dict) -> Path:
        from .state import save_training_checkpoint
        return save_training_checkpoint(
            out_dir, name, model, tokenizer, optimizer, trainer_state,
            save_model=lambda m, d, metadata: save_adapter(m, d, base_model=self.base, metadata=metadata))

    def load(self, path: Path, model, optimizer) -> dict:
        """The adapter, optimizer and RNG state of checkpoint ``path`` into ``model`` / ``optimizer``."""
        from .state import load_training_state
        load_adapter(model, path)
        return load_training_state(path, optimizer)
