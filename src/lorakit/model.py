"""PeftModel: the model users hold. It runs the model with its adapters (one per batch row if asked), saves and
loads adapter folders, and counts parameters.

The nesting `PeftModel.base_model (LoraModel) .model (your model)` is PEFT's, so state-dict keys
start with `base_model.model.` exactly as in PEFT's files.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .adapter_folder import (WEIGHTS_NAME, adapter_state_dict, load_adapter_tensors, read_weights,
                             resolve_adapter_path, warn_on_base_mismatch, write_adapter)
from .config import LoraConfig
from .fused_loss import causal_lm_loss_forward
from .layers import LoraEmbedding, LoraLinear, is_quantized_linear
from .row_adapters import BASE_ADAPTER, row_adapters
from .lora_model import LoraModel, model_name


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
        with row_adapters(self._checked_row_names(adapter_names)):
            model = self.base_model.model
            if not args and kwargs.get("labels") is not None and self.__dict__.get("fused_loss", True):
                # Training call of a known causal LM: chunked loss, no full logits (see lorakit.fused_loss).
                outputs = causal_lm_loss_forward(model, kwargs)
                if outputs is not None:
                    return outputs
            return model(*args, **kwargs)

    def _checked_row_names(self, adapter_names: Optional[Sequence[Optional[str]]]):
        """adapter_names as given, after checking that every named adapter is loaded."""
        if adapter_names is not None:
            self.base_model.check_adapters([n for n in dict.fromkeys(adapter_names) if n not in (None, BASE_ADAPTER)])
        return adapter_names

    def generate(self, *args, adapter_names: Optional[Sequence[Optional[str]]] = None, **kwargs):
        with row_adapters(self._checked_row_names(adapter_names)):
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
        self.base_model.check_adapters(names)
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
    warn_on_base_mismatch(config.base_model_name_or_path, model_name(model), path)


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's own model: the one inside a PeftModel (lorakit's or PEFT's), or `model` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze `model`, inject the adapter described by `peft_config`, return the wrapper."""
    if isinstance(model, PeftModel):
        raise ValueError("This model already has adapters: use model.add_adapter(name, config) instead.")
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"get_peft_model expects a lorakit.LoraConfig, got {type(peft_config).__name__}.")
    cls = PeftModelForCausalLM if peft_config.task_type == "CAUSAL_LM" else PeftModel
    return cls(model, peft_config, adapter_name)


__all__ = ["LoraModel", "PeftModel", "PeftModelForCausalLM", "get_peft_model", "LoraEmbedding", "LoraLinear"]
