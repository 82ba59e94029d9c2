"""LoRA layers: a frozen base layer plus adapters. The arithmetic is lorakit.kernels'; a layer keeps the weights
and knows which adapters run.

Which adapters run is set by the model wrapper's methods (set_adapter, merge, disable_adapter_layers, ...), never
by a forward, and a forward never changes weights. A mixed batch's adapter per row comes with the call
(`row_adapters`), not as state written onto the layers. Attribute names (base_layer, lora_A, lora_B,
lora_embedding_A/B, lora_magnitude_vector, modules_to_save) follow PEFT, so state-dict keys, and therefore
adapter files, are interchangeable.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import DoraBase, LoraWeights, add_lora, add_lora_by_rows, base_linear, dora_scale, lora_linear
from .lora_init import factors_from_weight, init_lora, is_from_base_weight
from .row_adapters import current_row_adapters, rows_of_owned_adapters



def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D: a Linear whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_quantized_linear(module: nn.Module) -> bool:
    """lorakit's NF4Linear (or any Linear-like module that can only be read through dequantize())."""
    return hasattr(module, "dequantize") and hasattr(module, "in_features") and hasattr(module, "out_features")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized_linear(module)


class DoraMagnitude(nn.Module):
    """DoRA's learned magnitude vector (one entry per output feature), stored as `.weight` like PEFT."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


class LoraLayer(nn.Module):
    """State shared by all LoRA layer types: adapters, which are active, which are merged.

    `running` (the adapters a forward applies) follows from active_adapters, disable_adapters and
    merged_adapters, and is worked out again whenever the model's methods change one of them.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        self._active: tuple[str, ...] = ()
        self._disabled = False
        self.running: tuple[str, ...] = ()
        self._one_adapter: Optional[tuple] = None  # see _refresh
        self._dora_merge_factor: dict[str, torch.Tensor] = {}

    # -- which adapters run ---------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @active_adapters.setter
    def active_adapters(self, names: Sequence[str]) -> None:
        self._active = tuple(names)
        self._refresh()

    @property
    def disable_adapters(self) -> bool:
        return self._disabled

    @disable_adapters.setter
    def disable_adapters(self, disabled: bool) -> None:
        self._disabled = bool(disabled)
        self._refresh()

    def _refresh(self) -> None:
        off = self._disabled or self.merged_adapters
        self.running = () if off else tuple(n for n in self._active if n in self.r)
        # For one running plain adapter, what its forward reads, down to the dicts nn.Module keeps its
        # submodules in (they stay the same objects when an entry or a parameter is replaced): decoding one
        # token runs this forward for every adapted layer, and attribute lookups were a visible share of it.
        self._one_adapter = self._one_adapter_reads(self.running[0]) if len(self.running) == 1 else None

    def _one_adapter_reads(self, name: str) -> Optional[tuple]:
        """What the forward of plain adapter `name` alone reads, or None for a DoRA adapter (see _refresh)."""
        modules = self._modules
        if self.use_dora[name] or "lora_A" not in modules:
            return None
        return (name, modules["lora_A"]._modules, modules["lora_B"]._modules, modules["lora_dropout"]._modules,
                self.scaling[name])

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [value for key, value in self.named_parameters()
                if key.split(".")[0] != "base_layer" and name in key.split(".")[1:2]]

    def _row_pairs(self, batch: int, device: torch.device) -> Optional[list[tuple[str, torch.Tensor]]]:
        """This call's (adapter, rows) pairs when it is a mixed batch, else None."""
        rows = current_row_adapters()
        if rows is None or self._disabled:
            return None
        if self.merged_adapters:
            raise ValueError("Cannot run a mixed-adapter batch while adapters are merged into the base weights; "
                             "call unmerge_adapter() first.")
        return rows_of_owned_adapters(rows, batch, device, self.r)

    # -- adding, deleting, merging ------------------------------------------------------------------------
    def _register(self, name: str, r: int, alpha: float, scaling: float, dropout: float, use_dora: bool) -> None:
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        self.use_dora[name] = use_dora
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"Adapter {name!r} is merged into the base weights; unmerge it before deleting it.")
        for container_name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                               "lora_dropout", "lora_magnitude_vector"):
            container = getattr(self, container_name, None)
            if container is not None and name in container:
                del container[name]
        for mapping in (self.r, self.lora_alpha, self.scaling, self.use_dora, self._dora_merge_factor):
            mapping.pop(name, None)
        self.active_adapters = [a for a in self._active if a != name]

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                self._set_base_weight(self._without(self._base_weight(), name))
            self._dora_merge_factor.pop(name, None)
        self._refresh()

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = [n for n in (adapter_names or self._active) if n in self.r and n not in self.merged_adapters]
        # DoRA's norm is taken on the weight its forward sees, the base without merged adapters; once one
        # adapter is merged the stored weight is no longer that.
        unmerged = None
        if any(self.use_dora[n] for n in names) and (self.merged_adapters or len(names) > 1):
            with torch.no_grad():
                unmerged = self._base_weight().clone()
                for name in reversed(self.merged_adapters):
                    unmerged = self._without(unmerged, name)
        for name in names:
            with torch.no_grad():
                weight = self._base_weight()
                merged = weight + self.delta_weight(name).to(weight.dtype)
                if self.use_dora[name]:
                    factor = self._dora_factor(name, weight if unmerged is None else unmerged)
                    merged = merged * self._as_rows(factor).to(weight.dtype)
                    self._dora_merge_factor[name] = factor.detach().clone()
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"safe_merge: merging adapter {name!r} would put NaN/inf into the base weights; "
                                     "the adapter is broken. Nothing was merged into this layer.")
                self._set_base_weight(merged)
            self.merged_adapters.append(name)
        self._refresh()

    def _without(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """`weight` (adapter `name` merged into it) with that adapter taken out."""
        if self.use_dora[name]:
            weight = weight / self._as_rows(self._dora_merge_factor[name]).to(weight.dtype)
        return weight - self.delta_weight(name).to(weight.dtype)


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, GPT-2 Conv1D (fan_in_fan_out) or a quantized Linear."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    init: bool | str, use_dora: bool) -> None:
        weight = self._base_weight()
        dtype = weight.dtype if weight.dtype.is_floating_point and weight.element_size() >= 4 else torch.float32
        self._register(name, r, alpha, scaling, dropout, use_dora)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=dtype)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if is_from_base_weight(init):
            if is_quantized_linear(self.base_layer) and not isinstance(self.base_layer, nn.Linear):
                raise ConfigError(f"init_lora_weights={init!r} needs a full-precision base weight; "
                                  "initialise the adapter before quantizing the model.")
            new_a, new_b, residual = factors_from_weight(weight, r, scaling, init)
            with torch.no_grad():
                a.copy_(new_a)
                b.copy_(new_b)
            self._set_base_weight(residual)
        else:
            init_lora(a, b, init)
        if use_dora:
            with torch.no_grad():
                norm = (self._base_weight().to(dtype) + self.delta_weight(name).to(dtype)).norm(p=2, dim=1)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)
        self._refresh()

    # -- the base weight, whatever its storage ----------------------------------------------------------
    def _base_weight(self) -> torch.Tensor:
        """The base weight as [out, in] (Conv1D transposes, NF4 dequantizes)."""
        if is_quantized_linear(self.base_layer) and not isinstance(self.base_layer, nn.Linear):
            return self.base_layer.dequantize()
        weight = self.base_layer.weight
        return weight.T if self.fan_in_fan_out else weight

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        if is_quantized_linear(self.base_layer) and not isinstance(self.base_layer, nn.Linear):
            raise ValueError("Cannot write into a quantized base weight; use merge_and_unload(), which "
                             "dequantizes the layer first.")
        target = self.base_layer.weight
        with torch.no_grad():
            target.copy_((weight.T if self.fan_in_fan_out else weight).to(target.dtype))

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B @ A, shaped [out, in]."""
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def _dora_factor(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        lora = self._weights(name)
        return dora_scale(weight.to(lora.a.dtype), lora.a, lora.b, lora.scaling, lora.magnitude)

    @staticmethod
    def _as_rows(factor: torch.Tensor) -> torch.Tensor:
        return factor[:, None]  # one factor per output feature: a row of W

    # -- forward ------------------------------------------------------------------------------------------
    def _weights(self, name: str) -> LoraWeights:
        # Read through the dicts nn.Module keeps (not its attribute lookup): decoding one token calls this for
        # every adapted layer.
        modules = self._modules
        dropout = modules["lora_dropout"]._modules[name]
        kind = type(dropout)
        p = dropout.p if kind is nn.Dropout else 0.0
        custom = None if kind is nn.Dropout or kind is nn.Identity else dropout
        magnitude = modules["lora_magnitude_vector"]._modules[name].weight if self.use_dora[name] else None
        return LoraWeights(modules["lora_A"]._modules[name]._parameters["weight"],
                           modules["lora_B"]._modules[name]._parameters["weight"], self.scaling[name], p, magnitude,
                           custom)

    def _plain_base(self) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(W, b) when the base is a plain Linear/Conv1D that the kernels may compute themselves, else None.
        Hooks or a forward replaced on the instance (accelerate's offloading) must run, so those go through it."""
        base = self._modules["base_layer"]
        if not (type(base) is nn.Linear or self.fan_in_fan_out) or base._forward_hooks or base._forward_pre_hooks \
                or "forward" in base.__dict__:
            return None
        params = base._parameters
        weight = params.get("weight")  # None under torch.nn.utils.parametrize, for one
        return None if weight is None else (weight, params.get("bias"))

    def _base_out(self, x: torch.Tensor, plain, *args, **kwargs) -> torch.Tensor:
        return base_linear(x, *plain, self.fan_in_fan_out) if plain is not None else self.base_layer(x, *args, **kwargs)

    def _dora(self, names) -> Optional[DoraBase]:
        if not any(self.use_dora[n] for n in names):
            return None
        return DoraBase(self._base_weight, getattr(self.base_layer, "bias", None), self.base_layer)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = current_row_adapters()
        if args or kwargs:
            one = None
        elif rows is None:
            one = self._one_adapter
        else:  # every row on one adapter is the same call as with that adapter set: the same path
            sole = rows.sole
            one = self._one_adapter_reads(sole) if sole in self.r and not (self._disabled or self.merged_adapters) \
                else None
        if one is not None:  # _plain_base's and _weights' reads, inlined: see _refresh
            name, a_modules, b_modules, dropouts, scaling = one
            base = self._modules["base_layer"]
            weight = base._parameters.get("weight")
            dropout = dropouts[name]
            kind = type(dropout)
            if weight is not None and (kind is nn.Identity or kind is nn.Dropout) \
                    and (type(base) is nn.Linear or self.fan_in_fan_out) \
                    and not (base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__):
                p = dropout.p if kind is nn.Dropout and self.training else 0.0
                return lora_linear(x, weight, base._parameters.get("bias"), a_modules[name]._parameters["weight"],
                                   b_modules[name]._parameters["weight"], scaling, p, self.fan_in_fan_out)
        pairs = self._row_pairs(x.shape[0], x.device) if rows is not None else None
        running = self.running if pairs is None else tuple(name for name, _ in pairs)
        if not running:
            return self.base_layer(x, *args, **kwargs)
        plain = self._plain_base() if not (args or kwargs) else None
        base_out = self._base_out(x, plain, *args, **kwargs)
        dora = self._dora(running)
        if pairs is None:
            return add_lora(base_out, x, [self._weights(n) for n in running], self.training, dora)
        return add_lora_by_rows(base_out, x, [(self._weights(n), rows) for n, rows in pairs], self.training, dora)


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: the update is a lookup into A^T followed by B.

    Embeddings that scale their output (Gemma 3's `embed_scale`) scale the LoRA update too, as PEFT does,
    so merged and unmerged agree. DoRA keeps one magnitude per embedding dimension (a column of the table).
    The update follows the kernels' rounding rule: summed in the adapter's dtype, rounded once.
    """

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    init: bool | str, use_dora: bool) -> None:
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights={init!r} is supported on Linear layers only, not on embeddings; "
                              "use True or 'gaussian' for an adapter that targets an embedding.")
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.element_size() >= 4 else torch.float32  # as LoraLinear's
        self._register(name, r, alpha, scaling, dropout, use_dora)
        a = torch.randn(r, self.in_features, device=weight.device, dtype=dtype)
        b = torch.randn(self.out_features, r, device=weight.device, dtype=dtype)
        if init is not False:
            # The update must start at zero; with A = 0 the gradient still reaches A through B.
            nn.init.zeros_(a)
            nn.init.normal_(b)
        self.lora_embedding_A[name] = nn.Parameter(a)
        self.lora_embedding_B[name] = nn.Parameter(b)
        if use_dora:
            with torch.no_grad():
                norm = (weight.to(dtype) + self.delta_weight(name).to(dtype)).norm(p=2, dim=0)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)
        self._refresh()

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * (B @ A)^T, shaped like the embedding table [num_embeddings, dim]."""
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def _dora_factor(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + delta|| per embedding dimension (a column), the norm detached (DoRA paper, 4.3)."""
        magnitude = self.lora_magnitude_vector[name].weight
        with torch.no_grad():
            norm = (weight.to(magnitude.dtype) + self.delta_weight(name).to(magnitude.dtype)).norm(p=2, dim=0)
        return magnitude / norm

    @staticmethod
    def _as_rows(factor: torch.Tensor) -> torch.Tensor:
        return factor  # one factor per embedding dimension: a column of the table

    def _embed_scale(self) -> Optional[torch.Tensor]:
        """The scalar the base embedding multiplies its output by (Gemma 3), or None."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return None
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scale))
        if scale.numel() != 1:
            raise ConfigError(f"{type(self.base_layer).__name__}.embed_scale has shape {tuple(scale.shape)}; "
                              "LoRA on an embedding supports a scalar embed_scale only.")
        return scale

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)

    def _plus_update(self, result: torch.Tensor, ids: torch.Tensor, name: str) -> torch.Tensor:
        """result + this adapter's update for `ids` (DoRA: both scaled per dimension), summed in the adapter's
        dtype and rounded once."""
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        base = self.base_layer
        after_a = F.embedding(ids, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        delta = after_a @ b.T * self.scaling[name]
        embed_scale = self._embed_scale()
        if embed_scale is not None:
            delta = delta * embed_scale.to(delta.dtype)
        total = result.to(delta.dtype)
        if self.use_dora[name]:
            scale = self._dora_factor(name, base.weight)
            total, delta = total * scale, delta * scale
        return (total + delta).to(result.dtype)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pairs = self._row_pairs(ids.shape[0], ids.device)
        result = self.base_layer(ids, *args, **kwargs)
        if pairs is None:
            for name in self.running:
                result = self._plus_update(result, ids, name)
            return result
        out = result
        for name, rows in pairs:
            own = self._plus_update(result, ids, name)
            out = own if bool(rows.all()) else torch.where(rows.view(-1, *([1] * (out.dim() - 1))), own, out)
        return out


class ModulesToSaveWrapper(nn.Module):
    """A fully trainable copy of a module per adapter (e.g. a classifier head); the original stays frozen."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def active_module(self) -> nn.Module:
        if self.disable_adapters:
            return self.original_module
        for name in self.active_adapters:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        rows = current_row_adapters()
        if rows is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        # A mixed batch: each module runs on the whole batch and keeps its rows, as a LoRA layer does.
        masks = rows.masks(x.shape[0], x.device)
        copies = {name: mask for name, mask in masks.items() if name in self.modules_to_save}
        if len(copies) == 1 and bool(next(iter(copies.values())).all()):
            return self.modules_to_save[next(iter(copies))](x, *args, **kwargs)
        out = self.original_module(x, *args, **kwargs)
        for name, mask in copies.items():
            own = self.modules_to_save[name](x, *args, **kwargs)
            out = torch.where(mask.view(-1, *([1] * (out.dim() - 1))), own, out)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code reads e.g. `lm_head.weight`: answer with the module that would run.
            modules = self._modules
            if "original_module" not in modules:
                raise
            return getattr(self.active_module(), name)
