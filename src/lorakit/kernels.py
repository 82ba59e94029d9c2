"""The LoRA update of a Linear or Conv1D layer, in every form lorakit runs it.

    y = x W^T + b + s * dropout(x) A^T B^T                 A: [r, in], B: [out, r], s = alpha / r
    DoRA:  y = m / ||W + s B A|| * (x W^T + s * dropout(x) A^T B^T) + b      (row norms, detached)

One rounding rule everywhere: the update is computed in the adapter's dtype (under autocast too: autocast
rounds only the base matmul), the base output is added to it in that dtype, and the sum is rounded once to the
base output's dtype. (An update taken in autocast's bf16 and summed there gives less accurate LoRA gradients
than PEFT's own bf16 arithmetic.)

Four entry points, one arithmetic:
- `lora_linear`: one plain adapter on a plain weight. With autograd, one node (`LoraLinearFunction`) whose
  backward saves only x, x A^T and a bool dropout mask; without, the base matmul and an in-place update.
- `add_lora`: the base layer's output plus each running adapter's update (DoRA, several adapters, any base).
- `add_lora_by_rows`: a batch whose rows use different adapters. Each adapter's update is computed on the
  whole batch, exactly as `add_lora` computes it, and kept for that adapter's rows: a row's output is the
  one it gets when its adapter runs alone on the batch, bit for bit. (Computing each adapter on its own rows
  only would be fewer operations, but a BLAS picks other kernels for other row counts and rounds differently.)
- `stack_lora` + `add_stacked_lora`: the server's decode step. Several adapters on several projections that read
  the same input (q, k and v of a layer) as three matmuls whatever the adapters in the batch, each adapter's
  weights read once; `s` is folded into B, and a row's update is its adapter's alone up to the order of the
  sums (other adapters' columns add exact zeros).

Imports nothing else from lorakit.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

# One cheap call (~0.15 us) answers "is any autocast on?"; `is_autocast_enabled(x.device.type)` costs ~1 us,
# and decoding one token runs this check for every adapted layer. Older torch lacks it: ask per device.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device."""
    return _any_autocast() and torch.is_autocast_enabled(x.device.type)


class LoraWeights(NamedTuple):
    """One adapter on one layer, as the kernels take it."""

    a: torch.Tensor  # A: [r, in]
    b: torch.Tensor  # B: [out, r]
    scaling: float
    dropout: float = 0.0  # nn.Dropout's p, applied while training
    magnitude: Optional[torch.Tensor] = None  # DoRA's m: [out]; None for plain LoRA
    dropout_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # a dropout module of the user's own


class DoraBase(NamedTuple):
    """What DoRA needs of the base layer: its weight as [out, in] (read only when DoRA runs), its bias, and its
    forward (to recompute W x on the dropped-out input while training)."""

    weight: Callable[[], torch.Tensor]
    bias: Optional[torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]


# -- one plain adapter on a plain weight -------------------------------------------------------------------

class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T as one node; the backward saves only x, x A^T and a bool mask.

    Backward, with g = dL/dy, D the dropout mask / (1 - p) (1 without dropout) and h = (D * x) A^T:
        grad_x = g W + s ((g B) A) * D        grad_A = s (g B)^T (D * x)        grad_B = s g^T h
        grad_W = g^T x                        grad_b = sum over tokens of g
    When the adapter's dtype is wider than the base's (a bf16 base, float32 A and B), the LoRA terms are
    computed in the adapter's dtype and the sum rounded once, as the rule says; g B is then taken in that dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float, fan_in_fan_out: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weight_t = weight if fan_in_fan_out else weight.t()  # [in, out]
        x_lora = x2.to(lora_a.dtype)
        mask = None
        if dropout_p > 0:
            # The same RNG draw as F.dropout's CPU kernel (bernoulli_(1 - p), then / (1 - p)).
            noise = torch.empty_like(x_lora).bernoulli_(1 - dropout_p)
            mask = noise.bool()
            x_lora = x_lora * noise.div_(1 - dropout_p)
            del noise
        xa = x_lora @ lora_a.t()  # [tokens, r], in the adapter's dtype
        out = torch.addmm(bias, x2, weight_t) if bias is not None else x2 @ weight_t
        if out.dtype == lora_b.dtype:
            out.addmm_(xa, lora_b.t(), alpha=scaling)
        else:
            out = out.to(lora_b.dtype).addmm_(xa, lora_b.t(), alpha=scaling).to(out.dtype)
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa, mask)
        ctx.scaling, ctx.dropout_p, ctx.fan_in_fan_out = scaling, dropout_p, fan_in_fan_out
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, lora_a, lora_b, xa, mask = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        g_lora = g.to(lora_b.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        noise = mask.to(lora_a.dtype).div_(1 - p) if mask is not None else None
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        gb = g_lora @ lora_b if (need_x or need_a) else None  # [tokens, r]
        if need_x:
            grad_x = g @ weight.t() if ctx.fan_in_fan_out else g @ weight
            if noise is None and grad_x.dtype == lora_a.dtype:
                grad_x.addmm_(gb, lora_a, alpha=s)
            else:
                lora_grad = (gb @ lora_a).mul_(s)
                grad_x.add_(lora_grad.mul_(noise) if noise is not None else lora_grad)
            grad_x = grad_x.view(x.shape)
        if need_a:
            x_lora = x2.to(lora_a.dtype)
            grad_a = (gb.t() @ (x_lora if noise is None else x_lora * noise)).mul_(s)
        if need_b:
            grad_b = (g_lora.t() @ xa).mul_(s)
        if need_w:
            grad_w = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """x W^T + b + scaling * dropout(x) A^T B^T (W is [in, out] when `fan_in_fan_out`, GPT-2's Conv1D).

    Under autocast the base matmul runs in the autocast dtype and the update in the adapter's. Without autograd
    it is the base matmul and an in-place update: the same arithmetic as `add_lora`, so both give the same bits.
    """
    if _any_autocast() and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, fan_in_fan_out)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_a.requires_grad
                                    or lora_b.requires_grad or (bias is not None and bias.requires_grad)):
        return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, fan_in_fan_out)
    out = F.linear(x, weight, bias) if not fan_in_fan_out else base_linear(x, weight, bias, True)
    if dropout_p == 0.0 and lora_a.dtype is out.dtype and x.dtype is out.dtype:
        # What _plus_update_in does here (nothing to convert, the sum formed in `out`), without its steps:
        # decoding one token runs this for every adapted layer.
        _accumulate(out, x, lora_a, lora_b, scaling)
        return out
    return _plus_update_in(out, x, LoraWeights(lora_a, lora_b, scaling, dropout_p), dropout_p > 0, True, None)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """x W^T + b, for nn.Linear's [out, in] weight or Conv1D's [in, out]."""
    if not fan_in_fan_out:
        return F.linear(x, weight, bias)
    out = torch.matmul(x, weight)
    return out.add_(bias) if bias is not None else out


# -- the general path: any base output, any adapters -------------------------------------------------------

def add_lora(base_out: torch.Tensor, x: torch.Tensor, adapters: Sequence[LoraWeights], training: bool,
             dora: Optional[DoraBase] = None) -> torch.Tensor:
    """`base_out` (the base layer's output for x) plus each adapter's update, by the rounding rule.

    Without autograd the sum is formed in place in `base_out`, which must be the caller's own tensor.
    """
    in_place = not torch.is_grad_enabled()
    for lora in adapters:
        base_out = _plus_update(base_out, x, lora, training, in_place, dora)
    return base_out


def add_lora_by_rows(base_out: torch.Tensor, x: torch.Tensor,
                     adapters: Sequence[tuple[LoraWeights, torch.Tensor]], training: bool,
                     dora: Optional[DoraBase] = None) -> torch.Tensor:
    """A mixed batch: each (adapter, rows) pair, rows a bool [batch] mask, updates its rows of `base_out`; the
    other rows keep the base output.

    Each adapter's x A^T is computed on the whole batch, then zeroed outside its rows, and its product with B
    added to one running sum: a row gets exactly the arithmetic of `add_lora` for its adapter (the same GEMM
    shapes; the other adapters add exact zeros to it).
    """
    in_place = not torch.is_grad_enabled()
    if len(adapters) == 1 and bool(adapters[0][1].all()):  # every row one adapter: exactly add_lora
        return _plus_update(base_out, x, adapters[0][0], training, in_place, dora)
    auto = autocast_enabled(x)
    dtypes = {lora.a.dtype for lora, _ in adapters}
    if len(dtypes) > 1 or any(lora.magnitude is not None for lora, _ in adapters):
        # DoRA rescales the base output too, and adapters of different dtypes round differently: each adapter's
        # output on the whole batch, kept for its rows.
        out = base_out
        for lora, rows in adapters:
            own = _plus_update(base_out.clone() if in_place else base_out, x, lora, training, in_place, dora)
            out = torch.where(rows.view(-1, *([1] * (out.dim() - 1))), own, out)
        return out
    dtype = dtypes.pop()
    with torch.autocast(x.device.type, enabled=False) if auto else contextlib.nullcontext():
        total = _writable_sum(base_out, dtype, in_place)
        for lora, rows in adapters:
            a, b, x_lora, _ = _in_dtype(x, lora, training)
            _accumulate(total, x_lora, a, b, lora.scaling, rows)
        return total if total.dtype == base_out.dtype else total.to(base_out.dtype)


def _plus_update(out: torch.Tensor, x: torch.Tensor, lora: LoraWeights, training: bool, in_place: bool,
                 dora: Optional[DoraBase] = None) -> torch.Tensor:
    """out + the adapter's update of x: computed in the adapter's dtype, summed there, rounded once. `in_place`:
    `out` may be written into (no autograd, and the tensor is the caller's own)."""
    if autocast_enabled(x):  # autocast would round the update's matmuls to its dtype
        with torch.autocast(x.device.type, enabled=False):
            return _plus_update_in(out, x, lora, training, in_place, dora)
    return _plus_update_in(out, x, lora, training, in_place, dora)


def _plus_update_in(out: torch.Tensor, x: torch.Tensor, lora: LoraWeights, training: bool, in_place: bool,
                    dora: Optional[DoraBase]) -> torch.Tensor:
    dtype = lora.a.dtype
    a, b, x_lora, dropped = _in_dtype(x, lora, training)
    if lora.magnitude is not None:
        return _plus_dora_update(out, x, x_lora, dropped, a, b, lora, dtype, dora)
    total = _writable_sum(out, dtype, in_place)
    _accumulate(total, x_lora, a, b, lora.scaling)
    return total if total.dtype == out.dtype else total.to(out.dtype)


def _in_dtype(x: torch.Tensor, lora: LoraWeights, training: bool):
    """(A, B, the input after the adapter's dropout, whether dropout ran), in the adapter's dtype (A's). Decoding
    one token runs this once per adapted layer: conversions that would change nothing are skipped."""
    a, dtype = lora.a, lora.a.dtype
    b = lora.b if lora.b.dtype == dtype else lora.b.to(dtype)
    x_lora = x if x.dtype == dtype else x.to(dtype)
    dropped = training and (lora.dropout_fn is not None or lora.dropout > 0)
    if lora.dropout_fn is not None:
        x_lora = lora.dropout_fn(x_lora)
    elif dropped:
        x_lora = F.dropout(x_lora, lora.dropout, training=True)
    return a, b, x_lora, dropped


def _writable_sum(out: torch.Tensor, dtype: torch.dtype, in_place: bool) -> torch.Tensor:
    """`out` in `dtype`, contiguous, as a tensor the sum may be formed in (`out` itself when `in_place` allows)."""
    total = out if out.dtype == dtype else out.to(dtype)
    if total is out and not in_place:
        return out.clone(memory_format=torch.contiguous_format)
    return total if total.is_contiguous() else total.contiguous()


def _accumulate(total: torch.Tensor, x_lora: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                rows: Optional[torch.Tensor] = None) -> None:
    """total += scaling * (x A^T) B^T in place, x A^T zeroed outside `rows` (a bool [batch] mask) when given."""
    if total.numel() == total.shape[-1] and rows is None:  # one token (decoding one sequence): matrix-vector
        total.view(-1).addmv_(b, a.mv(x_lora.reshape(-1)), alpha=scaling)
        return
    h = x_lora.reshape(-1, x_lora.shape[-1]) @ a.t()  # [tokens, r]
    if rows is not None:
        h.view(rows.shape[0], -1, h.shape[-1]).mul_(rows.view(-1, 1, 1))
    total.view(-1, total.shape[-1]).addmm_(h, b.t(), alpha=scaling)


def _plus_dora_update(out: torch.Tensor, x: torch.Tensor, x_lora: torch.Tensor, dropped: bool, a: torch.Tensor,
                      b: torch.Tensor, lora: LoraWeights, dtype: torch.dtype, dora: Optional[DoraBase]) -> torch.Tensor:
    """DoRA: out + (scale - 1) W x' + scale * s B A x', with scale = m / ||W + s B A|| (detached, DoRA paper 4.3)
    and x' the dropped-out input (W x' is recomputed when dropout changed the input)."""
    if dora is None:
        raise ValueError("a DoRA adapter needs its base layer's weight: pass dora=DoraBase(...)")
    scale = dora_scale(dora.weight().to(dtype), a, b, lora.scaling, lora.magnitude.to(dtype))
    lora_out = F.linear(F.linear(x_lora, a), b) * lora.scaling
    if dropped:  # through the base layer: a 4-bit one dequantizes again rather than keeping a full-precision copy
        base_out = dora.forward(x_lora.to(x.dtype)).to(dtype)
    else:
        base_out = out.to(dtype)
    if dora.bias is not None:
        base_out = base_out - dora.bias.to(dtype)
    return (out.to(dtype) + (scale - 1) * base_out + scale * lora_out).to(out.dtype)


def dora_scale(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """m / ||W + s B A|| per output feature ([out]); the norm carries no gradient (DoRA paper, 4.3)."""
    with torch.no_grad():  # detached: no graph, and no saved W + sBA, is built for it
        norm = (weight + (b @ a) * scaling).norm(p=2, dim=1)
    return magnitude / norm


# -- many adapters on projections that read the same input, stacked ----------------------------------------

class StackedLora(NamedTuple):
    """Adapters on projections that share their input, as `add_stacked_lora` applies them:
        t = x A_all^T                A_all: every (projection, adapter) A, stacked        t: [n, cols]
        t = t * mask                 mask[i, c] = 1 where column c belongs to row i's adapter (several adapters)
        y_p += t_p (s B_p)_all^T     per projection p: its columns of t, its adapters' s B side by side
    """

    a_t: torch.Tensor  # A_all^T: [in, cols]
    parts: tuple  # per part: (columns of y or None for all, columns of t or None for all, [cols_p, out_p])
    owners: torch.Tensor  # [cols]: which adapter (its index in the stack) each column of t belongs to


def stack_lora(projections: Sequence[Sequence[Optional[LoraWeights]]], sizes: Sequence[int]) -> Optional[StackedLora]:
    """projections[p][i]: adapter i's weights on projection p (None where it does not adapt p); sizes[p]: p's
    output features, the projections' outputs side by side in y. None when no adapter adapts any. For a single
    adapter the B's form one block-diagonal matrix over all outputs: one matmul instead of one per projection."""
    a_rows, parts, owners = [], [], []
    col = out = 0
    for adapters, size in zip(projections, sizes):
        blocks = [(i, lora) for i, lora in enumerate(adapters) if lora is not None]
        if blocks:
            width = sum(lora.a.shape[0] for _, lora in blocks)
            a_rows += [lora.a.detach() for _, lora in blocks]
            owners += [torch.full((lora.a.shape[0],), i, device=lora.a.device) for i, lora in blocks]
            b_t = torch.cat([lora.b.detach() * lora.scaling for _, lora in blocks], dim=1).T  # [width, size]
            parts.append((slice(out, out + size), slice(col, col + width), b_t))
            col += width
        out += size
    if not a_rows:
        return None
    if max(len(adapters) for adapters in projections) == 1 and len(parts) > 1:
        block_diagonal = parts[0][2].new_zeros(col, out)
        for out_cols, cols, b_t in parts:
            block_diagonal[cols, out_cols] = b_t
        parts = [(slice(0, out), slice(0, col), block_diagonal)]
    parts = tuple((None if o == slice(0, out) else o, None if c == slice(0, col) else c, b_t.contiguous())
                  for o, c, b_t in parts)
    return StackedLora(torch.cat(a_rows).T.contiguous(), parts, torch.cat(owners))


def add_stacked_lora(out: torch.Tensor, x: torch.Tensor, stacked: StackedLora, row_adapter: Optional[torch.Tensor],
                     masks: Optional[dict] = None) -> torch.Tensor:
    """out [n, sum(sizes)] (the projections' base outputs for x [n, in], the caller's own tensor) plus row i's
    adapter's update, row_adapter[i] its index in the stack (-1: none); None: every row adapter 0, the only one.
    `masks` keeps each layout's row mask for the rest of a step (key: the owners tensor)."""
    dtype = stacked.a_t.dtype
    total = out if out.dtype == dtype else out.to(dtype)
    t = (x if x.dtype == dtype else x.to(dtype)) @ stacked.a_t  # [n, cols]
    if row_adapter is not None:
        mask = None if masks is None else masks.get(stacked.owners)
        if mask is None:
            mask = (row_adapter[:, None] == stacked.owners[None, :]).to(dtype)
            if masks is not None:
                masks[stacked.owners] = mask
        t = t * mask
    for out_cols, cols, b_t in stacked.parts:
        target = total if out_cols is None else total[:, out_cols]
        target.addmm_(t if cols is None else t[:, cols], b_t)
    return total if total.dtype == out.dtype else total.to(out.dtype)
