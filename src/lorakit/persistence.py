"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

In memory, tensors carry the adapter name (`q_proj.lora_A.default.weight`); on disk they do not
(`q_proj.lora_A.weight`), so one file can be loaded under any name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME
from .errors import AdapterLoadError

LEGACY_WEIGHTS_NAME = "adapter_model.bin"


def file_key(key: str, adapter: str) -> Optional[str]:
    """The on-disk name of state-dict entry `key` if it belongs to `adapter`, else None."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if parts[i + 1] != adapter:
            continue
        if part in ("lora_A", "lora_B"):
            return ".".join(parts[: i + 1] + parts[i + 2:])
        if part in ("lora_embedding_A", "lora_embedding_B") and i + 2 == len(parts):
            return ".".join(parts[: i + 1])
        if part == "lora_magnitude_vector":
            return ".".join(parts[: i + 1])
        if part == "modules_to_save":
            return ".".join(parts[:i] + parts[i + 2:])
    return None


def bias_keys(state: dict[str, torch.Tensor], mode: str, lora_layer_names: set[str]) -> list[str]:
    """Bias entries that an adapter trained with bias=`mode` owns (PEFT saves them with the adapter)."""
    if mode == "none":
        return []
    keys = []
    for key in state:
        if not key.endswith(".bias") or any(p in key for p in (".lora_", ".modules_to_save.", ".original_module.")):
            continue
        owner = key[: -len(".bias")]
        if mode == "all" or (owner.endswith(".base_layer") and owner[: -len(".base_layer")] in lora_layer_names):
            keys.append(key)
    return keys


def adapter_state_dict(module: nn.Module, adapter: str, bias: str, lora_layer_names: set[str],
                       state: Optional[dict] = None) -> dict:
    """The tensors of one adapter under their on-disk names (from `state`, by default module.state_dict())."""
    state = module.state_dict() if state is None else state
    out = {}
    for key, value in state.items():
        name = file_key(key, adapter)
        if name is not None:
            out[name] = value
    for key in bias_keys(state, bias, lora_layer_names):
        out[key] = state[key]
    return out


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read adapter tensors with errors that say what is wrong with the directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterLoadError(f"Adapter directory {directory} does not exist (expected {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} written by save_pretrained).")
    file = directory / WEIGHTS_NAME
    if file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterLoadError(f"{file} is corrupt or truncated and cannot be read ({exc}). "
                                   "Re-save or re-download the adapter.") from None
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad pickle
            raise AdapterLoadError(f"{legacy} is corrupt and cannot be read ({exc}).") from None
    raise AdapterLoadError(f"No adapter weights in {directory}: expected {WEIGHTS_NAME} "
                           f"(or PEFT's older {LEGACY_WEIGHTS_NAME}). Found: "
                           f"{', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'}.")


def load_adapter_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], adapter: str, source: str,
                         base_hint: str = "") -> None:
    """Copy on-disk tensors into `adapter`'s parameters, checking every name and shape first."""
    state = module.state_dict(keep_vars=True)
    expected = {}
    for key, value in state.items():
        name = file_key(key, adapter)
        if name is not None:
            expected[name] = value
    plan = []
    for name, tensor in tensors.items():
        target = expected.pop(name, None)
        if target is None:
            target = state.get(name)
        if target is None and name.endswith((".weight", ".bias")):  # a base tensor of a wrapped layer
            stem, _, leaf = name.rpartition(".")
            target = state.get(f"{stem}.base_layer.{leaf}")
        if target is None:
            raise AdapterLoadError(f"Adapter {source} has tensor {name!r}, which matches nothing in this model. "
                                   f"The adapter was made for another architecture{base_hint}.")
        if tuple(target.shape) != tuple(tensor.shape):
            raise AdapterLoadError(
                f"Adapter {source} does not fit this base model: tensor {name!r} has shape {tuple(tensor.shape)} "
                f"in the file but the model expects {tuple(target.shape)}. The adapter was trained on a "
                f"different base model{base_hint}.")
        plan.append((target, tensor))
    if expected:
        missing = sorted(expected)
        raise AdapterLoadError(f"Adapter {source} lacks {len(missing)} tensor(s) its config calls for, e.g. "
                               f"{missing[0]!r}; the file is incomplete or does not belong to this config.")
    with torch.no_grad():
        for target, tensor in plan:
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))
