"""4-bit NormalFloat (NF4) base weights with double quantization, in plain PyTorch (QLoRA).

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs":
- weights are split into blocks of 64 values; each block stores one absmax constant and 64 4-bit indices
  into the NF4 code book (16 normal quantiles with an exact zero, normalised to [-1, 1]);
- the fp32 absmax constants are themselves quantized ("double quantization"): their mean is subtracted
  and the rest is stored as int8 in blocks of 256 with one fp32 scale per block.
Storage is 4 + 8/64 + 32/(64*256) ~= 4.127 bits per parameter.

NF4Linear keeps only the packed data; its forward and backward dequantize on the fly, so a frozen base
costs ~0.13x the fp32 bytes while LoRA trains on top in full precision.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # values per absmax constant
ABSMAX_BLOCK_SIZE = 256  # absmax constants per fp32 scale (double quantization)
QUANT_METHODS = ("nf4",)

__all__ = [
    "BLOCK_SIZE", "ABSMAX_BLOCK_SIZE", "QUANT_METHODS", "NF4Linear", "nf4_code", "quantize_nf4",
    "dequantize_nf4", "quantize_model", "quantized_linear_names", "dequantize_model", "quantized_nbytes",
]


def nf4_code() -> torch.Tensor:
    """The 16 NF4 values (float32, ascending): normal quantiles with an exact zero, scaled to [-1, 1]."""
    # Paper, section 3 / appendix E: the k-bit NormalFloat uses 2^(k-1) quantiles for the positive half
    # and 2^(k-1) - 1 for the negative half, both taken from the range [delta, 1 - delta] with
    # delta = (1/(2*15) + 1/(2*16)) / 2, plus an exact zero shared by both halves. The asymmetry keeps
    # zero representable (padding and zero weights quantize exactly) while using all 16 codes.
    offset = 1.0 - 0.5 * (1.0 / 30.0 + 1.0 / 32.0)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (values / values.max()).float()


_NF4 = nf4_code()
# Decision boundaries for nearest-code rounding: midpoints between adjacent code values.
_NF4_MIDPOINTS = (_NF4[1:] + _NF4[:-1]) / 2
_ZERO_INDEX = int((_NF4 == 0).nonzero())
# byte -> (code[hi nibble], code[lo nibble]); one gather of this table unpacks and decodes two weights.
_BYTE_TABLE = torch.stack([_NF4.repeat_interleave(16), _NF4.repeat(16)], dim=1)  # [256, 2]
# Each (hi, lo) pair is reinterpreted as one integer twice the dtype's width, so the gather copies one
# scalar per byte instead of a 2-element row: ~5x faster on CPU. The bits are copied, never converted.
_PAIR_CARRIER = {2: torch.int32, 4: torch.int64}
_TABLE_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256] table of packed (hi, lo) pairs in dtype (or [256, 2] if dtype has no carrier, e.g. float64)."""
    key = (device, dtype)
    table = _TABLE_CACHE.get(key)
    if table is None:
        table = _BYTE_TABLE.to(device=device, dtype=dtype)
        carrier = _PAIR_CARRIER.get(table.element_size())
        if carrier is not None:
            table = table.view(carrier).view(-1)
        _TABLE_CACHE[key] = table
    return table


# ---------------------------------------------------------------------------------------------------
# Tensor-level quantization
# ---------------------------------------------------------------------------------------------------


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: fp32 absmax -> (int8 codes, fp32 scale per 256 codes, fp32 mean)."""
    mean = absmax.mean()
    centered = absmax - mean
    n_groups = math.ceil(absmax.numel() / ABSMAX_BLOCK_SIZE)
    centered = F.pad(centered, (0, n_groups * ABSMAX_BLOCK_SIZE - absmax.numel())).view(n_groups, -1)
    scale = centered.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: codes are all 0
    codes = torch.round(centered / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.view(-1)[:absmax.numel()], scale, mean


def _dequantize_absmax(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_mean: torch.Tensor,
                       n_blocks: int) -> torch.Tensor:
    """int8 absmax codes -> fp32 absmax per block of 64 weights (first n_blocks entries)."""
    codes = absmax_q.float()
    if codes.numel() != absmax_scale.numel() * ABSMAX_BLOCK_SIZE:
        codes = F.pad(codes, (0, absmax_scale.numel() * ABSMAX_BLOCK_SIZE - codes.numel()))
    codes = codes.view(absmax_scale.numel(), ABSMAX_BLOCK_SIZE)
    absmax = torch.addcmul(absmax_mean.float(), codes, absmax_scale.float()[:, None])
    return absmax.view(-1)[:n_blocks]


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize any tensor to NF4 with double-quantized absmax; returns the four storage tensors.

    packed: uint8 [ceil(n/2)] (first value of each pair in the high nibble); absmax_q: int8 [ceil(n/64)]
    codes of the per-block absmax; absmax_scale: fp32 [ceil(n_blocks/256)]; absmax_mean:
    fp32 scalar. n is weight.numel(); weights whose n is not a multiple of 64 are zero-padded.
    """
    if weight.numel() == 0:
        raise ValueError(f"Cannot quantize an empty tensor (shape {tuple(weight.shape)}).")
    if not weight.is_floating_point():
        raise ValueError(f"NF4 quantizes floating-point weights; got dtype {weight.dtype}.")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = math.ceil(n / BLOCK_SIZE)
    if not torch.isfinite(flat).all():
        raise ValueError("Cannot quantize a weight that contains NaN or Inf; check the checkpoint.")
    blocks = F.pad(flat, (0, n_blocks * BLOCK_SIZE - n)).view(n_blocks, BLOCK_SIZE)
    absmax_q, absmax_scale, absmax_mean = _quantize_absmax(blocks.abs().amax(dim=1))
    # Round against the absmax that dequantization will actually use (after double quantization), so
    # every index is the nearest code for the stored scale.
    absmax = _dequantize_absmax(absmax_q, absmax_scale, absmax_mean, n_blocks)
    safe = torch.where(absmax != 0, absmax, torch.ones_like(absmax))
    normed = torch.where(absmax[:, None] != 0, blocks / safe[:, None], torch.zeros_like(blocks))
    idx = torch.bucketize(normed, _NF4_MIDPOINTS.to(normed.device), out_int32=True)
    idx = idx.to(torch.uint8).view(-1)[:n]
    if n % 2:
        idx = F.pad(idx, (0, 1), value=_ZERO_INDEX)
    packed = (idx[0::2] << 4) | idx[1::2]
    return {"packed": packed, "absmax_q": absmax_q, "absmax_scale": absmax_scale, "absmax_mean": absmax_mean}


def dequantize_nf4(packed: torch.Tensor, absmax_q: torch.Tensor, absmax_scale: torch.Tensor,
                   absmax_mean: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """Inverse of quantize_nf4: a fresh tensor of `shape` in `dtype` on the data's device."""
    n = math.prod(shape)
    n_blocks = math.ceil(n / BLOCK_SIZE)
    absmax = _dequantize_absmax(absmax_q, absmax_scale, absmax_mean, n_blocks).to(dtype)
    # int32 indices: 4 bytes per pair instead of 8 for int64, and index_select accepts them directly.
    values = _byte_table(packed.device, dtype).index_select(0, packed.int()).view(dtype).view(-1)
    if values.numel() != n_blocks * BLOCK_SIZE:  # odd sizes only: pad to whole blocks, trim after
        values = F.pad(values[:n], (0, n_blocks * BLOCK_SIZE - n))
    values = values.view(n_blocks, BLOCK_SIZE).mul_(absmax[:, None])
    return values.view(-1)[:n].view(shape)


# ---------------------------------------------------------------------------------------------------
# NF4Linear
# ---------------------------------------------------------------------------------------------------


class _NF4LinearFunction(torch.autograd.Function):
    """y = x @ dequant(W)^T + b. Saves only the packed buffers; dequantizes again in backward."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax_q, absmax_scale, absmax_mean, shape):
        weight = dequantize_nf4(packed, absmax_q, absmax_scale, absmax_mean, shape, x.dtype)
        out = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(packed, absmax_q, absmax_scale, absmax_mean)
        ctx.shape = shape
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_nf4(*ctx.saved_tensors, ctx.shape, grad_out.dtype)
            grad_x = (grad_out @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:  # only if someone unfroze the bias
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored as NF4 (4-bit, blocks of 64, double-quantized absmax)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        """Empty (zero) storage of the right shapes, e.g. to load_state_dict into; use from_linear normally."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_shape = (out_features, in_features)
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        n_blocks = math.ceil(n / BLOCK_SIZE)
        n_groups = math.ceil(n_blocks / ABSMAX_BLOCK_SIZE)
        self.register_buffer("packed", torch.zeros(math.ceil(n / 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax_q", torch.zeros(n_blocks, dtype=torch.int8, device=device))
        self.register_buffer("absmax_scale", torch.ones(n_groups, dtype=torch.float32, device=device))
        self.register_buffer("absmax_mean", torch.zeros((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        """Quantize `linear` (on its own device); compute_dtype defaults to the weight's dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear.from_linear expects an nn.Linear, got {type(linear).__name__}.")
        weight = linear.weight
        if weight.device.type == "meta":
            raise ValueError("Cannot quantize a Linear on the meta device; load the real weights first.")
        compute_dtype = compute_dtype or weight.dtype
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                    weight.device)
        for name, tensor in quantize_nf4(weight).items():
            getattr(layer, name).copy_(tensor)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() / .bfloat16() would also cast the fp32 double-quantization constants
        # (silently losing absmax precision). Treat a dtype cast like nn.Linear does, as a change of the
        # compute dtype, and keep the constants fp32 on whatever device they moved to.
        new_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.packed.device)).dtype
        consts = {k: self._buffers[k] for k in ("absmax_scale", "absmax_mean")}
        super()._apply(fn, recurse)
        self.compute_dtype = new_dtype
        for k, v in consts.items():
            if self._buffers[k].dtype != torch.float32:
                self._buffers[k] = v.to(self._buffers[k].device)
        return self

    def dequantize(self) -> torch.Tensor:
        """The full [out_features, in_features] weight in compute_dtype (a new tensor, not cached)."""
        return dequantize_nf4(self.packed, self.absmax_q, self.absmax_scale, self.absmax_mean,
                              self.weight_shape, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _NF4LinearFunction.apply(x.to(self.compute_dtype), self.bias, self.packed, self.absmax_q,
                                       self.absmax_scale, self.absmax_mean, self.weight_shape)
        return out.to(x.dtype)

    def nbytes(self) -> int:
        """Bytes of the quantized weight storage (bias excluded)."""
        return sum(b.numel() * b.element_size()
                   for b in (self.packed, self.absmax_q, self.absmax_scale, self.absmax_mean))

    def bits_per_param(self) -> float:
        return 8 * self.nbytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits=nf4 ({self.bits_per_param():.3f}/param, "
                f"block={BLOCK_SIZE}, double-quant int8/{ABSMAX_BLOCK_SIZE}), compute_dtype={self.compute_dtype}")


# ---------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------


def _matches(name: str, skip: Sequence[str]) -> bool:
    """Whether `name` is, ends with, or lies inside a module named in `skip` (by whole name components)."""
    dotted = f".{name}."
    return any(f".{s}." in dotted for s in skip)


# Output heads under the names transformers gives them (causal LM, sequence classification).
HEAD_NAMES = ("lm_head", "score", "classifier")


def _output_heads(model: nn.Module) -> list[str]:
    """HEAD_NAMES plus whatever module the model reports as its output embeddings."""
    names = list(HEAD_NAMES)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None:
        names += [name for name, module in model.named_modules() if module is head and name]
    return names


def _refuse_save_pretrained(*args, **kwargs):
    raise ValueError("this model's Linear weights are lorakit's 4-bit NF4, which transformers cannot load back: "
                     "save the adapter (PeftModel.save_pretrained), or merge_and_unload() / dequantize_model() "
                     "first to save full-precision weights.")


def _is_adapter_weight(name: str) -> bool:
    # LoRA's own A/B matrices live under modules named lora_*; they are trained, never quantized.
    return any(part.startswith("lora_") for part in name.split("."))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, method: str = "nf4", skip_modules: Sequence[str] | None = None,
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear (in place) by NF4Linear, except the modules named in `skip_modules`.

    `skip_modules` (name components: "lm_head", "mlp", "layers.0"): None keeps the output heads
    (lm_head, score, classifier, the model's output embeddings) in full precision; () quantizes them
    too. Embeddings and norms are not Linear and stay as they are. Apply it to the base model before
    get_peft_model. NF4 weights have no gradient, and such a model cannot be saved with transformers'
    save_pretrained (it refuses): save the adapter, or dequantize first. Returns `model`.
    """
    from .layers import LoraLayer, ModulesToSaveWrapper

    if method not in QUANT_METHODS:
        raise ValueError(f"Unknown quantization method {method!r}; supported methods: "
                         f"{', '.join(QUANT_METHODS)}.")
    if type(model) is nn.Linear:
        raise TypeError("quantize_model replaces submodules in place and cannot replace the model itself; "
                        "use NF4Linear.from_linear(linear) for a single layer.")
    if any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in model.modules()):
        raise ValueError("quantize_model is applied to the base model before get_peft_model (QLoRA: 4-bit base, "
                         "LoRA on top); this model already has adapters or trainable head copies.")
    skip = _output_heads(model) if skip_modules is None else \
        ([skip_modules] if isinstance(skip_modules, str) else list(skip_modules))
    chosen = set(quantized_linear_names(model, skip_modules))
    targets = [(name, m) for name, m in model.named_modules() if name in chosen]
    if not targets and not any(isinstance(m, NF4Linear) for m in model.modules()):
        kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__
                        or type(m).__name__ == "Conv1D"})
        raise ValueError(f"quantize_model found no torch.nn.Linear layer to quantize in {type(model).__name__}"
                         + (f" (it has {', '.join(kinds)}, which NF4 does not cover)" if kinds else "")
                         + (f" outside skip_modules={skip}" if skip_modules is not None else "") + ".")
    for name, linear in targets:
        replace_module(model, name, NF4Linear.from_linear(linear, compute_dtype))
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = _refuse_save_pretrained  # the instance's; dequantize_model removes it
    return model


def quantized_linear_names(model: nn.Module, skip_modules: Sequence[str] | None = None) -> list[str]:
    """The modules quantize_model(model, skip_modules=...) replaces: every nn.Linear outside skip_modules (by
    default the output heads) and outside LoRA's own matrices. Works on a model on the meta device too."""
    skip = _output_heads(model) if skip_modules is None else \
        ([skip_modules] if isinstance(skip_modules, str) else list(skip_modules))
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not _matches(name, skip) and not _is_adapter_weight(name)]


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every NF4Linear (in place) by an nn.Linear holding its dequantized weight; returns `model`.

    The weights keep NF4's rounding: this is not the original full-precision checkpoint.
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name, q in targets:
        dt = dtype or q.compute_dtype
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = nn.Parameter(q.dequantize().to(dt), requires_grad=False)
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(dt).clone(), requires_grad=False)
        replace_module(model, name, linear)
    if model.__dict__.get("save_pretrained") is _refuse_save_pretrained:
        del model.save_pretrained
    return model


def quantized_nbytes(model: nn.Module) -> dict[str, float]:
    """Storage of the NF4 layers vs the same weights in fp32 / bf16 (biases excluded)."""
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    n_params = sum(m.in_features * m.out_features for m in layers)
    q_bytes = sum(m.nbytes() for m in layers)
    return {
        "num_layers": len(layers),
        "num_params": n_params,
        "quantized_bytes": q_bytes,
        "fp32_bytes": 4 * n_params,
        "bf16_bytes": 2 * n_params,
        "ratio_vs_fp32": q_bytes / (4 * n_params) if n_params else 0.0,
        "ratio_vs_bf16": q_bytes / (2 * n_params) if n_params else 0.0,
        "bits_per_param": 8 * q_bytes / n_params if n_params else 0.0,
    }
