"""An adapter folder checked against what vLLM loads, written with the exact `vllm serve` line that serves it.

What vLLM's LoRA loader accepts (vllm/lora/peft_helper.py and the model's LoRA module list):
    no DoRA, no modules_to_save; no bias unless started with --enable-lora-bias (gone from recent versions);
    every tensor's rank at most --max-lora-rank (default 16; one of MAX_LORA_RANKS);
    LoRA on the model's linear layers it packs and shards (q/k/v/o, gate/up/down for the Llama and Qwen
    families), not on embeddings or lm_head;
    one scale for the whole adapter, lora_alpha / r (or / sqrt(r) with use_rslora): rank_pattern and
    alpha_pattern are not read, so a layer with its own scale has the difference folded into its lora_B here.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lorakit.adapter_folder import CONFIG_NAME, WEIGHTS_NAME, read_config, required_base
from lorakit.errors import ExportError
from lorakit.export.adapter_parts import PEFT_PREFIX, AdapterParts, read_adapter_parts
from lorakit.export.merged import check_out_dir, replace_dir_atomically
from lorakit.io_utils import atomic_save_json, atomic_save_safetensors, atomic_write
from lorakit.models import DEFAULT_BASE, resolve_base

DEFAULT_MAX_LORA_RANK = 16
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
README_NAME = "README.txt"
# The layers vLLM adapts for these transformers model types (it packs q/k/v and gate/up, so each may be adapted).
LORA_LAYERS = {t: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
               for t in ("llama", "mistral", "qwen2", "qwen3")}


@dataclass
class VllmExport:
    out: Path
    base: str
    name: str
    max_lora_rank: int
    command: str
    notes: list[str] = field(default_factory=list)


def needed_max_lora_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    for value in MAX_LORA_RANKS:
        if value >= rank:
            return value
    raise ExportError(f"the adapter has rank {rank}, above vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]}); "
                      "retrain with a smaller r, or merge it (`lorakit merge`) and serve the merged model")


def check_for_vllm(parts: AdapterParts, model_type: Optional[str], max_lora_rank: Optional[int]) -> int:
    """Refuse what vLLM would refuse, saying how to fix it; returns the --max-lora-rank to serve it with."""
    where, merge = parts.path, f"or merge it into its base (`lorakit merge --adapter {parts.path} --out DIR`) and " \
                               "serve the merged model with plain `vllm serve DIR`"
    if parts.dora:
        raise ExportError(f"{where} is a DoRA adapter (use_dora): vLLM does not load DoRA. Retrain with plain LoRA, "
                          + merge)
    if parts.saved or parts.config.modules_to_save:
        saved = sorted(set(parts.saved)) or list(parts.config.modules_to_save or [])
        raise ExportError(f"{where} saves whole trained tensors ({', '.join(saved[:3])}: modules_to_save or trained "
                          "biases); vLLM only loads adapters with modules_to_save unset and no biases. Retrain "
                          "without them, " + merge)
    if parts.config.bias != "none":
        raise ExportError(f"{where} was trained with bias={parts.config.bias!r}; vLLM loads adapter biases only when "
                          "started with --enable-lora-bias, which recent versions removed. Retrain with bias='none', "
                          + merge)
    if parts.embeddings or any(m.rsplit(".", 1)[-1] == "lm_head" for m in parts.pairs):
        layers = parts.embeddings + [m for m in parts.pairs if m.endswith("lm_head")]
        raise ExportError(f"{where} adapts {', '.join(layers)}: vLLM's LoRA on embeddings and lm_head depends on "
                          "version and model (vllm#9280). Retrain with targets on the attention/MLP layers only, "
                          + merge)
    if not parts.pairs:
        raise ExportError(f"{where} holds no LoRA pairs (lora_A/lora_B); there is nothing to serve")
    allowed = LORA_LAYERS.get(model_type or "")
    if allowed is not None:
        odd = sorted({m.rsplit(".", 1)[-1] for m in parts.pairs} - set(allowed))
        if odd:
            raise ExportError(f"{where} adapts {', '.join(odd)}, which vLLM's {model_type} model does not take LoRA "
                              f"on (it takes {', '.join(allowed)}). Retrain with those targets, " + merge)
    rank = max(parts.ranks.values())
    if max_lora_rank is not None:
        if max_lora_rank not in MAX_LORA_RANKS:
            raise ExportError(f"--max-lora-rank {max_lora_rank}: vLLM accepts only "
                              f"{', '.join(map(str, MAX_LORA_RANKS))}")
        if rank > max_lora_rank:
            raise ExportError(f"{where} has rank {rank}, above --max-lora-rank {max_lora_rank}: vLLM would refuse "
                              f"it. Serve with --max-lora-rank {needed_max_lora_rank(rank)} (more GPU memory per "
                              "adapter slot), or retrain with a smaller r.")
        return max_lora_rank
    return max(DEFAULT_MAX_LORA_RANK, needed_max_lora_rank(rank))


def vllm_tensors(parts: AdapterParts) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The adapter's tensors as vLLM reads them (PEFT's names) with one scale for all layers; the folded modules."""
    config = parts.config
    global_scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    tensors, folded = {}, []
    for module, (a, b) in parts.pairs.items():
        ratio = parts.scale(module) / global_scale
        if abs(ratio - 1) > 1e-9:
            b = b * ratio
            folded.append(module)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return tensors, folded


def serve_command(base: str, name: str, out: Path, max_lora_rank: int) -> str:
    return f"vllm serve {base} --enable-lora --lora-modules {name}={out.resolve()} --max-lora-rank {max_lora_rank}"


def export_vllm(adapter: str | os.PathLike, out: str | os.PathLike, base: Optional[str] = None,
                name: Optional[str] = None, max_lora_rank: Optional[int] = None, force: bool = False) -> VllmExport:
    """Check the adapter against vLLM and write it to the folder `out` with README.txt (the serve line)."""
    from transformers import AutoConfig

    out_dir = Path(out)
    check_out_dir(adapter, out, force, holds=README_NAME, kind="vLLM adapter folder", command="export")
    parts = read_adapter_parts(adapter)
    base = required_base(base, [parts.path], DEFAULT_BASE)
    # vLLM loads a transformers directory or hub id: the embedded model is its converted directory
    vllm_base = resolve_base(base)
    model_type = getattr(AutoConfig.from_pretrained(vllm_base), "model_type", None)
    rank = check_for_vllm(parts, model_type, max_lora_rank)
    tensors, folded = vllm_tensors(parts)
    name = name or out_dir.resolve().name
    if not name or any(c in name for c in " =/"):
        raise ExportError(f"--name {name!r}: the adapter's name in vLLM must be non-empty without spaces, '=' or '/'")
    config = read_config(parts.path)
    config["base_model_name_or_path"] = vllm_base
    notes = []
    if folded:  # vLLM reads neither pattern: their effect now lives in lora_B
        config.pop("alpha_pattern", None)
        notes.append(f"{len(folded)} layer(s) have their own scale (rank_pattern / alpha_pattern / rsLoRA); vLLM uses "
                     "one scale per adapter, so their lora_B carries the difference: load this folder in vLLM only, "
                     f"and the original {parts.path} everywhere else")
    if parts.quantization:
        notes.append(f"{parts.path} was trained as QLoRA on the {parts.quantization}-rounded weights of {base}; vLLM "
                     "applies it to the base it serves (full precision): answers are close to lorakit's, not "
                     "identical. For the exact model, `lorakit merge` it and serve the merged directory.")
    if base == DEFAULT_BASE:
        notes.append(f"the base is lorakit's embedded SmolLM2 (the transformers conversion of its GGUF file) at "
                     f"{vllm_base}")
    command = serve_command(vllm_base, name, out_dir, rank)

    def write(tmp: Path) -> None:
        atomic_save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_save_json(config, tmp / CONFIG_NAME)
        lines = [f"vLLM adapter {name}, exported by lorakit from {parts.path.resolve()}", "", "Serve it with:",
                 f"  {command}", "", "Then ask for it by name (OpenAI API, model field):",
                 f"  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' "
                 f"-d '{json.dumps({'model': name, 'messages': [{'role': 'user', 'content': 'Hello'}]})}'"]
        lines += [""] + [f"Note: {note}" for note in notes] if notes else []
        with atomic_write(tmp / README_NAME, "w") as f:
            f.write("\n".join(lines) + "\n")

    replace_dir_atomically(out_dir, write)
    return VllmExport(out_dir, vllm_base, name, rank, command, notes)
