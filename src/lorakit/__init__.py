"""lorakit: LoRA fine-tuning for open LLMs with a PEFT-compatible API."""

__version__ = "0.1.0"
