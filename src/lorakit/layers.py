"""LoRA layers: a frozen base layer plus one or more low-rank adapters.

Attribute names (`base_layer`, `lora_A`, `lora_B`, `lora_embedding_A`, `lora_magnitude_vector`,
`modules_to_save`) follow PEFT so state-dict keys, and therefore adapter files, are interchangeable.
"""

from __future__ import annotations

import copy
import math
import weakref
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .kernels import autocast_enabled, lora_linear

BASE_ADAPTER = "__base__"  # the row-adapter name that means "no adapter"
# Assigning any of these attributes of a LoraLayer may change which forward path applies.
_ROUTE_INPUTS = frozenset({"active_adapters", "merged_adapters", "disable_adapters", "row_adapters", "base_layer",
                           "lora_A", "lora_B", "lora_dropout", "use_dora"})


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


class AdapterModuleDict(nn.ModuleDict):
    """nn.ModuleDict (one module per adapter) that tells its layer when an entry is set or removed: the layer's
    cached fast route holds the entries' parameter dicts, and must be worked out again.

    The layer is held weakly: a reference cycle would keep the layer, and the base weights under it, alive after
    `del model` until the garbage collector runs. Copies and unpickled layers link their dicts again
    (LoraLayer.__setstate__)."""

    def __init__(self, owner: nn.Module) -> None:
        super().__init__()
        self.__dict__["_owner"] = weakref.ref(owner)

    def _get_name(self) -> str:
        return "ModuleDict"  # print(model) reads as PEFT's does

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_owner", None)  # a weak reference neither pickles nor should follow a copy
        return state

    def _changed(self) -> None:
        owner = self.__dict__.get("_owner")
        owner = owner() if owner is not None else None
        if owner is not None:
            owner._forget_fast_route()

    def add_module(self, name: str, module: Optional[nn.Module]) -> None:  # d[name] = m and update() come here
        super().add_module(name, module)
        self._changed()

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if isinstance(value, nn.Module):
            self._changed()

    def __delitem__(self, key: str) -> None:  # pop() comes here
        super().__delitem__(key)
        self._changed()

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()


class LoraLayer(nn.Module):
    """State shared by all LoRA layer types: adapters, which are active, which are merged."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.lora_dropout = AdapterModuleDict(self)
        self.lora_magnitude_vector = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Set by PeftModel for one call: the adapter of each batch row (mixed-adapter batch).
        self.row_adapters: Optional[list[Optional[str]]] = None
        self._dora_merge_factor: dict[str, torch.Tensor] = {}
        self._fast_route = None  # cached by forward; None means "work it out again"

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _ROUTE_INPUTS:
            self.__dict__["_fast_route"] = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for module in self._modules.values():  # copy.deepcopy and unpickling: the adapter dicts tell this copy
            if isinstance(module, AdapterModuleDict):
                module.__dict__["_owner"] = weakref.ref(self)

    def _forget_fast_route(self) -> None:
        """Call after changing adapters in place (adding, deleting, merging)."""
        self.__dict__["_fast_route"] = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for key, value in self.named_parameters():
            parts = key.split(".")
            if parts[0] != "base_layer" and name in parts[1:2]:
                params.append(value)
        return params

    def _row_groups(self, batch: int) -> list[Optional[str]]:
        names = self.row_adapters
        if batch != len(names):
            if batch % len(names):
                raise ValueError(f"adapter_names has {len(names)} entries but the batch has {batch} rows; "
                                 "pass one adapter name per row.")
            # generate() expands rows for num_return_sequences / beams: repeat each name accordingly.
            names = [n for n in names for _ in range(batch // len(names))]
        if self.merged_adapters:
            raise ValueError("Cannot run a mixed-adapter batch while adapters are merged into the base weights; "
                             "call unmerge_adapter() first.")
        return [n if n in self.r else None for n in names]

    def _dora_row_scales(self, used: list[str], slot: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each row's DoRA scale m / ||W + delta|| ([rows, out]; 1 where the row's adapter is not DoRA).

        `used` are the batch's adapters (slot i + 1 is used[i], slot 0 is the base), `weight` the
        detached base weight in the LoRA dtype; subclasses give `_dora_scale(name, weight)`.
        """
        scales = torch.ones(len(used) + 1, self.out_features, device=weight.device, dtype=weight.dtype)
        for i, name in enumerate(used, start=1):
            if self.use_dora[name]:
                scales[i] = self._dora_scale(name, weight)
        return scales[slot]

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
        self.active_adapters = [a for a in self.active_adapters if a != name]
        self._forget_fast_route()

    def unmerge(self) -> None:
        self._forget_fast_route()
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def merge(self, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False) -> None:
        names = [n for n in (adapter_names or self.active_adapters) if n in self.r and n not in self.merged_adapters]
        self._forget_fast_route()
        # DoRA's norm is taken on the weight its forward sees, the base without merged adapters; once one
        # adapter is merged the stored weight is no longer that.
        unmerged = None
        if any(self.use_dora[n] for n in names) and (self.merged_adapters or len(names) > 1):
            with torch.no_grad():
                unmerged = self._unmerged_base_weight()
        for name in names:
            self._merge_one(name, safe_merge, unmerged)
            self.merged_adapters.append(name)

    def _unmerged_base_weight(self) -> torch.Tensor:
        """The base weight with every merged adapter taken out again (a new tensor)."""
        weight = self._base_weight().clone()
        for name in reversed(self.merged_adapters):
            weight = self._without(weight, name)
        return weight

    def _unmerge_one(self, name: str) -> None:
        with torch.no_grad():
            self._set_base_weight(self._without(self._base_weight(), name))
            self._dora_merge_factor.pop(name, None)


class LoraLinear(LoraLayer):
    """LoRA around nn.Linear, GPT-2 Conv1D (fan_in_fan_out) or a quantized Linear."""

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = AdapterModuleDict(self)
        self.lora_B = AdapterModuleDict(self)

    # -- adapters ----------------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    init: bool | str, use_dora: bool) -> None:
        self._forget_fast_route()
        weight = self._base_weight()
        dtype = weight.dtype if weight.dtype.is_floating_point and weight.element_size() >= 4 else torch.float32
        device = weight.device
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        self.use_dora[name] = use_dora
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self._init_weights(name, init)
        if use_dora:
            with torch.no_grad():
                norm = self._weight_norm(self._base_weight().to(dtype), name)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    def _init_weights(self, name: str, init: bool | str) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init is False:
                return  # both random (nn.Linear's default init): useful for tests
            if init in ("pissa", "olora") or str(init).startswith("pissa_niter_"):
                self._init_from_base_weight(name, init)
            elif init == "orthogonal":
                self._init_orthogonal(name)
            else:
                if init == "gaussian":
                    nn.init.normal_(A, std=1 / self.r[name])
                else:
                    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                nn.init.zeros_(B)

    def _init_from_base_weight(self, name: str, init: str) -> None:
        """PiSSA (A, B from the top-r singular vectors of W; "pissa_niter_N": a randomized SVD with N
        iterations) or OLoRA (A, B from a QR decomposition of W). W keeps only the residual W - s B A."""
        if is_quantized_linear(self.base_layer):
            raise ConfigError(f"init_lora_weights={init!r} needs a full-precision base weight; "
                              "initialise the adapter before quantizing the model.")
        weight = self._base_weight().float()
        r, scale = self.r[name], self.scaling[name]
        if init == "olora":
            Q, R = torch.linalg.qr(weight)
            A, B = R[:r], Q[:, :r]
        else:
            if init == "pissa":
                U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
                U, S, Vh = U[:, :r], S[:r], Vh[:r]
            else:
                U, S, V = torch.svd_lowrank(weight, q=r, niter=int(init.removeprefix("pissa_niter_")))
                Vh = V.T
            sqrt_s = torch.sqrt(S / scale)
            A, B = sqrt_s[:, None] * Vh, U * sqrt_s[None, :]
        self.lora_A[name].weight.copy_(A)
        self.lora_B[name].weight.copy_(B)
        self._set_base_weight(weight - scale * (B @ A))

    def _init_orthogonal(self, name: str) -> None:
        """A and B built on disjoint rows of one random orthogonal matrix, so B @ A = 0 with neither zero."""
        r = self.r[name]
        if r % 2:
            raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}.")
        Q, _ = torch.linalg.qr(torch.randn(r, r))
        A = (torch.randn(self.in_features, r // 2) @ Q[0::2]).T / 10
        B = torch.randn(self.out_features, r // 2) @ Q[1::2] / 10
        self.lora_A[name].weight.copy_(A)
        self.lora_B[name].weight.copy_(B)

    # -- base weight access ------------------------------------------------------------------------
    def _base_weight(self) -> torch.Tensor:
        """The base weight as [out, in], whatever the storage (Conv1D transposes, NF4 dequantizes)."""
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

    def _weight_norm(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """Row norms of W + scaling * B @ A (DoRA's normaliser), one per output feature."""
        return (weight + self.delta_weight(name).to(weight.dtype)).norm(p=2, dim=1)

    # -- merging -----------------------------------------------------------------------------------
    def _merge_one(self, name: str, safe_merge: bool, unmerged: Optional[torch.Tensor] = None) -> None:
        """W <- W + delta, or for DoRA W <- f (W + delta) with f = m / ||W0 + delta|| (W0: `unmerged`, else W)."""
        with torch.no_grad():
            weight = self._base_weight()
            delta = self.delta_weight(name).to(weight.dtype)
            if self.use_dora[name]:
                factor = self._dora_scale(name, weight if unmerged is None else unmerged)
                merged = factor[:, None].to(weight.dtype) * (weight + delta)
                self._dora_merge_factor[name] = factor.detach().clone()
            else:
                merged = weight + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"safe_merge: merging adapter {name!r} would put NaN/inf into the base weights; "
                                 "the adapter is broken. Nothing was merged into this layer.")
            self._set_base_weight(merged)

    def _without(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """`weight` ([out, in], adapter `name` merged into it) with that adapter taken out."""
        if self.use_dora[name]:
            weight = weight / self._dora_merge_factor[name][:, None].to(weight.dtype)
        return weight - self.delta_weight(name).to(weight.dtype)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = self._fast_route
        if route is None:
            route = self._fast_route = self._find_fast_route()
        if route and not args and not kwargs:
            # Fast path (lorakit.fast). When decoding one token, the Python work here is a visible share of the
            # step: between two calls of a layer every weight of the model streams through the caches, so each
            # object read here is a cache miss. Hence the cached route holds the parameter and hook dicts
            # themselves (not the modules that own them), and a dropout that does nothing is not read at all.
            # Measured (benchmarks/inference.py, SmolLM2-135M): 1.057-1.065x the base's token before, 1.043-1.049x now.
            name, base_params, a_params, b_params, hooks, pre_hooks, dropout = route
            W = base_params.get("weight")  # None under torch.nn.utils.parametrize, for one
            if W is not None and not (hooks or pre_hooks):
                A, B = a_params["weight"], b_params["weight"]
                autocast = autocast_enabled(x)
                if x.dtype is W.dtype and A.dtype is not x.dtype and not autocast and torch.is_grad_enabled():
                    # Training a bf16 base with float32 adapters (get_peft_model's default): the adapter runs in
                    # bf16 too, as under autocast, and gradients reach A and B in float32. Without autograd the
                    # general path is faster on the CPU (bf16 matrix-vector products are slow there).
                    A, B = A.to(x.dtype), B.to(x.dtype)
                if autocast or x.dtype is A.dtype is W.dtype:
                    p = dropout.p if dropout is not None and dropout.training else 0.0
                    return lora_linear(x, W, base_params.get("bias"), A, B, self.scaling[name], p,
                                       self.fan_in_fan_out)
        return self._general_forward(x, *args, **kwargs)

    def _find_fast_route(self) -> tuple | bool:
        """What the fast path needs when one plain adapter runs on a Linear/Conv1D; False otherwise.

        It keeps dicts that a module never replaces, so a parameter assigned or loaded later is still seen, and
        the adapter's dropout only if it is an nn.Dropout; lora_A, lora_B and lora_dropout forget the route when
        one of their entries is replaced.
        """
        active = self.active_adapters
        if self.disable_adapters or self.row_adapters is not None or len(active) != 1 or self.merged_adapters:
            return False
        name, base = active[0], self.base_layer
        if name not in self.lora_A or self.use_dora[name] or not (self.fan_in_fan_out or type(base) is nn.Linear):
            return False
        if "forward" in base.__dict__:
            return False  # a forward replaced on the instance (accelerate's offloading hooks do that) must run
        dropout = self.lora_dropout[name]
        if type(dropout) is nn.Identity:
            dropout = None
        elif type(dropout) is not nn.Dropout:
            return False  # a dropout module of the user's own: the general path calls it
        return (name, base._parameters, self.lora_A[name]._parameters, self.lora_B[name]._parameters,
                base._forward_hooks, base._forward_pre_hooks, dropout)

    def _general_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.row_adapters is not None:
            return self._mixed_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        result_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.r:
                continue
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            x_lora = self.lora_dropout[name](x.to(A.dtype))
            lora_out = F.linear(F.linear(x_lora, A), B) * self.scaling[name]
            if self.use_dora[name]:
                lora_out = self._dora_output(name, x_lora, x, result, lora_out)
            # Summed in the adapter's (wider) dtype and rounded once at the end, as PEFT does: a bf16 base
            # then gives PEFT's outputs to the bit.
            result = result + lora_out
        return result.to(result_dtype)

    def _dora_output(self, name: str, x_lora: torch.Tensor, x: torch.Tensor, base_result: torch.Tensor,
                     lora_out: torch.Tensor) -> torch.Tensor:
        """DoRA: m / ||W + sBA|| rescales W x + s B A x; the norm is detached as in the DoRA paper (4.3)."""
        weight = self._base_weight().to(lora_out.dtype)
        scale = self._dora_scale(name, weight)
        if x_lora is x or not self.training:
            base_out = base_result.to(lora_out.dtype)
        else:
            # Dropout changed the input, so W x is recomputed on the dropped input, through the base layer:
            # a 4-bit one dequantizes again in the backward rather than keeping a full-precision copy.
            base_out = self.base_layer(x_lora.to(x.dtype)).to(lora_out.dtype)
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            base_out = base_out - bias.to(base_out.dtype)
        return (scale - 1) * base_out + scale * lora_out

    def _dora_scale(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + sBA|| per output feature; the norm is detached as in the DoRA paper (4.3)."""
        with torch.no_grad():  # detached: no graph (and no saved W + sBA) is built for it
            norm = self._weight_norm(weight, name)
        return self.lora_magnitude_vector[name].weight / norm

    def _mixed_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """One forward for a batch whose rows use different adapters: per-row A and B are gathered."""
        result = self.base_layer(x, *args, **kwargs)
        rows = self._row_groups(x.shape[0])
        used = list(dict.fromkeys(n for n in rows if n is not None))
        if not used:
            return result
        dtype = self.lora_A[used[0]].weight.dtype
        r_max = max(self.r[n] for n in used)
        # Slot 0 is an all-zero adapter for rows that run the base model.
        A = torch.stack([x.new_zeros(r_max, self.in_features, dtype=dtype)] +
                        [F.pad(self.lora_A[n].weight, (0, 0, 0, r_max - self.r[n])) for n in used])
        B = torch.stack([x.new_zeros(self.out_features, r_max, dtype=dtype)] +
                        [F.pad(self.lora_B[n].weight * self.scaling[n], (0, r_max - self.r[n])) for n in used])
        slot = torch.tensor([used.index(n) + 1 if n is not None else 0 for n in rows], device=x.device)
        x3 = x.to(dtype).reshape(x.shape[0], -1, self.in_features)
        if self.training:
            p = torch.tensor([self._dropout_p(n) for n in rows], device=x.device, dtype=dtype)
            keep = torch.bernoulli((1 - p)[:, None, None].expand_as(x3))
            x3 = x3 * keep / (1 - p)[:, None, None]
        h = torch.bmm(x3, A[slot].transpose(1, 2))
        lora_out = torch.bmm(h, B[slot].transpose(1, 2))
        if any(self.use_dora[n] for n in used):
            weight = self._base_weight().to(dtype).detach()
            row_scale = self._dora_row_scales(used, slot, weight)[:, None, :]
            base_out = F.linear(x3, weight)
            lora_out = (row_scale - 1) * base_out + row_scale * lora_out
        return result + lora_out.reshape(result.shape).to(result.dtype)

    def _dropout_p(self, name: Optional[str]) -> float:
        dropout = self.lora_dropout[name] if name is not None else None
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0


class LoraEmbedding(LoraLayer):
    """LoRA around nn.Embedding: the update is a lookup into A^T followed by B.

    Embeddings that scale their output (Gemma 3's `embed_scale`) scale the LoRA update too, as PEFT does,
    so merged and unmerged agree. DoRA keeps one magnitude per embedding dimension (a column of the table).
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
        self.r[name], self.lora_alpha[name], self.scaling[name] = r, alpha, scaling
        self.use_dora[name] = use_dora
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        A = torch.randn(r, self.in_features, device=weight.device, dtype=dtype)
        B = torch.randn(self.out_features, r, device=weight.device, dtype=dtype)
        if init is not False:
            # The update must start at zero; with A = 0 the gradient still reaches A through B.
            nn.init.zeros_(A)
            nn.init.normal_(B)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)
        if use_dora:
            with torch.no_grad():
                norm = self._column_norm(weight.to(dtype), name)
            self.lora_magnitude_vector[name] = DoraMagnitude(norm)

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * (B @ A)^T, shaped like the embedding table [num_embeddings, dim]."""
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]

    def _column_norm(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """Norms of the columns of W + delta (DoRA's normaliser), one per embedding dimension."""
        return (weight + self.delta_weight(name).to(weight.dtype)).norm(p=2, dim=0)

    def _dora_scale(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """m / ||W + delta|| per embedding dimension, with the norm detached as in the DoRA paper (4.3)."""
        magnitude = self.lora_magnitude_vector[name].weight
        with torch.no_grad():
            norm = self._column_norm(weight.to(magnitude.dtype), name)
        return magnitude / norm

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

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.base_layer.weight.copy_(weight)

    def _merge_one(self, name: str, safe_merge: bool, unmerged: Optional[torch.Tensor] = None) -> None:
        with torch.no_grad():
            weight = self.base_layer.weight
            merged = weight + self.delta_weight(name).to(weight.dtype)
            if self.use_dora[name]:
                factor = self._dora_scale(name, weight if unmerged is None else unmerged)
                merged = merged * factor.to(weight.dtype)
                self._dora_merge_factor[name] = factor.detach().clone()
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"safe_merge: merging adapter {name!r} would put NaN/inf into the embedding.")
            weight.copy_(merged)

    def _without(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if self.use_dora[name]:
            weight = weight / self._dora_merge_factor[name].to(weight.dtype)
        return weight - self.delta_weight(name).to(weight.dtype)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(ids, *args, **kwargs)
        result = self.base_layer(ids, *args, **kwargs)
        if self.merged:
            return result
        embed_scale = self._embed_scale()
        if self.row_adapters is not None:
            row_scale, delta = self._mixed_delta(ids)
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            if row_scale is not None:
                result = result * row_scale.to(result.dtype)
            return result + delta.to(result.dtype)
        for name in self.active_adapters:
            if name not in self.r:
                continue
            after_a = self._lookup(ids, self.lora_embedding_A[name].T)
            delta = after_a @ self.lora_embedding_B[name].T * self.scaling[name]
            if embed_scale is not None:
                delta = delta * embed_scale.to(delta.dtype)
            if self.use_dora[name]:
                scale = self._dora_scale(name, self.base_layer.weight)
                result, delta = result * scale.to(result.dtype), delta * scale.to(delta.dtype)
            result = result + delta.to(result.dtype)
        return result

    def _mixed_delta(self, ids: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """Each row's LoRA update, and each row's DoRA scale of the base output (None when no row uses DoRA)."""
        rows = self._row_groups(ids.shape[0])
        used = list(dict.fromkeys(n for n in rows if n is not None))
        weight = self.base_layer.weight
        if not used:
            return None, weight.new_zeros(*ids.shape, self.out_features)
        r_max = max(self.r[n] for n in used)
        lora_dtype = self.lora_embedding_A[used[0]].dtype
        A = torch.stack([weight.new_zeros(self.in_features, r_max, dtype=lora_dtype)] +
                        [F.pad(self.lora_embedding_A[n].T, (0, r_max - self.r[n])) for n in used])
        B = torch.stack([weight.new_zeros(r_max, self.out_features, dtype=lora_dtype)] +
                        [F.pad(self.lora_embedding_B[n].T * self.scaling[n], (0, 0, 0, r_max - self.r[n]))
                         for n in used])
        slot = torch.tensor([used.index(n) + 1 if n is not None else 0 for n in rows], device=ids.device)
        ids2 = ids.reshape(ids.shape[0], -1)
        after_a = A[slot[:, None], ids2]  # [batch, seq, r]
        delta = torch.bmm(after_a, B[slot])
        row_scale = None
        if any(self.use_dora[n] for n in used):
            row_scale = self._dora_row_scales(used, slot, weight.detach().to(lora_dtype))[:, None, :]  # [b, 1, dim]
            delta = delta * row_scale
            row_scale = row_scale.reshape(ids.shape[0], *([1] * (ids.dim() - 1)), self.out_features)
        return row_scale, delta.reshape(*ids.shape, self.out_features)


class ModulesToSaveWrapper(nn.Module):
    """A fully trainable copy of a module per adapter (e.g. a classifier head); the original stays frozen."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        self.row_adapters: Optional[list[Optional[str]]] = None

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
        if self.row_adapters is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        names = self.row_adapters
        repeat = x.shape[0] // len(names)
        rows = [n if n in self.modules_to_save else None for n in names for _ in range(repeat)]
        used = list(dict.fromkeys(rows))
        if len(used) == 1:
            module = self.modules_to_save[used[0]] if used[0] is not None else self.original_module
            return module(x, *args, **kwargs)
        outputs = [None] * len(rows)
        for name in used:
            index = [i for i, n in enumerate(rows) if n == name]
            module = self.modules_to_save[name] if name is not None else self.original_module
            out = module(x[index], *args, **kwargs)
            for j, i in enumerate(index):
                outputs[i] = out[j]
        return torch.stack(outputs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code reads e.g. `lm_head.weight`: answer with the module that would run.
            modules = self._modules
            if "original_module" not in modules:
                raise
            return getattr(self.active_module(), name)
