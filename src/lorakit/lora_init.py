"""How an adapter's A and B start: PEFT's init_lora_weights choices, as free functions on tensors."""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError


def is_from_base_weight(init: bool | str) -> bool:
    """PiSSA and OLoRA build A and B from the base weight and leave the residual in it."""
    return init in ("pissa", "olora") or str(init).startswith("pissa_niter_")


@torch.no_grad()
def init_lora(a: torch.Tensor, b: torch.Tensor, init: bool | str) -> None:
    """In place: True (A kaiming-uniform, B zeros: the update starts at 0), "gaussian" (A ~ N(0, 1/r), B zeros),
    "orthogonal" (B A = 0 with neither zero), False (leave both as they are: random)."""
    if init is False:
        return
    if init == "orthogonal":
        r = a.shape[0]
        if r % 2:
            raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank, got r={r}.")
        # A and B on disjoint rows of one random orthogonal matrix.
        q, _ = torch.linalg.qr(torch.randn(r, r))
        a.copy_((torch.randn(a.shape[1], r // 2) @ q[0::2]).T / 10)
        b.copy_(torch.randn(b.shape[0], r // 2) @ q[1::2] / 10)
        return
    if init == "gaussian":
        nn.init.normal_(a, std=1 / a.shape[0])
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


@torch.no_grad()
def factors_from_weight(weight: torch.Tensor, r: int, scaling: float,
                        init: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual W - s B A) from a base weight [out, in]: PiSSA (the top-r singular vectors; "pissa_niter_N":
    a randomized SVD with N iterations) or OLoRA (a QR decomposition)."""
    weight = weight.float()
    if init == "olora":
        q, rr = torch.linalg.qr(weight)
        a, b = rr[:r], q[:, :r]
    else:
        if init == "pissa":
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(weight, q=r, niter=int(init.removeprefix("pissa_niter_")))
            vh = v.T
        sqrt_s = torch.sqrt(s / scaling)
        a, b = sqrt_s[:, None] * vh, u * sqrt_s[None, :]
    return a, b, weight - scaling * (b @ a)
