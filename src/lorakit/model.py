"""PeftModel / LoraModel: a transformers (or any torch) model with LoRA adapters injected.

The nesting `PeftModel.base_model (LoraModel) .model (your model)` is PEFT's, so state-dict keys
start with `base_model.model.` exactly as in PEFT's files.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .adapter_folder import (WEIGHTS_NAME, adapter_state_dict, load_adapter_tensors, read_weights,
                             resolve_adapter_path, warn_on_base_mismatch, write_adapter)
from .config import LoraConfig
from .errors import AdapterNotFoundError
from .fused_loss import causal_lm_loss_forward
from .inject import resolve_modules_to_save, resolve_targets, wrap_module_to_save, wrap_target
from .layers import BASE_ADAPTER, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSaveWrapper, is_quantized_linear


def _model_name(model: nn.Module) -> Optional[str]:
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

    def _check(self, names: Sequence[str]) -> None:
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
            config = replace(config, base_model_name_or_path=_model_name(self.model))
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
        self._check(names)
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
        self._check(names)
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
        self._check([adapter_name])
        for module in self._adapter_modules():
            module.delete(adapter_name)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self._set_active(remaining[0] if len(remaining) == 1 else remaining)

    def set_adapters_enabled(self, enabled: bool) -> None:
        for module in self._adapter_modules():
            module.disable_adapters = not enabled

    def enable_adapter_layers(self) -> None:
        self.set_adapters_enabled(True)

    def disable_adapter_layers(self) -> None:
        """Run the plain base model until enable_adapter_layers() (merged adapters are unmerged first)."""
        self.set_adapters_enabled(False)

    @property
    def targeted_module_names(self) -> list[str]:
        """Full names of the modules that carry LoRA."""
        return [name for name, _ in self.lora_layers()]

    @contextlib.contextmanager
    def row_adapters(self, adapter_names: Optional[Sequence[Optional[str]]]):
        """Within the block, batch row i runs adapter adapter_names[i] (None or '__base__': no adapter)."""
        if adapter_names is None:
            yield
            return
        names = [None if n in (None, BASE_ADAPTER) else n for n in adapter_names]
        self._check([n for n in dict.fromkeys(names) if n is not None])
        modules = list(self._adapter_modules())
        for module in modules:
            module.row_adapters = names
        try:
            yield
        finally:
            for module in modules:
                module.row_adapters = None

    # -- merging ------------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = list(adapter_names) if adapter_names else self.active_adapters
        self._check(names)
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
                self._check(names)
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
        from .combine import add_weighted_adapter

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


class PeftModel(nn.Module):
    """The model users hold: forward/generate with adapters, save/load, parameter counts."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        self.base_model = LoraModel(model, peft_config, adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self):
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def peft_type(self) -> str:
        return "LORA"

    @property
    def modules_to_save(self) -> Optional[set[str]]:
        """The modules_to_save names of all adapters (None when there are none), as PEFT's attribute."""
        names = {n for config in self.peft_config.values() for n in (config.modules_to_save or [])}
        return names or None

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- state dict: tied weights once ----------------------------------------------------------------
    def _tied_aliases(self) -> dict[str, str]:
        """{name: the first name of the same Parameter} for weights shared between modules (tied embeddings)."""
        first: dict[int, str] = {}
        aliases = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            if id(param) in first:
                aliases[name] = first[id(param)]
            else:
                first[id(param)] = name
        return aliases

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """nn.Module's state dict with a tied weight stored once (under its first name), as transformers'
        save_pretrained does: tensors that share memory cannot be saved by safetensors, which is what the
        Hugging Face Trainer's checkpoints use for a model that is not PEFT's own class."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for alias in self._tied_aliases():
            state.pop(prefix + alias, None)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, accepting a state dict that holds a tied weight once (as state_dict() writes it)."""
        missing = {alias: source for alias, source in self._tied_aliases().items()
                   if alias not in state_dict and source in state_dict}
        if missing:
            state_dict = {**state_dict, **{alias: state_dict[source] for alias, source in missing.items()}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- running ------------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        if adapter_names is not None:
            _check_rows(adapter_names, args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds")))
        with self.base_model.row_adapters(adapter_names):
            model = self.base_model.model
            if not args and kwargs.get("labels") is not None and self.__dict__.get("fused_loss", True):
                # Training call of a known causal LM: chunked loss, no full logits (see lorakit.fast).
                outputs = causal_lm_loss_forward(model, kwargs)
                if outputs is not None:
                    return outputs
            return model(*args, **kwargs)

    def generate(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        with self.base_model.row_adapters(adapter_names):
            return self.base_model.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the plain base model inside the block (merged adapters are unmerged first)."""
        self.base_model.set_adapters_enabled(False)
        try:
            yield
        finally:
            self.base_model.set_adapters_enabled(True)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    # -- parameter counts ---------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = 0, 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        for module in self.modules():  # 4-bit weights are buffers: count the values they stand for
            shape = getattr(module, "weight_shape", None)
            if shape is not None and is_quantized_linear(module):
                total += int(torch.Size(shape).numel())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files --------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Optional[Sequence[str]] = None,
                        state_dict: Optional[dict] = None, is_main_process: bool = True,
                        safe_serialization: bool = True, **options) -> None:
        """PEFT's layout: adapter 'default' at the top, every other adapter in a sub-folder of its name.

        `state_dict` (as PEFT's): the tensors to save instead of self.state_dict(), e.g. gathered from
        FSDP shards. `is_main_process=False` writes nothing (the other processes of a distributed run).
        """
        names = list(selected_adapters) if selected_adapters else list(self.peft_config)
        self.base_model._check(names)
        ignored = sorted(options) + ([] if safe_serialization else ["safe_serialization=False"])
        if ignored:
            warnings.warn(f"save_pretrained ignores {', '.join(ignored)}: lorakit always writes "
                          f"{WEIGHTS_NAME} (safetensors), which PEFT and vLLM read.", stacklevel=2)
        if not is_main_process:
            return
        root = Path(save_directory)
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"save_pretrained: {root} exists and is not a directory.")
        lora_names = {f"base_model.model.{n}" for n, _ in self.base_model.lora_layers()}
        for name in names:
            config = self.peft_config[name]
            directory = root if name == "default" else root / name
            data = config.to_dict()
            data["inference_mode"] = True
            model_cls = type(self.base_model.model)
            data["auto_mapping"] = {"base_model_class": model_cls.__name__, "parent_library": model_cls.__module__}
            write_adapter(directory, adapter_state_dict(self, name, config.bias, lora_names, state_dict), data)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        **options) -> "PeftModel":
        """Load a saved adapter (lorakit's or PEFT's) onto `model`; in eval mode unless `is_trainable`.

        `subfolder`, `revision` and `token` work as in PEFT (the last two for hub ids).
        """
        path = _resolve_adapter_path(model_id, **options)
        config = config or LoraConfig.from_pretrained(path)
        config = replace(config, inference_mode=not is_trainable)
        _warn_on_base_mismatch(config, model, path)
        peft_model = (PeftModelForCausalLM if config.task_type == "CAUSAL_LM" else cls)(model, config, adapter_name)
        peft_model._load_weights(path, adapter_name)
        if not is_trainable:  # an adapter loaded for inference must not run its dropout
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **options) -> None:
        """Add a saved adapter under `adapter_name`; the active adapter does not change."""
        path = _resolve_adapter_path(model_id, **options)
        config = replace(LoraConfig.from_pretrained(path), inference_mode=not is_trainable)
        _warn_on_base_mismatch(config, self.base_model.model, path)
        self.base_model.add_adapter(adapter_name, config)
        try:
            self._load_weights(path, adapter_name)
        except Exception:
            self.base_model.delete_adapter(adapter_name)
            raise
        if not is_trainable:
            self.eval()

    def _load_weights(self, path: Path, adapter_name: str) -> None:
        tensors = read_weights(path)
        expected_base = self.peft_config[adapter_name].base_model_name_or_path
        hint = f" (adapter says base_model_name_or_path={expected_base!r})" if expected_base else ""
        load_adapter_tensors(self, tensors, adapter_name, str(path), hint)


class PeftModelForCausalLM(PeftModel):
    """PeftModel for a causal LM, under PEFT's name; its forward names the usual inputs, as PEFT's does."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        # Named because callers read the signature: the Hugging Face Trainer drops every dataset column
        # that forward does not name, which for *args / **kwargs alone would be all of them.
        named = {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds,
                 "labels": labels}
        return super().forward(adapter_names=adapter_names, **{k: v for k, v in named.items() if v is not None},
                               **kwargs)


def _check_rows(adapter_names: Sequence[Optional[str]], inputs) -> None:
    rows = inputs.shape[0] if isinstance(inputs, torch.Tensor) else None
    if rows is not None and rows != len(adapter_names):
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {rows} rows; pass one "
                         "adapter name per row (None or '__base__' for the base model).")


# from_pretrained / load_adapter keywords of PEFT's that change nothing here (lorakit keeps an adapter in its
# saved dtype on the base's device, and reads it whole).
_NO_OP_LOAD_OPTIONS = frozenset({"low_cpu_mem_usage", "autocast_adapter_dtype", "ephemeral_gpu_offload",
                                 "torch_device", "use_safetensors"})


def _resolve_adapter_path(model_id: str | os.PathLike, subfolder: Optional[str] = None,
                          revision: Optional[str] = None, token=None, **options) -> Path:
    unknown = sorted(set(options) - _NO_OP_LOAD_OPTIONS)
    if unknown:
        warnings.warn(f"lorakit ignores these adapter-loading options: {', '.join(unknown)}", stacklevel=3)
    return resolve_adapter_path(model_id, subfolder, revision, token)


def _warn_on_base_mismatch(config: LoraConfig, model: nn.Module, path: Path) -> None:
    warn_on_base_mismatch(config.base_model_name_or_path, _model_name(model), path)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze `model`, inject the adapter described by `peft_config`, return the wrapper."""
    if isinstance(model, PeftModel):
        raise ValueError("This model already has adapters: use model.add_adapter(name, config) instead.")
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"get_peft_model expects a lorakit.LoraConfig, got {type(peft_config).__name__}.")
    cls = PeftModelForCausalLM if peft_config.task_type == "CAUSAL_LM" else PeftModel
    return cls(model, peft_config, adapter_name)


__all__ = ["LoraModel", "PeftModel", "PeftModelForCausalLM", "get_peft_model", "LoraEmbedding", "LoraLinear"]
