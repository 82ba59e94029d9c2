"""The LoRA update, y = x W^T + b + s * B(A(dropout(x))), for Linear and Conv1D layers.

Imports nothing else from lorakit.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# One cheap call (~0.15 us) answers "is any autocast on?"; `is_autocast_enabled(x.device.type)` costs ~1 us,
# and decoding one token runs this check for every adapted layer. Older torch lacks it: ask per device.
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def autocast_enabled(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device."""
    return _any_autocast() and torch.is_autocast_enabled(x.device.type)


# -- LoRA linear ---------------------------------------------------------------------------------------

class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T, with a backward that saves only x, x A^T and a bool mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float, fan_in_fan_out: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        weight_t = weight if fan_in_fan_out else weight.t()  # [in, out]
        mask = None
        if dropout_p > 0:
            # The same RNG draw as F.dropout's CPU kernel (bernoulli_(1 - p), then / (1 - p)).
            noise = torch.empty_like(x2).bernoulli_(1 - dropout_p)
            mask = noise.bool()
            x_lora = x2 * noise.div_(1 - dropout_p)
            del noise
        else:
            x_lora = x2
        xa = x_lora @ lora_a.t()  # [tokens, r]
        out = torch.addmm(bias, x2, weight_t) if bias is not None else x2 @ weight_t
        out.addmm_(xa, lora_b.t(), alpha=scaling)
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
        x2 = x.reshape(-1, x.shape[-1])
        noise = mask.to(x.dtype).div_(1 - p) if mask is not None else None
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        gb = g @ lora_b if (need_x or need_a) else None  # [tokens, r]
        if need_x:
            grad_x = g @ weight.t() if ctx.fan_in_fan_out else g @ weight
            if noise is None:
                grad_x.addmm_(gb, lora_a, alpha=s)
            else:
                grad_x.add_((gb @ lora_a).mul_(noise), alpha=s)
            grad_x = grad_x.view(x.shape)
        if need_a:
            x_lora = x2 if noise is None else x2 * noise
            grad_a = (gb.t() @ x_lora).mul_(s)
        if need_b:
            grad_b = (g.t() @ xa).mul_(s)
        if need_w:
            grad_w = x2.t() @ g if ctx.fan_in_fan_out else g.t() @ x2
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout_p: float = 0.0,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """x W^T + b + scaling * dropout(x) A^T B^T. Under autocast everything runs in the autocast dtype.

    Without autograd (inference) it is three kernels: the base matmul, x A^T, and an in-place addmm.
    """
    if autocast_enabled(x):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type)
        x, weight, lora_a, lora_b = x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, fan_in_fan_out)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_a.requires_grad
                                    or lora_b.requires_grad or (bias is not None and bias.requires_grad)):
        return LoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, fan_in_fan_out)
    # No autograd graph: nothing requires grad, so these in-place ops record nothing.
    if fan_in_fan_out:
        out = torch.matmul(x, weight)
        if bias is not None:
            out.add_(bias)
    else:
        out = F.linear(x, weight, bias)
    x_lora = F.dropout(x, dropout_p, training=True) if dropout_p > 0 else x
    if out.numel() == out.shape[-1]:  # one token (decoding): matrix-vector kernels
        out.view(-1).addmv_(lora_b, lora_a.mv(x_lora.reshape(-1)), alpha=scaling)
    else:
        x2 = x_lora.reshape(-1, x_lora.shape[-1])
        out.view(-1, out.shape[-1]).addmm_(x2 @ lora_a.t(), lora_b.t(), alpha=scaling)
    return out


