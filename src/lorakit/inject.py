"""Choosing which modules get LoRA, and swapping them for LoRA layers."""

from __future__ import annotations

import re
import warnings
from typing import Iterator, Optional

from torch import nn

from .config import ALL_LINEAR, TARGETS_BY_MODEL_TYPE, LoraConfig
from .errors import TargetModulesError
from .layers import LoraEmbedding, LoraLayer, LoraLinear, ModulesToSaveWrapper, is_linear_like


def iter_model_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """named_modules() that treats LoRA layers and modules_to_save wrappers as leaves."""
    for name, child in model.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, (LoraLayer, ModulesToSaveWrapper)):
            yield from iter_model_modules(child, full)


def is_lora_target_type(module: nn.Module) -> bool:
    return isinstance(module, (LoraLayer, nn.Embedding)) or is_linear_like(module)


def _suffix_match(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _output_head_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        names |= {name for name, module in model.named_modules() if module is head}
    return names


def _layer_index(name: str, patterns) -> Optional[int]:
    """The index after the first container named in `patterns` (any named container when None), as PEFT."""
    container = "|".join(re.escape(p) for p in patterns) if patterns else "[^.]+"
    match = re.search(rf"(?:^|\.)(?:{container})\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def _name_matches(name: str, module: nn.Module, spec, heads: set[str]) -> bool:
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            linear = is_linear_like(module) or isinstance(module, LoraLinear)
            return linear and name.split(".")[-1] not in heads and name not in heads
        return re.fullmatch(spec, name) is not None
    return _suffix_match(name, spec)


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules that `config` puts LoRA on; clear errors when that is nothing."""
    spec = config.target_modules
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in TARGETS_BY_MODEL_TYPE:
            raise TargetModulesError(
                f"LoraConfig.target_modules is not set and lorakit has no default for model type {model_type!r}. "
                f"Pass target_modules, e.g. one of: {', '.join(candidate_names(model))}; or 'all-linear'.")
        spec = TARGETS_BY_MODEL_TYPE[model_type]
    heads = _output_head_names(model)
    layer_patterns = config.layers_pattern or None
    if isinstance(layer_patterns, str):
        layer_patterns = [layer_patterns]

    kept_whole = modules_to_save_names(config)
    targets, unsupported = [], []
    for name, module in iter_model_modules(model):
        if not _name_matches(name, module, spec, heads):
            continue
        if _within(name, kept_whole):  # a module trained whole gets no LoRA inside it, as in PEFT
            continue
        if config.exclude_modules and _name_matches(name, module, config.exclude_modules, heads):
            continue
        if config.layers_to_transform is not None:
            index = _layer_index(name, layer_patterns)
            if index is None or index not in config.layers_to_transform:
                continue
        if is_lora_target_type(module):
            targets.append(name)
        elif isinstance(spec, list) or spec == ALL_LINEAR:
            unsupported.append((name, module))
    if unsupported and isinstance(spec, list):
        name, module = unsupported[0]
        inner = sorted({n.split(".")[-1] for n, m in iter_model_modules(module) if is_lora_target_type(m)})
        raise TargetModulesError(
            f"target_modules matched {name!r}, a {type(module).__name__}, which LoRA cannot wrap (supported: "
            f"torch.nn.Linear, torch.nn.Embedding, transformers Conv1D). Target the layers inside it instead"
            + (f": {', '.join(inner)}." if inner else "."))
    if not targets:
        raise TargetModulesError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}"
            + (f" (exclude_modules={config.exclude_modules!r})" if config.exclude_modules else "")
            + (f" (layers_to_transform={config.layers_to_transform})" if config.layers_to_transform else "")
            + f". Modules LoRA can wrap here: {', '.join(candidate_names(model))}. Pass name suffixes such as "
              f"['q_proj', 'v_proj'], a regex matched against the full module name, or 'all-linear'.")
    return targets


def candidate_names(model: nn.Module) -> list[str]:
    """The distinct last name components of every module LoRA can wrap."""
    return sorted({name.split(".")[-1] for name, module in iter_model_modules(model) if is_lora_target_type(module)})


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap_target(model: nn.Module, name: str, config: LoraConfig, adapter_name: str) -> LoraLayer:
    """Put adapter `adapter_name` on module `name`, wrapping it in a LoRA layer if needed."""
    parent, child = get_submodule_parent(model, name)
    module = getattr(parent, child)
    if not isinstance(module, LoraLayer):
        if isinstance(module, nn.Embedding):
            module = LoraEmbedding(module)
        else:
            is_conv = type(module).__name__ == "Conv1D"
            if config.fan_in_fan_out != is_conv:
                warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {name} "
                              f"({type(module).__name__}); using {is_conv}.", stacklevel=4)
            module = LoraLinear(module)
        setattr(parent, child, module)
    if adapter_name in module.r:
        raise ValueError(f"Module {name} already has an adapter named {adapter_name!r}.")
    module.add_adapter(adapter_name, r=config.rank_for(name), alpha=config.alpha_for(name),
                       scaling=config.scaling_for(name), dropout=config.lora_dropout,
                       init=config.init_lora_weights, use_dora=config.use_dora)
    return module


def modules_to_save_names(config: LoraConfig) -> list[str]:
    """config.modules_to_save, plus the classifier head names for SEQ_CLS (PEFT's rule)."""
    names = list(config.modules_to_save or [])
    if config.task_type == "SEQ_CLS":
        names += [n for n in ("classifier", "score") if n not in names]
    return names


def _within(name: str, module_names: list[str]) -> bool:
    """Whether `name` is one of `module_names` (by name components) or lies inside one."""
    dotted = f".{name}."
    return any(f".{m}." in dotted for m in module_names)


def resolve_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    wanted = modules_to_save_names(config)
    if not wanted:
        return []
    found = [name for name, module in iter_model_modules(model)
             if _suffix_match(name, wanted) and not isinstance(module, LoraLayer)]
    if config.modules_to_save and not any(_suffix_match(n, list(config.modules_to_save)) for n in found):
        raise TargetModulesError(
            f"modules_to_save={config.modules_to_save!r} matched no module of {type(model).__name__}. "
            f"Top-level candidates: {', '.join(n for n, _ in model.named_children())}.")
    # A wrapper already covers everything under it.
    return [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]


def wrap_module_to_save(model: nn.Module, name: str, adapter_name: str) -> ModulesToSaveWrapper:
    parent, child = get_submodule_parent(model, name)
    module = getattr(parent, child)
    if not isinstance(module, ModulesToSaveWrapper):
        module = ModulesToSaveWrapper(module)
        setattr(parent, child, module)
    module.add_adapter(adapter_name)
    return module
