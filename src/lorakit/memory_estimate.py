"""What a training step holds in memory, from the model's shape alone: the arithmetic behind `lorakit plan`.

Every term names the tensors it counts; they are the ones lorakit's training forward keeps for the backward
(checked against torch's saved-tensor hooks on small models in tests/test_plan.py, and against the peak memory
of real runs in benchmarks/plan_memory.py):

- frozen weights at their dtype, or NF4 with double quantization (lorakit.quant's storage, byte for byte);
- trainable weights, their gradients and AdamW's two moments, all float32 (lorakit keeps adapters in float32);
- per decoder layer, for a batch of E = batch x length tokens: the residual stream entering each of the two
  norms (and their float32 1/rms), the gate and up projections kept by the fused SwiGLU node, the input of
  every trained linear (shared inputs once: q, k and v read the same normed stream), each adapter's x A^T, the
  dropout mask when there is dropout, and attention's own: query, key, value, output and log-sum-exp for SDPA;
  query, key and value repeated to every head plus the float32 probabilities (and their bf16 copy) for eager;
- with gradient checkpointing, only each layer's input, plus one layer recomputed during the backward;
- the backward's working memory for one layer (the gradients of the MLP's wide tensors);
- the loss: lorakit's fused loss holds one chunk of logits at a time and the hidden states' gradient; the
  ordinary path (PEFT, or a model lorakit's fused loss does not cover) holds the [tokens x vocab] logits,
  their float32 log-softmax and its gradient.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

from lorakit.fused_loss import CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, ROW_BLOCK
from lorakit.quant import ABSMAX_BLOCK_SIZE, BLOCK_SIZE

GIB = 1 << 30
MIB = 1 << 20
# CUDA's context, cuBLAS workspace and the caching allocator's slack on the card: not in the tensors, but taken
# from the card's memory. A typical figure for torch 2.x on one GPU (nvidia-smi minus max_memory_allocated).
CUDA_OVERHEAD_BYTES = 512 * MIB
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, float32

# Which tensor a projection reads, by module name: the projections that read the same tensor keep it once.
PROJECTION_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                     "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_act"}


@dataclass(frozen=True)
class Architecture:
    """The shape of a decoder-only transformer, as its config.json gives it."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    fused_blocks: bool = True  # SwiGLU MLP and RMSNorm that lorakit's fused nodes cover (Llama family)
    fused_loss: bool = True  # lorakit's chunked loss applies to this model class


@dataclass(frozen=True)
class Target:
    """One trained linear per layer (by its last name component), or a whole trained matrix elsewhere."""

    name: str
    in_features: int
    out_features: int
    rank: int  # 0: trained whole (full fine-tuning)
    per_layer: bool = True


def nf4_bytes(n: int) -> int:
    """Bytes of an NF4 weight of n values: 4-bit codes, an int8 absmax per 64, an fp32 scale per 256 absmax."""
    blocks = math.ceil(n / BLOCK_SIZE)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / ABSMAX_BLOCK_SIZE) + 4


@dataclass
class Estimate:
    """Bytes by part; `total` is their sum."""

    frozen_weights: int
    trainable_states: int  # weights + gradients + AdamW moments
    activations: int
    loss: int
    overhead: int
    detail: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.frozen_weights + self.trainable_states + self.activations + self.loss + self.overhead

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "detail"}, "total": self.total, "detail": self.detail}


def layer_activation_bytes(arch: Architecture, targets: list[Target], batch: int, length: int, act_bytes: int,
                           stream_bytes: int, attention: str, dropout: bool, fused: bool = True) -> dict[str, int]:
    """Bytes one decoder layer keeps for the backward, by part; `fused`: lorakit's SwiGLU and RMSNorm nodes."""
    fused = fused and arch.fused_blocks
    e = batch * length
    h, i = arch.hidden, arch.intermediate
    q_width, kv_width = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    # Both norms' inputs and their float32 1/rms; transformers' own RMSNorm also keeps its float32 upcast and the
    # normalised tensor (lorakit's fused node does not, but it is off under gradient checkpointing).
    norm = e * h * stream_bytes + e * 4 if fused else e * h * (stream_bytes + 4 + 4) + e * 4
    parts = {"residual": 2 * norm, "mlp": (2 if fused else 3) * e * i * act_bytes}
    if attention == "eager":
        probs = batch * arch.heads * length * length
        parts["attention"] = 3 * e * q_width * act_bytes + probs * (4 + (act_bytes if act_bytes < 4 else 0))
    else:  # SDPA / flash: q, k, v, the output and the log-sum-exp
        parts["attention"] = e * (2 * q_width + 2 * kv_width) * act_bytes + batch * arch.heads * length * 4
    widths = {"attn_in": h, "attn_out": q_width, "mlp_in": h, "mlp_act": i}
    inputs: dict[str, int] = {}
    adapters = 0
    for target in (t for t in targets if t.per_layer):
        kind = PROJECTION_INPUTS.get(target.name, target.name)
        width = widths.get(kind, target.in_features)
        if kind == "attn_out" and attention != "eager":
            width = 0  # SDPA keeps its output anyway (counted above), and o_proj reads that very tensor
        inputs[kind] = e * width * act_bytes
        # x A^T is kept in the adapter's dtype, float32 (LoRA weights train in float32, under autocast too)
        adapters += e * target.rank * 4 + (e * target.in_features if dropout and target.rank else 0)
    parts["trained_inputs"] = sum(inputs.values())
    parts["adapters"] = adapters
    return parts


def activation_bytes(arch: Architecture, targets: list[Target], batch: int, length: int, act_bytes: int,
                     stream_bytes: int, attention: str = "sdpa", checkpointing: bool = False,
                     dropout: bool = False) -> dict[str, int]:
    """The activations of a step: kept for the backward, plus one layer's backward working memory."""
    e = batch * length
    # lorakit's fused MLP and norm nodes are off under gradient checkpointing (see fused_loss.fused_blocks)
    layer = sum(layer_activation_bytes(arch, targets, batch, length, act_bytes, stream_bytes, attention,
                                       dropout, fused=not checkpointing).values())
    if checkpointing:  # each layer's input, and one layer's activations while it is recomputed
        kept = arch.layers * e * arch.hidden * stream_bytes + layer
    else:
        kept = arch.layers * layer
    working = 3 * e * arch.intermediate * act_bytes + 2 * e * arch.hidden * stream_bytes
    return {"per_layer": layer, "kept": kept, "backward_working": working, "total": kept + working}


def loss_bytes(arch: Architecture, batch: int, length: int, act_bytes: int, fused: bool, device: str) -> int:
    """Memory of the output head and loss: lorakit's chunked loss (`fused`) or the full logits."""
    e = batch * length
    if not fused:  # logits, their float32 copy's log-softmax, and its gradient
        return e * arch.vocab * (act_bytes + 4 + 4)
    chunk = CHUNK_ELEMENTS if device == "cpu" else GPU_CHUNK_ELEMENTS
    rows = min(ROW_BLOCK, e)
    step = min(arch.vocab, max(256, chunk // rows))
    upcast = 4 + act_bytes if act_bytes < 4 else 0  # the float32 copy, and its cast back for the matmul
    per_slice = rows * step * (act_bytes + upcast)
    accumulators = rows * arch.hidden * (4 + 4 + act_bytes)  # acc, the target rows of W, the hidden's cast
    return per_slice + accumulators + e * arch.hidden * act_bytes  # + the hidden states' gradient


def estimate(arch: Architecture, targets: list[Target], frozen_bytes: int, trainable_params: int, batch: int,
             length: int, bf16: bool, full: bool = False, attention: str = "sdpa", checkpointing: bool = False,
             dropout: bool = False, device: str = "cuda", overhead: Optional[int] = None) -> Estimate:
    """The memory of one training step. `frozen_bytes`: the frozen weights as stored (see `frozen_weight_bytes`);
    `overhead`: the runtime's own memory (default: CUDA_OVERHEAD_BYTES on a GPU, nothing on the CPU)."""
    act_bytes = 2 if bf16 else 4
    # The residual stream is in the weights' dtype: bf16 for a frozen bf16 base, float32 for full fine-tuning
    # (its weights stay float32 under autocast).
    stream_bytes = 4 if full or not bf16 else 2
    acts = activation_bytes(arch, targets, batch, length, act_bytes, stream_bytes, attention, checkpointing, dropout)
    fused = arch.fused_loss
    loss = loss_bytes(arch, batch, length, act_bytes, fused, device)
    states = trainable_params * (4 + 4 + ADAMW_STATE_BYTES)
    if overhead is None:
        overhead = CUDA_OVERHEAD_BYTES if device != "cpu" else 0
    detail = {"activations": acts, "fused_loss": fused, "act_bytes": act_bytes, "stream_bytes": stream_bytes,
              "full_logits_loss": loss_bytes(arch, batch, length, act_bytes, False, device)}
    return Estimate(frozen_bytes, states, acts["total"], loss, overhead, detail)


def parse_memory(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MB', '1.5T' -> bytes; G, GB and GiB all mean 2^30 (cards sold as '24 GB' hold
    24 GiB)."""
    units = {"": 1, "B": 1, "K": 1 << 10, "M": MIB, "G": GIB, "T": 1 << 40}
    s = text.strip().upper().replace(" ", "")
    for suffix in ("IB", "B"):
        if s.endswith(suffix) and s[:-len(suffix)][-1:] in "KMGT" and len(s) > len(suffix):
            s = s[:-len(suffix)]
            break
    unit = s[-1] if s and s[-1] in "KMGT" else ""
    number = s[:-1] if unit else s.rstrip("B")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"memory {text!r}: expected a size such as 24GB, 80GiB or 16000MB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory {text!r}: expected a positive size such as 24GB")
    return int(value * units[unit])


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
