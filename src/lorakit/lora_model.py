"""LoraModel: the adapters injected into a model: add, delete, activate, merge, combine and unload them.

It sets which adapters each LoRA layer runs (set_adapter, merge_adapter, disable_adapter_layers ...); the
layers themselves never decide that in a forward.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .combine import add_weighted_adapter
from .config import LoraConfig
from .errors import AdapterNotFoundError
from .inject import resolve_modules_to_save, resolve_targets, wrap_module_to_save, wrap_target
from .layers import LoraLayer, ModulesToSaveWrapper, is_quantized_linear
from .row_adapters import BASE_ADAPTER


def model_name(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return str(name) if name else None


class LoraModel(nn.Module):
    """Owns the injected layers: add, delete, activate, merge and unload adapters."""

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.active_adapter: str = adapter_name
        for param in model.parameters():
            param.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # -- walking the injected modules ---------------------------------------------------------------
    def lora_layers(self) -> Iterator[tuple[str, LoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                yield name, module

    def _adapter_modules(self) -> Iterator[LoraLayer | ModulesToSaveWrapper]:
        for module in self.model.modules():
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                yield module

    def check_adapters(self, names: Sequence[str]) -> None:
        """Raise AdapterNotFoundError naming the loaded adapters when one of `names` is not loaded."""
        for name in names:
            if name not in self.peft_config:
                raise AdapterNotFoundError(f"No adapter named {name!r}; loaded adapters: "
                                           f"{', '.join(self.peft_config) or 'none'}.")

    # -- adapters -----------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; pick another name or "
                             "delete_adapter() it first.")
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for 'no adapter' in mixed batches.")
        if config.base_model_name_or_path is None:
            config = replace(config, base_model_name_or_path=model_name(self.model))
        targets = resolve_targets(self.model, config)
        to_save = resolve_modules_to_save(self.model, config)
        for name in targets:
            wrap_target(self.model, name, config, adapter_name)
        for name in to_save:
            wrap_module_to_save(self.model, name, adapter_name)
        self.peft_config[adapter_name] = config
        if len(self.peft_config) == 1:
            self._set_active(adapter_name)
        else:  # new layers start with the current active adapter, as do existing ones
            self._set_active(self.active_adapter)
        self.set_requires_grad(adapter_name, not config.inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Make the parameters of these adapters trainable (or frozen). The only call that changes trainability."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.check_adapters(names)
        for name in names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(requires_grad)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        """A, B (and magnitude, bias, modules_to_save copies) of one adapter."""
        params = []
        for module in self._adapter_modules():
            if isinstance(module, LoraLayer):
                params += module.adapter_parameters(adapter_name)
            elif adapter_name in module.modules_to_save:
                params += list(module.modules_to_save[adapter_name].parameters())
        bias = self.peft_config[adapter_name].bias
        if bias == "all":
            params += [p for n, p in self.model.named_parameters()
                       if n.endswith("bias") and ".lora_" not in n and ".modules_to_save." not in n]
        elif bias == "lora_only":
            params += [m.base_layer.bias for _, m in self.lora_layers()
                       if adapter_name in m.r and getattr(m.base_layer, "bias", None) is not None]
        return params

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Choose which adapter(s) run. Never changes which parameters train (see set_requires_grad)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self.check_adapters(names)
        self._set_active(names[0] if len(names) == 1 else names)

    def _set_active(self, names: str | list[str]) -> None:
        self.active_adapter = names
        active = [names] if isinstance(names, str) else list(names)
        for module in self._adapter_modules():
            module.active_adapters = list(active)

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_adapters([adapter_name])
        for module in self._adapter_modules():
            module.delete(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._set_active(remaining[0] if len(remaining) == 1 else remaining)

    def set_adapters_enabled(self, enabled: bool) -> None:
        """Run the adapters (True) or the plain base model (False). Disabling unmerges merged adapters first: the
        plain base model is the unmerged weights (PEFT does the same, in its forward)."""
        if not enabled:
            self.unmerge_adapter()
        for module in self._adapter_modules():
            module.disable_adapters = not enabled

    def enable_adapter_layers(self) -> None:
        self.set_adapters_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Run the plain base model until enable_adapter_layers() (merged adapters are unmerged now)."""
        self.set_adapters_enabled(False)

    @property
    def targeted_module_names(self) -> list[str]:
        """Full names of the modules that carry LoRA."""
        return [name for name, _ in self.lora_layers()]

    # -- merging ------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = list(adapter_names) if adapter_names else self.active_adapters
        self.check_adapters(names)
        for _, layer in self.lora_layers():
            if is_quantized_linear(layer.base_layer) and not isinstance(layer.base_layer, nn.Linear):
                raise ValueError("merge_adapter() cannot write into 4-bit base weights; use merge_and_unload(), "
                                 "which dequantizes, merges and returns a full-precision model.")
        _warn_if_merging_tied_weights(self.model, names)
        if safe_merge:  # check every layer first so a failure leaves nothing half-merged
            self._refuse_non_finite(names)
        for _, layer in self.lora_layers():
            layer.merge(names, safe_merge=safe_merge)

    def _refuse_non_finite(self, names: Sequence[str]) -> None:
        for _, layer in self.lora_layers():
            for name in names:
                if name in layer.r and not torch.isfinite(layer.delta_weight(name)).all():
                    raise ValueError(f"safe_merge: adapter {name!r} has NaN/inf weights; nothing was merged.")

    def unmerge_adapter(self) -> None:
        for _, layer in self.lora_layers():
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[Sequence[str]] = None, requantize: bool = False) -> nn.Module:
        """Merge adapters into the base weights and return the plain model (no lorakit module left).

        A 4-bit base is dequantized first, so the result is full precision (re-quantized if `requantize`).
        """
        quantized = [name for name, m in self.model.named_modules()
                     if is_quantized_linear(m) and not isinstance(m, nn.Linear)]
        if quantized:
            if safe_merge:  # before the 4-bit base is unpacked, so that a refused merge changes nothing
                names = list(adapter_names) if adapter_names else self.active_adapters
                self.check_adapters(names)
                self._refuse_non_finite(names)
            from .quant import dequantize_model, quantize_model

            warnings.warn(f"merge_and_unload: {len(quantized)} layers are 4-bit quantized; they are dequantized "
                          "to full precision before merging, so the merged weights carry NF4's rounding error"
                          + (" and re-quantizing adds a second rounding." if requantize else "."), stacklevel=2)
            dequantize_model(self.model)
        model = self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)
        if quantized and requantize:
            quantize_model(model, "nf4", skip_modules=_unquantized_linear_names(model, quantized))
        return model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the plain base model."""
        return self._unload(merge=False)

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        names = list(adapter_names) if adapter_names else self.active_adapters
        if merge:
            self.merge_adapter(names, safe_merge=safe_merge)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                parent_name, _, child = name.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                if isinstance(module, LoraLayer):
                    replacement = module.base_layer
                else:
                    replacement = module.active_module() if merge else module.original_module
                setattr(parent, child, replacement)
        return self.model

    # -- combining adapters -------------------------------------------------------------------------
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None) -> None:
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank)


def _warn_if_merging_tied_weights(model: nn.Module, names: Sequence[str]) -> None:
    """Merging into a weight that another module shares (tied input/output embeddings) changes both."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoraLayer):
            continue
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module_name.replace(".base_layer", ""))
    for layer_name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and any(n in layer.r for n in names):
            sharing = sorted(set(owners.get(id(getattr(layer.base_layer, "weight", None)), [])) - {layer_name})
            if sharing:
                warnings.warn(f"merging into {layer_name}, whose weight is tied to {', '.join(sharing)}: the merge "
                              "changes both, so the merged model's outputs differ from the unmerged ones. Keep this "
                              "adapter unmerged, or untie the weights first (config.tie_word_embeddings=False and a "
                              "copy of the weight).", stacklevel=3)


def _unquantized_linear_names(model: nn.Module, quantized: list[str]) -> list[str]:
    """Full names of the Linear layers that were not quantized before (so re-quantizing skips them)."""
    # Quantized names were recorded inside LoRA wrappers (`x.q_proj.base_layer`); after unloading
    # the wrapper is gone and the layer is `x.q_proj`.
    was_quantized = {name.replace(".base_layer", "") for name in quantized}
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in was_quantized]
