"""LoRA moved to :mod:`dsv3.lora` (the engine loads adapters too; ``dsv3.engine`` must not import
training) and its run checkpoints to :mod:`dsv3.train.lora_checkpoints`; these names stay importable."""

from ..lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ATTENTION_TARGETS, BASE_DTYPES, DEFAULT_TARGETS,  # noqa: F401
                    EXPERT_PROJS, LORA_MODULES, PEFT_PREFIX, TARGETS, LoRAError, LoRAExperts, LoRALinear,
                    adapter_config, apply_lora, is_adapter_dir, load_adapter, lora_modules, lora_parameters,
                    lora_state_dict, lora_targets, merge_adapter, merge_lora, parse_targets, read_adapter_config,
                    save_adapter)
from .lora_checkpoints import AdapterCheckpoints  # noqa: F401
