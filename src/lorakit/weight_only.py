"""Weight-only quantized base weights for decoding: fewer bytes to read, and fewer to multiply, per token.

Generating one token multiplies one activation row by every weight of the model once, so a decode step costs
about the time it takes to stream the weights through the CPU. Two layouts, both computed by PyTorch's packed CPU
matmuls, which take the activations in bfloat16 (rounded there, as llama.cpp rounds them to 8 bits for its
quantized matmuls; norms, attention, the residual stream and LoRA stay in the model's own dtype):

int8 (Int8Linear, `_weight_int8pack_mm`): one scale per output feature, symmetric, round to nearest:
    scale[o] = max_i |W[o, i]| / 127        q[o, i] = round(W[o, i] / scale[o])  in [-127, 127]
    y = x @ W.T + b  ~=  (x @ q.T) * scale + b
int4 (Int4Linear, `_weight_int4pack_mm_for_cpu`): groups of 32 inputs, each with its own scale and zero point
(asymmetric, like llama.cpp's Q4_1):
    scale = (max - min) / 15     zero = min + 8 * scale     q = round((W - min) / scale)  in [0, 15]
    W ~= (q - 8) * scale + zero
A base converted from a 4-bit GGUF file (the embedded SmolLM2 is Q4_1) holds exactly such values, so int4
reproduces it up to the bfloat16 rounding of the scales; for other weights it is lossy like any 4-bit format.

Only for inference: nothing trains these weights, and a LoRA adapter on top reads the base weight through
`dequantize()` as on an NF4 base. The output head is int8 in both (llama.cpp keeps it at 8 bits too).

int4+bf16: the int4 layers (and the int8 head) also keep their dequantized weights in bfloat16, and multiply by
those from BATCH_ROWS rows on (the head from HEAD_BATCH_ROWS). The packed kernels unpack the weights again for
every few rows, so their cost grows with the rows; a bfloat16 matmul on a CPU with bf16 units (AMX, AVX512-BF16)
reads each weight once for a whole batch. One row (a single user's decode) reads the fewer int4 bytes; a batch of
users, and a prompt, the bf16 copy. Both hold the same weights: `dequantize()` in bfloat16, for int4 the very
values the packed matmul multiplies by, for the int8 head its int8 values times their scale rounded to bfloat16.
A CPU without fast bf16 matmuls (AVX2 only: precision.bf16_matmul_speedup) multiplies the copy in float32 instead,
widened for each call (exact: the same values), from FLOAT32_BATCH_ROWS rows on: a prompt; the head keeps no copy
there (widening all of it would cost more than its int8 matmul saves).

`decode_precision("auto", device, model)` picks int4+bf16 on a CPU where int4 reproduces the weights, else fp32.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .precision import BF16_MIN_SPEEDUP, bf16_matmul_speedup
from .quant import quantized_linear_names, replace_module

DECODE_PRECISIONS = ("auto", "fp32", "int8", "int4", "int4+bf16")
GROUP_SIZE = 32  # inputs per int4 scale and zero point
INT4_ROW_BLOCK = 64  # PyTorch's CPU int4 layout packs output rows in blocks of 64
# int4+bf16: from this many rows on, a layer multiplies by its bfloat16 copy; the output head (int8, not 3x
# cheaper to read than bf16 as the int4 body is) from fewer (benchmarks/README.md: int4 with a bf16 copy)
BATCH_ROWS = 16
HEAD_BATCH_ROWS = 8
# Without fast bf16 matmuls: from this many rows on, the copy widened to float32 beats the packed kernels
# (benchmarks/README.md: "int4+bf16 without bf16 units")
FLOAT32_BATCH_ROWS = 32

__all__ = ["BATCH_ROWS", "DECODE_PRECISIONS", "DECODE_PRECISION_HELP", "FLOAT32_BATCH_ROWS", "GROUP_SIZE",
           "HEAD_BATCH_ROWS", "Int8Linear", "Int4Linear", "fuse_rows", "quantize_for_decode", "decode_precision",
           "prepare_for_decode", "reproduces_in_int4"]

DECODE_PRECISION_HELP = ("the base weights' precision while generating: 'int4' (groups of 32, like a Q4_1 GGUF) "
                         "or 'int8' (per output feature): fewer bytes to read per token, answers may differ slightly "
                         "from float32's; 'int4+bf16': int4 for one row at a time, plus a bfloat16 copy of the same "
                         "weights for prompts and batches of users (more memory, faster prompts; on a CPU without "
                         "bf16 units multiplied in float32, for prompts); 'fp32': the weights as loaded; 'auto' "
                         "(default): on a CPU int4+bf16 where int4 reproduces the weights (a base converted from a "
                         "4-bit GGUF, like the embedded SmolLM2), else fp32")


class _PackedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: rows in bfloat16 through the packed matmul (or, with a bfloat16 copy,
    from batch_rows rows on through that), back in x's dtype, + bias."""

    weights_note = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", bias)  # [out] in the activations' dtype, or None
        # [out, in] bfloat16, the same weights for batches of batch_rows rows or more (keep_bf16_copy), or None;
        # not saved with the model
        self.register_buffer("batch_weight", None, persistent=False)
        self.batch_rows = BATCH_ROWS
        self.batch_in_float32 = False  # multiply by the copy widened to float32 (a CPU without bf16 units)

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def keep_bf16_copy(self, from_rows: int = BATCH_ROWS, in_float32: bool = False) -> None:
        """Keep the weights in bfloat16 too, for batches of `from_rows` rows or more (int4+bf16), multiplied in
        float32 when `in_float32`."""
        self.batch_weight = self.dequantize().to(torch.bfloat16)
        self.batch_rows, self.batch_in_float32 = from_rows, in_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [tokens, in]
        if self.batch_weight is not None and rows.shape[0] >= self.batch_rows:
            if self.batch_in_float32:  # the same bf16 values, widened: float32 matmuls are the fast ones here
                out = rows.float() @ self.batch_weight.float().T  # [tokens, out]
            else:
                out = rows @ self.batch_weight.T
        else:
            out = self._matmul(rows)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        copy = "" if self.batch_weight is None else ", bfloat16 copy for batches" \
            + (" (multiplied in float32)" if self.batch_in_float32 else "")
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"weights={self.weights_note}{copy}"


def _bias_of(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().clone()


class Int8Linear(_PackedLinear):
    """A frozen nn.Linear stored as int8 with one bfloat16 scale per output feature (see the module docstring)."""

    weights_note = "int8 (one scale per output feature)"

    def __init__(self, weight_q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight_q.shape[1], weight_q.shape[0], bias)
        self.register_buffer("weight_q", weight_q)  # [out, in] int8
        self.register_buffer("scale", scale)  # [out] bfloat16

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}.")
        weight = linear.weight.detach().float()
        # The bfloat16 scale is what the matmul multiplies by, so q is rounded against that very scale.
        scale = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(torch.bfloat16)
        weight_q = torch.round(weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(weight_q, scale, _bias_of(linear))

    def dequantize(self) -> torch.Tensor:
        """The [out_features, in_features] weight these int8 values stand for, in float32 (a new tensor)."""
        return self.weight_q.float() * self.scale.float()[:, None]

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.weight_q, self.scale)


class Int4Linear(_PackedLinear):
    """A frozen nn.Linear stored as 4-bit values in groups of GROUP_SIZE inputs (see the module docstring)."""

    weights_note = f"int4 (groups of {GROUP_SIZE})"

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("packed", packed)  # PyTorch's CPU int4 layout of q
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in / GROUP_SIZE, out, 2] bfloat16

    @staticmethod
    def supports(linear: nn.Linear) -> bool:
        return linear.in_features % GROUP_SIZE == 0 and linear.out_features % 16 == 0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        if not isinstance(linear, nn.Linear) or not cls.supports(linear):
            raise ValueError(f"Int4Linear needs an nn.Linear with in_features a multiple of {GROUP_SIZE} and "
                             f"out_features a multiple of 16; got {linear}.")
        q, scale, zero = _int4_groups(linear.weight.detach().float())
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(linear.out_features, -1), 2)
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [groups, out, 2]
        return cls(packed, scales_and_zeros, _bias_of(linear), linear.in_features, linear.out_features)

    def dequantize(self) -> torch.Tensor:
        """The [out_features, in_features] weight as the matmul sees it (bfloat16 values, in float32)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        return self._matmul(eye).float().T.contiguous()

    def _matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP_SIZE, self.scales_and_zeros)


def fuse_rows(parts: Sequence[nn.Module]) -> Optional[nn.Module]:
    """One layer computing [parts[0](x), parts[1](x), ...] in one matmul, or None when the parts cannot fuse.
    Each part's weight (int8/int4: its quantized values) becomes a view of the fused one: no second copy."""
    kind = type(parts[0])
    if any(type(p) is not kind for p in parts) or len({(p.bias is None) for p in parts}) > 1:
        return None
    bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
    if kind is nn.Linear:
        weight = torch.cat([p.weight.detach() for p in parts])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        _share_rows(parts, weight, lambda p, rows: setattr(p.weight, "data", rows))
        return fused
    if kind is Int8Linear:
        fused = Int8Linear(torch.cat([p.weight_q for p in parts]), torch.cat([p.scale for p in parts]), bias)
        _share_rows(parts, fused.weight_q, lambda p, rows: setattr(p, "weight_q", rows))
    elif kind is Int4Linear and all(p.out_features % INT4_ROW_BLOCK == 0 for p in parts):
        out = sum(p.out_features for p in parts)
        fused = Int4Linear(torch.cat([p.packed for p in parts]), torch.cat([p.scales_and_zeros for p in parts], 1),
                           bias, parts[0].in_features, out)
        _share_rows(parts, fused.packed, lambda p, rows: setattr(p, "packed", rows))
    else:
        return None
    if all(p.batch_weight is not None for p in parts):
        fused.batch_weight, fused.batch_rows = torch.cat([p.batch_weight for p in parts]), parts[0].batch_rows
        fused.batch_in_float32 = parts[0].batch_in_float32
        _share_rows(parts, fused.batch_weight, lambda p, rows: setattr(p, "batch_weight", rows))
    return fused


def _share_rows(parts: Sequence[nn.Module], fused: torch.Tensor, point) -> None:
    start = 0
    for part in parts:
        point(part, fused[start: start + part.out_features])
        start += part.out_features


def _int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [out, groups, GROUP_SIZE] int32 in [0, 15], scale and zero [out, groups] bfloat16, W ~= (q - 8) * scale + zero.
    q is rounded against the bfloat16 scale and zero the matmul will use."""
    out_features = weight.shape[0]
    groups = weight.reshape(out_features, -1, GROUP_SIZE)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.int32), scale, zero


def reproduces_in_int4(weight: torch.Tensor, tolerance: float = 0.05) -> bool:
    """Whether `weight` [out, in] already holds 4-bit group values (a base converted from a 4-bit GGUF): every
    weight within `tolerance` of a quantization step of what Int4Linear stores (the bfloat16 scales aside)."""
    if weight.shape[1] % GROUP_SIZE:
        return False
    w = weight.detach().float()
    q, scale, zero = _int4_groups(w)
    rebuilt = (q.float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    steps = (rebuilt - w.reshape(q.shape)).abs() / scale.float()[..., None]
    # bfloat16 keeps 8 bits of scale and zero: up to 8 steps' worth of the scale's rounding, plus the zero's
    rounding = (8 + zero.float().abs() / scale.float())[..., None] * 2.0 ** -8
    return bool((steps <= tolerance + rounding).all())


def quantize_for_decode(model: nn.Module, precision: str = "int8") -> int:
    """Replace (in place) every float nn.Linear of `model` that is not part of an adapter by an Int8Linear, or for
    "int4" by an Int4Linear where its shape allows (an Int8Linear elsewhere); the output head is int8 either way
    (a tied head gets its own copy; the embedding keeps its weights); "int4+bf16" as "int4", each layer keeping a
    bfloat16 copy for batches (multiplied in float32 from FLOAT32_BATCH_ROWS rows on, the head keeping none, where
    bf16 matmuls are not fast: see the module docstring). Works on a bare base model and on one that already
    carries LoRA layers (their base_layer is replaced). Returns the count."""
    if precision not in ("int8", "int4", "int4+bf16"):
        raise ValueError(f"quantize_for_decode takes 'int8', 'int4' or 'int4+bf16', got {precision!r}.")
    packed = precision.split("+")[0]
    if not _packed_mm_available(packed):
        raise RuntimeError(f"this PyTorch ({torch.__version__}) has no {packed} packed CPU matmul; use decode "
                           "precision fp32, or a newer PyTorch.")
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    in_float32 = precision.endswith("+bf16") and bf16_matmul_speedup(device) < BF16_MIN_SPEEDUP
    everything = quantized_linear_names(model, skip_modules=())  # every Linear but LoRA's own
    body = set(quantized_linear_names(model))  # the same without the output heads
    for name in everything:
        linear = modules[name]
        int4 = packed == "int4" and name in body and Int4Linear.supports(linear)
        layer = Int4Linear.from_linear(linear) if int4 else Int8Linear.from_linear(linear)
        if precision.endswith("+bf16"):
            if not in_float32:
                layer.keep_bf16_copy(BATCH_ROWS if name in body else HEAD_BATCH_ROWS)
            elif name in body:  # the head keeps none (see the module docstring)
                layer.keep_bf16_copy(FLOAT32_BATCH_ROWS, in_float32=True)
        replace_module(model, name, layer.to(linear.weight.device))
    if hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the head is its own (int8) tensor now
    return len(everything)


def _packed_mm_available(precision: str) -> bool:
    op = "_weight_int8pack_mm" if precision == "int8" else "_weight_int4pack_mm_for_cpu"
    return hasattr(torch.ops.aten, op)


def decode_precision(requested: str, device: torch.device, model: nn.Module | None = None) -> str:
    """The decode precision to serve with: `requested` unless "auto", which on a CPU picks int4+bf16 when `model`'s
    base weights reproduce in int4 (reproduces_in_int4), else fp32; off a CPU it picks fp32. int8 is not chosen:
    where measured it decoded faster than fp32 but read a long prompt slower and changed a few greedy answers
    (benchmarks/decode_vs_llamacpp.py), a trade for the user to make."""
    if requested not in DECODE_PRECISIONS:
        raise ValueError(f"decode precision must be one of {', '.join(DECODE_PRECISIONS)}, got {requested!r}.")
    if requested != "auto":
        if requested != "fp32" and device.type != "cpu":
            raise ValueError(f"decode precision {requested} runs PyTorch's CPU kernels; the model is on "
                             f"{device.type}: use --decode-precision fp32 (or auto) there.")
        return requested
    if device.type != "cpu":
        return "fp32"
    modules = dict(model.named_modules()) if model is not None else {}
    body = [modules[name] for name in quantized_linear_names(model)] if model is not None else []
    if _packed_mm_available("int4") and body and all(Int4Linear.supports(m) and reproduces_in_int4(m.weight)
                                                     for m in body):
        return "int4+bf16"
    return "fp32"


def prepare_for_decode(model: nn.Module, requested: str = "auto") -> str:
    """Resolve `requested` (see decode_precision) for the model's device and quantize the model's base weights in
    place when that gives int8, int4 or int4+bf16; returns the precision chosen."""
    precision = decode_precision(requested, next(model.parameters()).device, model)
    if precision != "fp32":
        quantize_for_decode(model, precision)
    return precision
