"""An adapter folder sorted into the parts other runtimes care about: plain LoRA pairs, and what llama.cpp's
adapter files and vLLM cannot hold (DoRA magnitudes, embedding adapters, whole saved modules, trained biases)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapter_folder import base_quantization, check_adapter_dir, read_weights
from lorakit.config import LoraConfig
from lorakit.errors import AdapterLoadError

PEFT_PREFIX = "base_model.model."  # PEFT's on-disk keys start with the wrapper's path to the base model


@dataclass
class AdapterParts:
    """What one adapter folder holds. Module names are the base model's (model.layers.0.self_attn.q_proj)."""
    path: Path
    config: LoraConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A (r, in), B (out, r))
    dora: list[str] = field(default_factory=list)  # modules with a DoRA magnitude vector
    embeddings: list[str] = field(default_factory=list)  # embedding modules with LoRA (lora_embedding_A/B)
    saved: list[str] = field(default_factory=list)  # whole tensors: modules_to_save copies, trained biases
    quantization: str | None = None  # "nf4": trained as QLoRA on the NF4-rounded base

    @property
    def ranks(self) -> dict[str, int]:
        return {module: a.shape[0] for module, (a, _) in self.pairs.items()}

    def scale(self, module: str) -> float:
        """The factor the adapter's update B·A is multiplied by in this module (alpha / r, or / sqrt(r))."""
        return self.config.scaling_for(module)

    def delta(self, module: str) -> torch.Tensor:
        """The change the adapter makes to the module's weight: B·A·scale (out, in)."""
        a, b = self.pairs[module]
        return (b.double() @ a.double() * self.scale(module)).float()


def module_of(key: str, marker: str) -> str:
    """base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ".lora_A" -> model.layers.0.self_attn.q_proj"""
    name = key.split(marker, 1)[0]
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def read_adapter_parts(path: str | os.PathLike) -> AdapterParts:
    """Read an adapter folder (config and tensors) and sort its tensors; fails on a pair missing one half."""
    root = check_adapter_dir(path, flag="RUN_DIR")
    config = LoraConfig.from_pretrained(root)
    parts = AdapterParts(root, config, quantization=base_quantization([root]))
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_weights(root).items():
        if ".lora_A." in key or ".lora_B." in key:
            marker = ".lora_A." if ".lora_A." in key else ".lora_B."
            halves.setdefault(module_of(key, marker), {})[marker[6]] = tensor
        elif ".lora_embedding_" in key:
            module = module_of(key, ".lora_embedding_")
            if module not in parts.embeddings:
                parts.embeddings.append(module)
        elif ".lora_magnitude_vector" in key:
            parts.dora.append(module_of(key, ".lora_magnitude_vector"))
        else:
            parts.saved.append(module_of(key, "\0"))
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterLoadError(f"{root}: the LoRA pair of {module} lacks its lora_{missing} tensor; the adapter "
                                   "file is incomplete. Re-save or re-copy it.")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterLoadError(f"{root}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which "
                                   "do not form a LoRA pair (A is rank x in, B is out x rank). Re-save the adapter.")
        parts.pairs[module] = (a.float(), b.float())
    if config.use_dora and not parts.dora:
        parts.dora = sorted(parts.pairs)
    if config.modules_to_save:
        listed = [m for m in config.modules_to_save if not any(s.startswith(m) or f".{m}" in s for s in parts.saved)]
        parts.saved += listed
    return parts
