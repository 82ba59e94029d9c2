"""lorakit: LoRA fine-tuning for open LLMs with a PEFT-compatible API."""

from .config import LoraConfig
from .errors import AdapterLoadError, AdapterNotFoundError, ConfigError, LoraKitError, TargetModulesError
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSaveWrapper
from .lora_model import LoraModel
from .model import PeftModel, PeftModelForCausalLM, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "get_peft_model", "PeftModel", "PeftModelForCausalLM", "LoraModel",
    "LoraLayer", "LoraLinear", "LoraEmbedding", "ModulesToSaveWrapper",
    "LoraKitError", "ConfigError", "TargetModulesError", "AdapterLoadError", "AdapterNotFoundError",
]
