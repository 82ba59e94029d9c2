"""`lorakit plan`: before training, what will train, how big the adapter is, and whether the run fits in memory.

The model is built on the meta device from its config alone (no weight is read or downloaded) and the adapter
is injected by lorakit's own get_peft_model, so the counts are exactly what print_trainable_parameters prints on
the real model. The memory arithmetic is lorakit.memory_estimate's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lorakit.adapter_folder import MODEL_CONFIG_NAME, adapter_state_dict, human_bytes
from lorakit.errors import ConfigError
from lorakit.fused_loss import FUSED_LOSS_MODELS, RMS_NORMS, SWIGLU_MLPS
from lorakit.layers import LoraLayer
from lorakit.memory_estimate import (Architecture, Estimate, Target, estimate, gib, nf4_bytes,
                                     parse_memory)
from lorakit.model import get_peft_model
from lorakit.models import DEFAULT_BASE
from lorakit.quant import quantized_linear_names
from lorakit.train_config import TrainConfig

__all__ = ["shipped_configs", "load_model_config", "build_meta_model", "make_plan", "Plan", "parse_memory"]

CONFIGS_DIR = Path(__file__).parent / "model_configs"
# Names that mean a shipped config (the embedded model's default name among them).
ALIASES = {DEFAULT_BASE: "smollm2-135m"}


def shipped_configs() -> list[str]:
    """Names of the model configs shipped with lorakit (`--base NAME` works offline for these)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def load_model_config(base: str):
    """A transformers config: a shipped name, a config.json file, a model directory, or a hub id."""
    from transformers import AutoConfig

    name = ALIASES.get(base, base)
    path = Path(base).expanduser()
    if (CONFIGS_DIR / f"{name}.json").is_file():
        source = CONFIGS_DIR / f"{name}.json"
    elif path.is_file():
        source = path
    elif path.is_dir():
        source = path / MODEL_CONFIG_NAME
        if not source.is_file():
            raise ConfigError(f"--base {base}: the directory has no {MODEL_CONFIG_NAME}")
    else:
        try:
            return AutoConfig.from_pretrained(base)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--base {base}: not a shipped config ({', '.join(shipped_configs())}), a config.json "
                              f"file or a model directory, and the hub did not give its config ({e})") from None
    try:
        data = json.loads(source.read_text())
        return AutoConfig.for_model(**data) if "model_type" in data else AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--base {base}: {source} is not a transformers model config ({e})") from None


def build_meta_model(config) -> nn.Module:
    """The causal LM of `config` on the meta device: every shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as e:
            raise ConfigError(f"cannot build a causal LM from this config: {e}") from None


def architecture(model: nn.Module) -> Architecture:
    """The shapes the memory estimate needs, from a decoder-only model's config (Llama's field names)."""
    c = model.config
    c = getattr(c, "text_config", None) or c
    needed = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [name for name in needed if getattr(c, name, None) is None]
    if missing:
        raise ConfigError(f"{type(model).__name__}'s config has no {', '.join(missing)}: lorakit plan estimates "
                          "decoder-only models described with Llama's config fields (Llama, Mistral, Qwen, Gemma, ...)")
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    names = {type(m).__name__ for m in model.modules()}
    fused_loss = type(model).__name__ in FUSED_LOSS_MODELS and getattr(c, "final_logit_softcapping", None) is None
    fused_blocks = fused_loss and bool(names & SWIGLU_MLPS) and bool(names & RMS_NORMS)
    return Architecture(layers=c.num_hidden_layers, hidden=c.hidden_size, intermediate=c.intermediate_size,
                        heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
                        vocab=c.vocab_size, fused_blocks=fused_blocks, fused_loss=fused_loss)


@dataclass
class TargetCount:
    """The LoRA on every module of one name (q_proj, ...): how many modules, their shape, what trains."""

    name: str
    modules: int
    shape: str  # "in -> out", or the distinct shapes
    rank: int
    params: int
    file_bytes: int  # the tensors' bytes in adapter_model.safetensors


@dataclass
class Plan:
    base: str
    model_class: str
    settings: dict[str, Any]
    targets: list[TargetCount]
    trainable: int
    total: int
    trainable_line: str  # print_trainable_parameters' line
    adapter_file_bytes: int
    memory: Estimate  # the run as asked
    other_activations: int  # activations with gradient checkpointing toggled
    full: Estimate  # full fine-tuning, same batch and precision
    full_trainable: int
    limit: Optional[int] = None
    hint: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> Optional[bool]:
        return None if self.limit is None else self.memory.total <= self.limit

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["memory"], out["full"] = self.memory.to_dict(), self.full.to_dict()
        out["fits"] = self.fits
        return out


def _tensor_header(name: str, tensor: torch.Tensor, start: int) -> dict:
    dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[tensor.dtype]
    return {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [start, start + tensor.numel() *
                                                                           tensor.element_size()]}


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> int:
    """The exact byte size of a safetensors file holding `tensors` (meta tensors do): an 8-byte length, the JSON
    header padded to 8 bytes, the data (laid out by name, as safetensors lays out tensors of one alignment)."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].element_size(), n)):
        header[name] = _tensor_header(name, tensors[name], offset)
        offset = header[name]["data_offsets"][1]
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + (text + 7) // 8 * 8 + offset


def _count_targets(peft_model: nn.Module, file_tensors: dict[str, torch.Tensor]) -> list[TargetCount]:
    groups: dict[str, list[tuple[str, LoraLayer]]] = {}
    for name, layer in peft_model.base_model.lora_layers():
        groups.setdefault(name.split(".")[-1], []).append((name, layer))
    rows = []
    for suffix, layers in groups.items():
        shapes = sorted({f"{layer.in_features} -> {layer.out_features}" for _, layer in layers})
        params = sum(p.numel() for _, layer in layers for p in layer.adapter_parameters("default"))
        prefixes = tuple(f"base_model.model.{name}." for name, _ in layers)
        nbytes = sum(t.numel() * t.element_size() for k, t in file_tensors.items() if k.startswith(prefixes))
        rank = max(layer.r["default"] for _, layer in layers)
        rows.append(TargetCount(suffix, len(layers), ", ".join(shapes), rank, params, nbytes))
    return rows


def _frozen_bytes(model: nn.Module, settings: TrainConfig) -> int:
    """Bytes of the frozen base as lorakit's training holds it: bf16 under --bf16, else float32; with NF4, every
    quantized Linear's weight at NF4's storage and the rest in the compute dtype."""
    wbytes = 2 if settings.bf16 else 4
    quantized = set(quantized_linear_names(model)) if settings.quantize else set()
    total = 0
    for name, param in model.named_parameters():
        module, _, kind = name.rpartition(".")
        total += nf4_bytes(param.numel()) if module in quantized and kind == "weight" else param.numel() * wbytes
    return total


def _layer_targets(peft_model: nn.Module) -> list[Target]:
    targets = {}
    for name, layer in peft_model.base_model.lora_layers():
        suffix = name.split(".")[-1]
        targets[suffix] = Target(suffix, layer.in_features, layer.out_features, layer.r["default"],
                                 per_layer=re.search(r"\.\d+\.", name) is not None)
    return list(targets.values())


def _all_linear_targets(model: nn.Module) -> list[Target]:
    targets = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and re.search(r"\.\d+\.", name):
            suffix = name.split(".")[-1]
            targets[suffix] = Target(suffix, module.in_features, module.out_features, 0)
    return list(targets.values())


def _process_rss() -> int:
    """This process's resident memory: on the CPU, the runtime (Python, torch, transformers) a run starts from."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class _Scenario:
    batch_size: int
    max_length: int
    gradient_checkpointing: bool
    quantize: Optional[str]


def make_plan(settings: TrainConfig, memory: Optional[int] = None, device: str = "cuda") -> Plan:
    """The plan of a run with `settings` (base, lora, batch_size, max_length, bf16, quantize,
    gradient_checkpointing, attention) on `device` ("cuda" or "cpu"), against `memory` bytes if given."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {device!r}")
    config = load_model_config(settings.base)
    model = build_meta_model(config)
    # The CPU's runtime: this process with torch, transformers and the model's code loaded (its weights on the
    # meta device take nothing).
    overhead = _process_rss() if device == "cpu" else None
    arch = architecture(model)
    frozen_for = {q: _frozen_bytes(model, dataclasses.replace(settings, quantize=q)) for q in (None, "nf4")}
    full_targets = _all_linear_targets(model)
    peft_model = get_peft_model(model, settings.lora)
    lora_names = {f"base_model.model.{n}" for n, _ in peft_model.base_model.lora_layers()}
    file_tensors = adapter_state_dict(peft_model, "default", settings.lora.bias, lora_names)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        peft_model.print_trainable_parameters()
    trainable, total = peft_model.get_nb_trainable_parameters()
    targets = _layer_targets(peft_model)
    attention = settings.attention or "sdpa"
    dropout = settings.lora.lora_dropout > 0

    def lora_estimate(s: _Scenario) -> Estimate:
        return estimate(arch, targets, frozen_for[s.quantize], trainable, s.batch_size, s.max_length,
                        settings.bf16, attention=attention, checkpointing=s.gradient_checkpointing,
                        dropout=dropout, device=device, overhead=overhead)

    asked = _Scenario(settings.batch_size, settings.max_length, settings.gradient_checkpointing, settings.quantize)
    mem = lora_estimate(asked)
    other = lora_estimate(dataclasses.replace(asked, gradient_checkpointing=not asked.gradient_checkpointing))
    base_params = total - trainable  # the model without the adapter: what full fine-tuning trains
    full = estimate(arch, full_targets, 0, base_params, settings.batch_size, settings.max_length, settings.bf16, full=True,
                    attention=attention, checkpointing=settings.gradient_checkpointing, device=device,
                    overhead=overhead)
    notes = []
    if not arch.fused_loss:
        notes.append(f"{type(model).__name__} is not among the models lorakit's fused loss covers: the loss "
                     "materialises the full logits")
    if device == "cpu" and platform.libc_ver()[0] == "glibc" and not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        notes.append("on the CPU this counts the live tensors; glibc's malloc keeps freed memory in its heap, so the "
                     "process's peak RSS can run up to about 1.5x the activations and loss above. Run with "
                     "MALLOC_MMAP_THRESHOLD_=131072 for RSS to follow this estimate (about 25% slower steps)")
    plan = Plan(base=settings.base, model_class=type(model).__name__,
                settings={"r": settings.lora.r, "lora_alpha": settings.lora.lora_alpha,
                          "targets": settings.target_names, "batch_size": settings.batch_size,
                          "max_length": settings.max_length, "bf16": settings.bf16, "quantize": settings.quantize,
                          "gradient_checkpointing": settings.gradient_checkpointing, "attention": attention,
                          "device": device, "lora_dropout": settings.lora.lora_dropout},
                targets=_count_targets(peft_model, file_tensors), trainable=trainable, total=total,
                trainable_line=out.getvalue().strip(),
                adapter_file_bytes=safetensors_size(file_tensors, {"format": "pt"}), memory=mem,
                other_activations=other.activations, full=full, full_trainable=base_params, limit=memory, notes=notes)
    if memory is not None and not plan.fits:
        plan.hint = _hint(asked, lora_estimate, memory, settings.grad_accum)
    return plan


def _hint(asked: _Scenario, estimate_of, limit: int, grad_accum: int) -> str:
    """The smallest change that makes the run fit: one change if one is enough (checkpointing first, it costs
    only time; then a smaller micro-batch with more accumulation, the same training; then QLoRA; then a shorter
    length), else those changes together."""
    def flags(s: _Scenario) -> str:
        parts = []
        if s.gradient_checkpointing and not asked.gradient_checkpointing:
            parts.append("--gradient-checkpointing")
        if s.batch_size != asked.batch_size:
            accum = grad_accum * asked.batch_size // s.batch_size
            parts.append(f"--batch-size {s.batch_size} --grad-accum {accum}")
        if s.quantize and not asked.quantize:
            parts.append("--quantize nf4")
        if s.max_length != asked.max_length:
            parts.append(f"--max-length {s.max_length}")
        return " ".join(parts)

    def smaller(s: _Scenario, key: str, floor: int) -> Optional[_Scenario]:
        value = getattr(s, key)
        while value > floor:
            value = max(floor, value // 2)
            candidate = dataclasses.replace(s, **{key: value})
            if estimate_of(candidate).total <= limit:
                return candidate
        return None

    single = [dataclasses.replace(asked, gradient_checkpointing=True),
              smaller(asked, "batch_size", 1), dataclasses.replace(asked, quantize="nf4"),
              smaller(asked, "max_length", 128)]
    for s in single:
        if s is not None and s != asked and estimate_of(s).total <= limit:
            return f"add {flags(s)} ({gib(estimate_of(s).total)})"
    combined = dataclasses.replace(asked, gradient_checkpointing=True, quantize="nf4")
    if estimate_of(combined).total > limit:
        combined = smaller(combined, "batch_size", 1) or dataclasses.replace(combined, batch_size=1)
    if estimate_of(combined).total > limit:
        combined = smaller(combined, "max_length", 128)
    if combined is None:
        return "no setting fits: even QLoRA with checkpointing, batch 1 and 128 tokens needs more; use a bigger device"
    return f"add {flags(combined)} ({gib(estimate_of(combined).total)})"


def render(plan: Plan) -> str:
    """The plan as text."""
    s = plan.settings
    lines = [f"lorakit plan: {plan.base} ({plan.model_class}; built on the meta device from its config, no weights "
             f"read)",
             f"LoRA r={s['r']}, alpha={s['lora_alpha']:g} on {','.join(s['targets'])}", ""]
    rows = [("target", "modules", "shape (in -> out)", "trainable params", "adapter file")]
    rows += [(t.name, str(t.modules), t.shape, f"{t.params:,}", human_bytes(t.file_bytes)) for t in plan.targets]
    rows.append(("total", str(sum(t.modules for t in plan.targets)), "", f"{plan.trainable:,}",
                 human_bytes(plan.adapter_file_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines += [plan.trainable_line, ""]
    method = "QLoRA (NF4 base)" if s["quantize"] else "LoRA"
    precision = "bf16 autocast" if s["bf16"] else "float32"
    where = "the CPU" if s["device"] == "cpu" else "a GPU"
    lines.append(f"memory to train: batch {s['batch_size']} x {s['max_length']} tokens, {precision}, "
                 f"{s['attention']} attention, on {where}")
    m, f = plan.memory, plan.full
    ckpt = s["gradient_checkpointing"]
    weights_kind = "NF4 + double quant" if s["quantize"] else ("bf16" if s["bf16"] else "float32")
    table = [("", method, "full fine-tuning"),
             (f"frozen weights ({weights_kind})", gib(m.frozen_weights), gib(f.frozen_weights)),
             ("trainable weights + grads + AdamW", gib(m.trainable_states), gib(f.trainable_states)),
             (f"activations ({'with' if ckpt else 'no'} gradient checkpointing)", gib(m.activations),
              gib(f.activations)),
             (f"  (activations {'without' if ckpt else 'with'} checkpointing", gib(plan.other_activations) + ")", ""),
             ("logits + loss (" + ("lorakit's fused loss" if m.detail["fused_loss"] else "full logits") + ")",
              gib(m.loss), gib(f.loss)),
             ("  (full logits, as PEFT + transformers compute them", gib(m.detail["full_logits_loss"]) + ")", ""),
             ("runtime (" + ("this process: Python, torch" if s["device"] == "cpu" else "CUDA context") + ")",
              gib(m.overhead), gib(f.overhead)),
             ("total", gib(m.total), gib(f.total))]
    w0, w1 = max(len(r[0]) for r in table), max(len(r[1]) for r in table)
    lines += [f"  {r[0].ljust(w0)}  {r[1].rjust(w1)}  {r[2].rjust(16)}".rstrip() for r in table]
    if plan.limit is not None:
        verdict = "fits" if plan.fits else f"does not fit (short by {gib(m.total - plan.limit)})"
        full_verdict = "fits" if f.total <= plan.limit else "does not fit"
        lines.append(f"{method} {verdict} in {gib(plan.limit)}; full fine-tuning {full_verdict}")
    if plan.hint:
        lines.append(f"hint: {plan.hint}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def memory_limit(text: Optional[str]) -> Optional[int]:
    """--memory as bytes (None when not given); a clear error for a malformed size."""
    if text is None:
        return None
    try:
        return parse_memory(text)
    except ValueError as e:
        raise ConfigError(str(e)) from None

