"""One decode step of a Llama-family model (Llama, Mistral, Qwen2, SmolLM) in a few operations per layer.

Decoding one token multiplies one activation row by every weight once. The model's own forward, through
transformers' modules and a LoRA layer per projection, spends most of a small model's step in per-operation
overhead (hundreds of operations per layer), not in those multiplications. This step computes the same thing
with the same weights, reading the model's modules directly:

    per layer, n rows (one new token each, at its own position, with its own adapter):
    h = rms_norm(x)                                                   x: [n, d]
    qkv = h [Wq; Wk; Wv]^T + lora_qkv(h)                              one matmul over the three projections
    q, k = rope(q, k);  k, v -> the row's KV-cache slot               q: [n, heads, hd], k, v: [n, kv_heads, hd]
    x = x + attention(q, cache) Wo^T + lora_o(.)
    h = rms_norm(x);  gu = h [Wg; Wu]^T + lora_gu(h)                  one matmul over gate and up
    x = x + (silu(g) * u) Wd^T + lora_d(.)

The LoRA update is lorakit.kernels' stacked form (`stack_lora`, `add_stacked_lora`): per group of projections
that read the same input, three matmuls whatever adapters the rows use (or none), each adapter's weights read
once per step. A step reads the weights of the adapters in its stack, so the stack follows the batch
(`stacked_adapters`): a batch of one adapter uses that adapter's own; a batch of several the stack of every
resident adapter while they are at most twice as many as the batch uses (built once, it serves every such
batch), else a stack of the batch's adapters, or a kept stack holding them and at most as many others. With
many adapters resident a step would otherwise read all of their weights for the few its rows use; stacking a
new set costs half a step to a step (benchmarks/README.md), paid when the batch's adapters change. Stacks of one
adapter are kept until the adapters change (memory: the adapters' once more); of several, the TABLE_SETS used last.

The fused base weights share storage with the model's: after fusing, each projection's weight is a view of
its rows of the fused tensor (int4 packs rows in blocks of 64, so an int4 projection fuses only when its
output size is a multiple of 64). Batches this step does not cover (a DoRA adapter, an adapted embedding or
head, merged adapters, another architecture) run through the model's ordinary forward: `supports(names)`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.kernels import LoraWeights, StackedLora, add_stacked_lora, stack_lora
from lorakit.fused_loss import RMS_NORMS, SWIGLU_MLPS, rms_norm
from lorakit.weight_only import fuse_rows

ARCHITECTURES = ("llama", "mistral", "qwen2")
ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")
PROJECTIONS = ATTENTION + ("o_proj",) + MLP_IN + ("down_proj",)
TABLE_SETS = 4  # stacks of several adapters kept at once (the least recently used is dropped)


def _base(module: nn.Module) -> nn.Module:
    """The frozen layer under a LoRA layer (the module itself when it carries none)."""
    return getattr(module, "base_layer", module)


class _Projections:
    """Projections that read the same input (q, k, v / gate, up / one alone): the base matmul, fused where the
    weights allow, plus each adapter's update from stacked tables (see the module docstring)."""

    def __init__(self, owner: nn.Module, names: Sequence[str]):
        self.owner, self.names = owner, tuple(names)  # the modules are looked up again for new adapters
        self.bases = [_base(m) for m in self.modules]
        self.sizes = [b.out_features for b in self.bases]
        self.fused = self.bases[0] if len(self.bases) == 1 else fuse_rows(self.bases)

    @property
    def modules(self) -> list[nn.Module]:
        return [getattr(self.owner, n) for n in self.names]

    def base(self, h: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(h)
        return torch.cat([b(h) for b in self.bases], dim=-1)

    def tables(self, names: Sequence[str]) -> Optional[StackedLora]:
        """Adapters `names` on these projections, stacked (None when none of them adapts any)."""
        return stack_lora([[_lora_weights(m, n) for n in names] for m in self.modules], self.sizes)

    def __call__(self, h: torch.Tensor, stacked: Optional[StackedLora], row_adapter: Optional[torch.Tensor],
                 masks: dict) -> torch.Tensor:
        y = self.base(h)
        return y if stacked is None else add_stacked_lora(y, h, stacked, row_adapter, masks)


def _lora_weights(module: nn.Module, name: str) -> Optional[LoraWeights]:
    """Plain adapter `name` on `module` as the kernels take it, or None where it does not adapt the module."""
    if name not in getattr(module, "r", {}):
        return None
    return LoraWeights(module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])


class DecodeStep:
    """The decode step of one served model; `step(...)` returns the next-token logits of every row."""

    def __init__(self, hf_model: nn.Module):
        self.hf = hf_model
        self.inner = hf_model.model
        self.heads = hf_model.config.num_attention_heads
        self.head_dim = hd = self.inner.layers[0].self_attn.head_dim
        # rope's rotate_half(x) = [-x2, x1] as a matrix: x @ R (one small matmul instead of slices, a negation, a cat)
        eye = torch.eye(hd // 2)
        rotate = torch.zeros(hd, hd)
        rotate[hd // 2:, : hd // 2], rotate[: hd // 2, hd // 2:] = -eye, eye
        self._rotate_half = rotate.to(next(hf_model.parameters()).device)
        self._layers = [(_Projections(l.self_attn, ATTENTION), _Projections(l.self_attn, ("o_proj",)),
                         _Projections(l.mlp, MLP_IN), _Projections(l.mlp, ("down_proj",)), l)
                        for l in self.inner.layers]
        self._plain = None  # adapters this step runs (see _plain_adapters)
        self._tables: dict = {}

    @staticmethod
    def architecture_supported(hf_model: nn.Module) -> bool:
        config = getattr(hf_model, "config", None)
        inner = getattr(hf_model, "model", None)
        if getattr(config, "model_type", None) not in ARCHITECTURES or not hasattr(inner, "rotary_emb"):
            return False
        layer = inner.layers[0]
        # norms and MLPs whose forward is exactly LlamaRMSNorm's and down(silu(gate(x)) * up(x)) (see fused_loss)
        return getattr(config, "hidden_act", None) == "silu" and type(layer.mlp).__name__ in SWIGLU_MLPS and \
            type(layer.input_layernorm).__name__ in RMS_NORMS and not hasattr(layer.self_attn, "q_norm") and \
            all(hasattr(layer.self_attn, n) for n in ATTENTION + ("o_proj",))

    def adapters_changed(self) -> None:
        """Forget the stacked tables and which adapters run here: adapters were loaded, unloaded or merged."""
        self._tables.clear()
        self._plain = None

    def supports(self, names: Sequence[Optional[str]]) -> bool:
        """Whether a batch with these row adapters runs here (else through the model's forward)."""
        if self._plain is None:
            self._plain = self._plain_adapters()
        return self._plain is not False and all(n is None or n in self._plain for n in names)

    def _plain_adapters(self):
        """Adapters that only put plain LoRA on the seven projections, or False while an adapter is merged (the
        forward's rules for merged weights apply then)."""
        modules = dict(self.hf.named_modules())
        adapted: dict[str, set] = {}  # adapter -> where it adapts something
        merged = False
        for name, module in modules.items():
            for adapter in getattr(module, "r", {}):
                adapted.setdefault(adapter, set()).add(name.rsplit(".", 1)[-1])
                if module.use_dora.get(adapter):
                    adapted[adapter].add("dora")
            merged |= bool(getattr(module, "merged_adapters", None))
            for adapter in getattr(getattr(module, "modules_to_save", None) or {}, "keys", lambda: [])():
                adapted.setdefault(adapter, set()).add("modules_to_save")
        return False if merged else {a for a, where in adapted.items() if where <= set(PROJECTIONS)}

    def stacked_adapters(self, names: Sequence[Optional[str]]) -> tuple:
        """The adapters whose weights a step for rows with these adapters reads (see the module docstring)."""
        if not self.supports(names):
            raise ValueError(f"this decode step does not run adapters {sorted(set(names) - {None})} (DoRA, an adapted "
                             "embedding or head, or merged adapters): use the model's forward (see supports()).")
        present = tuple(sorted({n for n in names if n is not None}))
        if len(present) <= 1:
            return present
        resident = tuple(sorted(self._plain))
        if len(resident) <= 2 * len(present):
            return resident
        kept = [s for s in self._tables if len(s) <= 2 * len(present) and set(present) <= set(s)]
        return min(kept, key=len) if kept else present

    @property
    def kept_stacks(self) -> list[tuple]:
        """The adapter sets whose stacked tables are kept, least recently used first."""
        return list(self._tables)

    def _tables_for(self, names: tuple) -> list:
        if names in self._tables:
            self._tables[names] = self._tables.pop(names)  # now the most recently used
        else:
            tables, layouts = [], {}
            for layer in self._layers:
                groups = [p.tables(names) for p in layer[:4]]
                # one owners tensor per column layout, so a step builds each row mask once (add_stacked_lora)
                groups = [g if g is None else g._replace(owners=layouts.setdefault(tuple(g.owners.tolist()), g.owners))
                          for g in groups]
                tables.append(tuple(groups))
            self._tables[names] = tables
            several = [key for key in self._tables if len(key) > 1]
            if len(several) > TABLE_SETS:
                del self._tables[several[0]]
        return self._tables[names]

    def step(self, ids: torch.Tensor, positions: torch.Tensor, names: Sequence[Optional[str]], cache) -> torch.Tensor:
        """Logits [n, vocab] of the next token for rows feeding ids[i] at positions[i] with adapter names[i]; the
        rows' K/V go to `cache` (a SlotCache after begin_step(positions))."""
        table_names = self.stacked_adapters(names)
        row_adapter = None
        if len(table_names) > 1 or (table_names and None in names):
            index = {n: i for i, n in enumerate(table_names)}
            row_adapter = torch.tensor([index.get(n, -1) for n in names], device=ids.device)
        tables = self._tables_for(table_names) if table_names else [(None,) * 4] * len(self._layers)
        x = _base(self.inner.embed_tokens)(ids)  # [n, d]
        cos, sin = self.inner.rotary_emb(x, positions[:, None])  # [n, 1, hd]
        n, kv_len = ids.shape[0], int(positions.max()) + 1
        visible = torch.arange(kv_len, device=ids.device)[None, :] <= positions[:, None]
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=ids.device).masked_fill_(~visible, float("-inf"))
        mask = mask[:, None, None, :]  # [n, 1, 1, kv_len]: 0 where a row may look, -inf past its position
        masks: dict = {}
        heads, hd = self.heads, self.head_dim
        rotate_half = self._rotate_half.to(cos.dtype)
        for index, (qkv, o, gate_up, down, layer) in enumerate(self._layers):
            t_qkv, t_o, t_gu, t_down = tables[index]
            attn = layer.self_attn
            h = _norm(layer.input_layernorm, x)
            y = qkv(h, t_qkv, row_adapter, masks).view(n, -1, hd)  # [n, heads + 2 kv_heads, hd]
            kv_heads = (y.shape[1] - heads) // 2
            qk = y[:, : heads + kv_heads]
            qk = torch.addcmul(qk * cos, qk @ rotate_half, sin)
            q = qk[:, :heads, None]  # [n, heads, 1, hd]
            k, v = qk[:, heads:, None], y[:, heads + kv_heads:, None]  # [n, kv_heads, 1, hd]
            keys, values = cache.update(k, v, index)  # [n, kv_heads, kv_len, hd]
            x = x + o(_attend(q, keys, values, mask, attn.scaling).reshape(n, heads * hd), t_o, row_adapter, masks)
            h = _norm(layer.post_attention_layernorm, x)
            g = gate_up(h, t_gu, row_adapter, masks)
            half = g.shape[1] // 2
            x = x + down(F.silu(g[:, :half]) * g[:, half:], t_down, row_adapter, masks)
        return _base(self.hf.lm_head)(_norm(self.inner.norm, x))


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float):
    """softmax(q k^T * scale + mask) v for one query per row, the query heads grouped over the K/V heads:
    q [n, heads, 1, hd], keys/values [n, kv_heads, L, hd], mask [n, 1, 1, L] -> [n, heads, hd] (in some layout).
    One row: PyTorch's fused kernel. Several: two batched matmuls, which that kernel is slower than for one
    query over many rows (benchmarks/README.md)."""
    n, heads, _, hd = q.shape
    kv_heads = keys.shape[1]
    if n == 1:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=heads != kv_heads)
    grouped = q.view(n, kv_heads, heads // kv_heads, hd)  # query heads kv_heads*j .. share K/V head j
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale).add_(mask)  # [n, kv_heads, group, L]
    return torch.matmul(torch.softmax(scores, dim=-1), values)  # [n, kv_heads, group, hd]


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama-family RMSNorm module's forward (fused_loss.rms_norm: transformers' arithmetic)."""
    return rms_norm(x, norm.weight, norm.variance_epsilon)
