"""The fused training forward of a causal LM: output head + cross-entropy in chunks, RMSNorm and SwiGLU nodes.

- `causal_lm_loss_forward`: when a recognised causal LM is called with `labels` while training, the
  decoder runs, then `fused_linear_cross_entropy` runs the output head over the labelled tokens in
  chunks, computing the loss and its gradient chunk by chunk, so the [tokens x vocab] logits never
  exist in full and no logit is computed for a token whose label is -100. A frozen head is swept in
  vocabulary slices with an online softmax, so every matmul spans all rows (small row chunks made
  the matmuls slow); a trainable head goes row chunk by row chunk, which also yields grad_W. The loss equals
  transformers' ForCausalLMLoss (shifted labels, ignore_index, mean or sum / num_items_in_batch).
  The returned output computes `logits` from the final hidden states only if they are read.
- During that forward, SiLU-gated MLPs compute silu(gate) * up as one autograd node that keeps two
  tensors instead of three, and RMSNorms are one node whose backward makes four passes over the input
  instead of about ten (`fused_blocks`). Set `peft_model.fused_loss = False` to always take the
  ordinary path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import autocast_enabled
from .layers import ModulesToSaveWrapper
from .row_adapters import current_row_adapters

IGNORE_INDEX = -100
# Logits held at once by the fused loss, in elements (4M floats = 16 MiB: a row chunk's buffer or a
# vocabulary slice stays below glibc's mmap threshold, so freed memory is reused, not page-faulted anew).
CHUNK_ELEMENTS = 1 << 22
# On a GPU each vocabulary slice costs several kernel launches, and for a small model launches, not arithmetic,
# bound the step: 64M elements (384 MiB of bf16 logits with their float32 copy) take the vocabulary in a few
# slices and stay far below the full logits (benchmarks/README.md has the GPU runs behind this).
GPU_CHUNK_ELEMENTS = 1 << 26
# Rows per block of the frozen-head loss: its [rows x hidden] accumulators stay small.
ROW_BLOCK = 4096


# -- SwiGLU MLP: silu(gate) * up saving two tensors instead of three ----------------------------------

class SiluMulFunction(torch.autograd.Function):
    """silu(gate) * up. Saves gate and up only; silu(gate) is recomputed in the backward (autograd's
    composition also keeps silu(gate), one more [tokens x intermediate] tensor per layer)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMulFunction.apply(gate, up)
    return F.silu(gate) * up


# -- RMSNorm: one autograd node saving x and the per-row rstd ---------------------------------------

class RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x)), computed as transformers' Llama-family RMSNorm computes it (the statistics in
    float32, the normalised x cast back to x's dtype before the weight). Autograd's composition runs about
    ten passes over x in its backward; this one runs four, and saves x and a [rows x 1] rstd, as it does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = _row_dot(x32, x32).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()
        normed = (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        if weight.dtype == normed.dtype:
            return normed.mul_(weight)
        return weight * normed

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            normed = (x32 * rstd).to(x.dtype)
            grad_w = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # With y = x * rstd * w and d = grad * w: dx = rstd * d - x * rstd^3 * mean(d * x).
            d = (grad * weight).float()
            coef = _row_dot(d, x32).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
            grad_x = d.mul_(rstd).addcmul_(x32, coef, value=-1).to(x.dtype)
        return grad_x, grad_w, None


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float32 dot products along the last dimension; autocast would run vecdot in bf16."""
    return (a * b).sum(-1) if autocast_enabled(a) else torch.linalg.vecdot(a, b)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm forward, as one autograd node when a gradient is needed."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# -- the decoder's own blocks during the fused-loss forward ------------------------------------------

# Set to False to leave MLPs / norms alone in the fused-loss forward (benchmarks/train_step.py's ablations).
FUSE_SWIGLU = True
FUSE_RMSNORM = True
# transformers MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)).
SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "SmolLM3MLP", "OlmoMLP", "Olmo2MLP",
                         "GemmaMLP"})
# transformers norms whose forward is exactly LlamaRMSNorm's (Olmo2's casts after the weight, Gemma's adds
# 1 to it: not these).
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm",
                       "Phi3RMSNorm"})


def _swiglu_forward(mlp: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    gate_proj, up_proj, down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    return lambda x: down_proj(silu_mul(gate_proj(x), up_proj(x)))


def _rms_norm_forward(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: rms_norm(x, norm.weight, norm.variance_epsilon)


def _patchable(module: nn.Module, classes: frozenset) -> bool:
    """One of `classes`, and no forward of its own on the instance (then someone else has wrapped it)."""
    return type(module).__name__ in classes and "forward" not in module.__dict__


@contextlib.contextmanager
def fused_blocks(decoder: nn.Module):
    """Within the block, the decoder's SiLU-gated MLPs use `silu_mul` and its RMSNorms `rms_norm`.

    Same math, fewer passes and fewer saved tensors. Only for the forward it wraps; the modules are
    unchanged afterwards. Skipped under gradient checkpointing, whose recomputation (after this block)
    must save exactly what the first forward saved.
    """
    patched = []
    if not getattr(decoder, "gradient_checkpointing", False):
        for module in decoder.modules():
            if FUSE_SWIGLU and _patchable(module, SWIGLU_MLPS) \
                    and type(getattr(module, "act_fn", None)).__name__ in ("SiLUActivation", "SiLU"):
                module.forward = _swiglu_forward(module)
                patched.append(module)
            elif FUSE_RMSNORM and _patchable(module, RMS_NORMS) and isinstance(module.weight, torch.Tensor):
                module.forward = _rms_norm_forward(module)
                patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


# -- fused output head + cross-entropy -------------------------------------------------------------

class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum over rows of CE(h W^T + b, target), chunk by chunk; the gradient is formed in the forward.

    The loss is a scalar, so d loss / d logits = softmax - onehot is known as soon as a chunk's
    logits are; forming grad_h (and grad_W) right away means no logit is kept or recomputed.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, chunk_elements: int) -> torch.Tensor:
        need_h, need_w, need_bias = ctx.needs_input_grad[:3]
        if need_w or need_bias:
            total, grads = _ce_row_chunks(hidden, weight, bias, targets, chunk_elements, need_h, need_w, need_bias)
        else:
            total, grad_h = _ce_vocab_chunks(hidden, weight, bias, targets, chunk_elements, need_h)
            grads = (grad_h, None, None)
        ctx.save_for_backward(*grads)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w, grad_bias = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, grad_bias, None, None


def _ce_vocab_chunks(hidden, weight, bias, targets, chunk_elements: int, need_h: bool):
    """Loss and grad_h (head frozen), one pass over vocabulary slices with an online softmax.

    Every matmul spans all rows (efficient shapes, unlike small row chunks). With m the running max, e_v =
    exp(logit_v - m), s = sum_v e_v and t the target:
        loss = m + log s - logit_t
        grad_h = sum_v p_v W_v - W_t = (sum_{v != t} e_v W_v - (s - e_t) W_t) / s
    The sum over v != t accumulates slice by slice (rescaled by exp(m_old - m_new) as m grows). The target's own
    term stays out of the matmul: for a confident row (p_t near 1) sum_v p_v W_v is nearly W_t, and with the
    probabilities rounded to bf16 for the matmul, subtracting W_t afterwards left mostly rounding error
    (tests/test_fused_loss.py holds the gradient as close to float32's as transformers' loss is).
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    dtype = _matmul_dtype(hidden, weight)
    for r0 in range(0, n, ROW_BLOCK):
        h = hidden[r0:r0 + ROW_BLOCK]
        t = targets[r0:r0 + ROW_BLOCK]
        rows = h.shape[0]
        step = max(256, chunk_elements // rows)
        m = torch.full((rows,), float("-inf"), dtype=torch.float32, device=h.device)
        others = torch.zeros(rows, dtype=torch.float32, device=h.device)  # s - e_t
        e_target = torch.zeros(rows, dtype=torch.float32, device=h.device)
        logit_target = torch.zeros(rows, dtype=torch.float32, device=h.device)
        acc = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        # One buffer for every slice's logits: a fresh allocation of this size page-faults on each slice.
        # Autocast skips ops given out=, so the matmul's inputs are cast here, as autocast would cast them.
        buffer = torch.empty(rows * min(step, vocab), dtype=dtype, device=h.device)
        h_mm = h.to(dtype)
        for v0 in range(0, vocab, step):
            w = weight[v0:v0 + step]
            logits = buffer[:rows * w.shape[0]].view(rows, w.shape[0])
            if bias is not None:
                torch.addmm(bias[v0:v0 + step].to(dtype), h_mm, w.to(dtype).t(), out=logits)
            else:
                torch.mm(h_mm, w.to(dtype).t(), out=logits)
            z = logits.float()  # the loss is taken in float32, as transformers does
            # Rows whose target is in this slice, without a device sync: every row reads one column (its target's,
            # clamped into the slice), and only those rows keep what they read.
            local = t - v0
            here = (local >= 0) & (local < w.shape[0])
            col = local.clamp(0, w.shape[0] - 1)[:, None]
            # The target's logit as the softmax sees it (recomputed apart, a confident row's loss came out negative)
            logit_target = torch.where(here, z.gather(1, col).squeeze(1), logit_target)
            m_new = torch.maximum(m, z.amax(1))
            rescale = (m - m_new).exp_()
            z.sub_(m_new[:, None]).exp_()
            picked = z.gather(1, col).squeeze(1)
            e_target = torch.where(here, picked, e_target * rescale)
            z.scatter_(1, col, torch.where(here, 0.0, picked)[:, None])  # the target's term leaves the sums
            others.mul_(rescale).add_(z.sum(1))
            if need_h:
                acc.mul_(rescale[:, None]).add_(z.to(w.dtype) @ w)
            m = m_new
        sumexp = others + e_target
        total += (m + sumexp.log() - logit_target).sum()
        if need_h:
            w_target = weight.index_select(0, t).float()
            grad_h[r0:r0 + rows] = acc.sub_(others[:, None] * w_target).div_(sumexp[:, None])
    return total, grad_h


def _matmul_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype `h @ weight.T` comes out in here (autocast's dtype, when it is on)."""
    if autocast_enabled(h):
        return torch.get_autocast_dtype(h.device.type)
    return torch.promote_types(h.dtype, weight.dtype)


def _ce_row_chunks(hidden, weight, bias, targets, chunk_elements: int, need_h: bool, need_w: bool,
                   need_bias: bool):
    """Loss and grads for a trainable head: rows in chunks, each chunk's softmax complete at once."""
    n, vocab = hidden.shape[0], weight.shape[0]
    chunk_rows = max(1, chunk_elements // vocab)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    buffer = hidden.new_empty(min(chunk_rows, n), vocab)
    for start in range(0, n, chunk_rows):
        h = hidden[start:start + chunk_rows]
        t = targets[start:start + chunk_rows]
        logits = buffer[:h.shape[0]]
        if bias is not None:
            torch.addmm(bias, h, weight.t(), out=logits)
        else:
            torch.mm(h, weight.t(), out=logits)
        z = logits.float()
        target_logit = z.gather(1, t[:, None]).squeeze(1)
        zmax = z.amax(1, keepdim=True)
        z.sub_(zmax).exp_()
        sumexp = z.sum(1)
        total += (zmax.squeeze(1) + sumexp.log() - target_logit).sum()
        z.div_(sumexp[:, None])  # softmax
        z[torch.arange(h.shape[0], device=z.device), t] -= 1
        dlogits = z.to(hidden.dtype)
        if need_h:
            torch.mm(dlogits, weight, out=grad_h[start:start + chunk_rows])
        if need_w:
            grad_w.addmm_(dlogits.t().float(), h.float())
        if need_bias:
            grad_bias += z.sum(0)
    return total, (grad_h, grad_w, grad_bias)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                               num_items_in_batch: Any = None, chunk_elements: Optional[int] = None) -> torch.Tensor:
    """cross_entropy(hidden @ weight.T + bias, targets), never holding more than `chunk_elements` logits.

    `hidden` is [..., H] and `targets` [...] (already aligned: no shifting here). Rows whose target is
    `ignore_index` are skipped entirely. Reduction: mean over the other rows, or their sum divided by
    `num_items_in_batch` when it is given (transformers' convention for gradient accumulation).
    `chunk_elements` defaults to CHUNK_ELEMENTS on the CPU and GPU_CHUNK_ELEMENTS elsewhere.
    """
    if chunk_elements is None:
        chunk_elements = CHUNK_ELEMENTS if hidden.device.type == "cpu" else GPU_CHUNK_ELEMENTS
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: {hidden.shape[0]} hidden rows but {targets.shape[0]} "
                         "targets; labels must have the same batch and sequence shape as the input.")
    keep = (targets != ignore_index).nonzero().squeeze(1)
    if keep.shape[0] != targets.shape[0]:
        hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    if hidden.shape[0] == 0:  # nothing to predict: transformers' mean gives nan, a sum gives 0
        total = (hidden.sum() * weight.sum()).float() * 0
    else:
        total = LinearCrossEntropyFunction.apply(hidden, weight, bias, targets, chunk_elements)
    if num_items_in_batch is None:
        return total / keep.shape[0]
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


# -- causal LM forward with the fused loss ---------------------------------------------------------

# transformers classes whose forward is exactly: decoder -> lm_head -> ForCausalLMLoss (checked by tests
# for Llama; the others have the same forward body in transformers 5).
FUSED_LOSS_MODELS = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "SmolLM3ForCausalLM",
    "Phi3ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM", "GemmaForCausalLM", "Starcoder2ForCausalLM",
})
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Inputs the fused path understands; anything else (return_dict, logits_to_keep, ...) takes the ordinary path.
DECODER_KWARGS = frozenset({"input_ids", "attention_mask", "position_ids", "inputs_embeds", "use_cache",
                            "cache", "output_attentions", "output_hidden_states", "cache_position"})


def _lazy_output_class():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclass
    class FusedCausalLMOutput(CausalLMOutputWithPast):
        """CausalLMOutputWithPast from the fused loss; `logits` are computed on first access."""

        def __getattribute__(self, name: str):
            if name == "logits":
                object.__getattribute__(self, "_materialize")()
            return super().__getattribute__(name)

        def __getitem__(self, key):
            if key == "logits":
                self._materialize()
            return super().__getitem__(key)

        def _materialize(self) -> None:
            compute = self.__dict__.pop("_compute_logits", None)
            if compute is not None:
                self.logits = compute()

    return FusedCausalLMOutput


_OUTPUT_CLASS = None


def _head(model: nn.Module) -> Optional[nn.Linear]:
    """The output head as a plain nn.Linear with no hooks, or None (then the ordinary path runs)."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, ModulesToSaveWrapper):
        if current_row_adapters() is not None or head._forward_hooks or head._forward_pre_hooks:
            return None
        head = head.active_module()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None
    return head


def fused_loss_applies(model: nn.Module, kwargs: dict) -> bool:
    """True when `model(**kwargs)` may take the fused-loss path: a recognised causal LM, training, labels given."""
    if kwargs.get("labels") is None or not torch.is_grad_enabled() or not model.training:
        return False
    if type(model).__name__ not in FUSED_LOSS_MODELS or model._forward_hooks or model._forward_pre_hooks:
        return False
    if getattr(model, "_hf_hook", None) is not None or hasattr(model, "_loss_function"):
        return False  # accelerate dispatch hooks, or a custom loss function set by the user
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None:
        return False
    return all(k in DECODER_KWARGS or k in LOSS_KWARGS or k == "labels" for k in kwargs)


def takes_fused_loss(peft_model: nn.Module, kwargs: dict) -> bool:
    """Whether `peft_model(**kwargs)` (a lorakit PeftModel) will compute its loss on the fused path."""
    inner = peft_model.get_base_model()
    return (peft_model.__dict__.get("fused_loss", True) and fused_loss_applies(inner, kwargs)
            and _head(inner) is not None and isinstance(getattr(inner, "model", None), nn.Module))


def causal_lm_loss_forward(model: nn.Module, kwargs: dict) -> Optional[Any]:
    """Run `model(**kwargs)` with the fused loss; None if this model or call is not one it handles."""
    global _OUTPUT_CLASS
    if not fused_loss_applies(model, kwargs):
        return None
    head = _head(model)
    decoder = getattr(model, "model", None)
    if head is None or not isinstance(decoder, nn.Module):
        return None
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    loss_kwargs = {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs}
    with fused_blocks(decoder):
        outputs = decoder(**kwargs)
    hidden = outputs.last_hidden_state
    ignore_index = loss_kwargs.get("ignore_index", IGNORE_INDEX)
    targets = loss_kwargs.get("shift_labels")
    if targets is None:  # position i predicts token i + 1; the last position predicts nothing
        labels = labels.to(hidden.device)
        targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    loss = fused_linear_cross_entropy(hidden, head.weight, head.bias, targets, ignore_index,
                                      loss_kwargs.get("num_items_in_batch"))
    if _OUTPUT_CLASS is None:
        _OUTPUT_CLASS = _lazy_output_class()
    fields = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
    result = _OUTPUT_CLASS(loss=loss, **fields)
    result.__dict__["_compute_logits"] = _logits_function(head, hidden)
    return result


def _logits_function(head: nn.Linear, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: head(hidden)
