"""A LoRA adapter as llama.cpp's GGUF adapter file (`llama-cli -m base.gguf --lora adapter.gguf`, Ollama's ADAPTER).

What llama.cpp reads (src/llama-adapter.cpp, llama-graph.cpp):
    general.type = "adapter", adapter.type = "lora", general.architecture = the base's (it must match),
    adapter.lora.alpha (float32): each layer's update is scaled by alpha / r, r read from the layer's lora_b;
    tensors <base tensor name>.lora_a and .lora_b, e.g. blk.0.attn_q.weight.lora_a. In torch's row-major order
    lora_a is PEFT's A (r, in) and lora_b PEFT's B (out, r); GGUF lists dimensions the other way round, so the
    file shows lora_a as [in, r] and lora_b as [r, out], what llama.cpp checks against the base tensor [in, out].
The Llama family's q/k weights are stored with their rows reordered for llama.cpp's rotary embedding; B carries
the output rows, so B gets the same reordering (A is unchanged). One alpha serves the whole file, so a layer whose
scale differs from alpha / r (rsLoRA, alpha_pattern) has the difference folded into its B.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lorakit.adapter_folder import required_base
from lorakit.errors import ExportError
from lorakit.export.adapter_parts import AdapterParts, read_adapter_parts
from lorakit.io_utils import atomic_write
from lorakit.export.gguf_format import (GGUFArchitecture, Modelfile, check_out_file, check_outtype, encode,
                                        file_type, read_architecture, relative_or_absolute, tensor_shapes, write_gguf)
from lorakit.models import DEFAULT_BASE, load_base_model, smollm2_gguf_path

QUANTIZATION_KEY = "lorakit.base_quantization"  # "nf4" in a QLoRA adapter's file: the base it was trained on


@dataclass
class GGUFAdapter:
    """The adapter in llama.cpp's terms: one alpha and, per base tensor, lora_a (r, in) and lora_b (out, r)."""
    architecture: str
    alpha: float
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # blk.0.attn_q.weight -> (A, B in llama.cpp's row order)
    folded: list[str] = field(default_factory=list)  # modules whose scale was folded into B


@dataclass
class GGUFExport:
    """What `export_adapter_gguf` wrote, and what to tell the user."""
    out: Path
    base: str
    base_gguf: Optional[Path]
    architecture: str
    alpha: float
    tensors: int
    ranks: tuple[int, ...]
    modelfile: Optional[Path]
    notes: list[str] = field(default_factory=list)


def check_for_llama_cpp(parts: AdapterParts, fix: str) -> None:
    """Refuse what llama.cpp's adapter files cannot hold, saying why and what to do instead (`fix`)."""
    where = parts.path
    if parts.dora:
        raise ExportError(f"{where} is a DoRA adapter (use_dora): llama.cpp's adapter files hold only LoRA's two "
                          "matrices, not DoRA's magnitude vectors, so llama.cpp would run a different model. " + fix)
    if parts.embeddings:
        raise ExportError(f"{where} adapts the embedding {', '.join(parts.embeddings)}: this export writes adapters "
                          "on linear layers only. " + fix)
    if parts.saved:
        raise ExportError(f"{where} saves whole trained tensors ({', '.join(sorted(set(parts.saved))[:3])}: "
                          "modules_to_save or trained biases), which a llama.cpp adapter file cannot carry. " + fix)
    if not parts.pairs:
        raise ExportError(f"{where} holds no LoRA pairs (lora_A/lora_B); there is nothing to export")


def to_llama_cpp(parts: AdapterParts, arch: GGUFArchitecture, weight_shapes: dict[str, tuple[int, ...]]) -> GGUFAdapter:
    """The adapter's pairs under llama.cpp's names and row order, checked against the base's weight shapes
    (`weight_shapes`: transformers name of each weight -> (out, in))."""
    config = parts.config
    # llama.cpp scales every layer by alpha / (that layer's rank): the alpha that gives the default layers their
    # scale exactly; layers with another scale (alpha_pattern, or rsLoRA's alpha / sqrt(r) with rank_pattern)
    # carry the ratio in their B.
    alpha = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r) * config.r
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    folded = []
    for module, (a, b) in parts.pairs.items():
        weight = f"{module}.weight"
        name = arch.tensor_name(weight)
        if name is None:
            raise ExportError(f"{parts.path}: {module} has no counterpart among llama.cpp's {arch.name} tensors, so "
                              "llama.cpp could not apply it. Export it merged (--format merged-gguf) instead.")
        expected = weight_shapes.get(weight)
        if expected is None or expected != (b.shape[0], a.shape[1]):
            found = f"has shape {expected}" if expected else "does not exist"
            raise ExportError(f"{parts.path}: {module} updates a ({b.shape[0]}, {a.shape[1]}) weight but the base's "
                              f"{weight} {found}: the adapter belongs to another base model. Pass the base it was "
                              "trained on with --base.")
        ratio = parts.scale(module) / (alpha / a.shape[0])
        if abs(ratio - 1) > 1e-9:
            b = b * ratio
            folded.append(module)
        tensors[name] = (a, arch.rows_to_llama_cpp(name, b))
    return GGUFAdapter(arch.name, float(alpha), tensors, folded)


def adapter_to_weight(adapter: GGUFAdapter, name: str) -> torch.Tensor:
    """The change llama.cpp applies to base tensor `name`: lora_b · lora_a · alpha / r (rows in llama.cpp's order)."""
    a, b = adapter.tensors[name]
    return (b.double() @ a.double() * (adapter.alpha / a.shape[0])).float()


def base_gguf_for(base: str, given: Optional[str]) -> Optional[Path]:
    """The base model's GGUF file: --base-gguf when given, the embedded model's own file for the default base."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise ExportError(f"--base-gguf {given} does not exist; pass the base model's .gguf file")
        return path
    return smollm2_gguf_path() if base == DEFAULT_BASE else None


def _check_base_gguf(adapter: GGUFAdapter, path: Path) -> None:
    """The adapter must fit the GGUF file llama.cpp will load it onto: same architecture, every tensor there."""
    arch = read_architecture(path)
    if arch != adapter.architecture:
        raise ExportError(f"--base-gguf {path} is a {arch!r} model but the adapter's base is {adapter.architecture!r}; "
                          "llama.cpp refuses an adapter whose architecture differs. Pass the base's own GGUF file.")
    shapes = tensor_shapes(path)
    for name, (a, b) in adapter.tensors.items():
        if shapes.get(name) != (b.shape[0], a.shape[1]):
            found = f"has shape {shapes[name]}" if name in shapes else "is missing"
            raise ExportError(f"{name} {found} in {path}, but the adapter updates a ({b.shape[0]}, {a.shape[1]}) "
                              "weight: that GGUF file is not the base the adapter was trained on.")


def eos_stops(tokenizer, generation_config) -> tuple[str, ...]:
    """The texts of the tokens that end a reply (Ollama's `PARAMETER stop`), e.g. <|im_end|>."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    stops = [tokenizer.convert_ids_to_tokens(i) for i in ids if 0 <= i < len(tokenizer)]
    return tuple(dict.fromkeys(s for s in stops if s))


def qlora_note(parts: AdapterParts, base: str) -> list[str]:
    if not parts.quantization:
        return []
    return [f"{parts.path} was trained as QLoRA, on the {parts.quantization}-rounded weights of {base}. llama.cpp "
            "applies it to the base GGUF it is given (for the embedded model, the Q4_1 file it was converted from), "
            "not to those rounded weights: its answers are close to lorakit's, not identical. For the exact model it "
            "was trained on, use --format merged-gguf (merged into the NF4-rounded base)."]


def export_adapter_gguf(adapter: str | os.PathLike, out: str | os.PathLike, base: Optional[str] = None,
                        outtype: str = "f16", base_gguf: Optional[str] = None, force: bool = False) -> GGUFExport:
    """Write the adapter in `adapter` as llama.cpp's GGUF adapter file `out`, and beside it an Ollama Modelfile
    (FROM the base GGUF, ADAPTER this file) when the base's GGUF file is known."""
    check_outtype(outtype)
    out_path = check_out_file(out, force)
    parts = read_adapter_parts(adapter)
    check_for_llama_cpp(parts, f"Export it merged instead: lorakit export {adapter} --format merged-gguf --out "
                               "model.gguf")
    base = required_base(base, [parts.path], DEFAULT_BASE)
    # the architecture alone (no weights read): names, head counts and the shapes the pairs must fit
    model, tokenizer = load_base_model(base, device="meta")
    arch = GGUFArchitecture(model.config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    converted = to_llama_cpp(parts, arch, shapes)
    gguf_base = base_gguf_for(base, base_gguf)
    if gguf_base is not None:
        _check_base_gguf(converted, gguf_base)

    def fill(writer) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, converted.alpha)
        writer.add_name(parts.path.resolve().name)
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base)
        writer.add_file_type(file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if parts.quantization:
            writer.add_string(QUANTIZATION_KEY, parts.quantization)
        for name, (a, b) in converted.tensors.items():
            for suffix, tensor in ((".lora_a", a), (".lora_b", b)):
                data, raw = encode(tensor, outtype)
                writer.add_tensor(name + suffix, data, raw_dtype=raw)

    write_gguf(out_path, arch.name, fill)
    notes = qlora_note(parts, base)
    if converted.folded:
        notes.append(f"{len(converted.folded)} layer(s) scale their update other than alpha / r (rsLoRA or "
                     "alpha_pattern); the file keeps one alpha and carries the difference in those layers' lora_b")
    modelfile = None
    if gguf_base is not None:
        modelfile = out_path.with_suffix(".Modelfile")
        text = Modelfile(str(gguf_base.resolve()), relative_or_absolute(out_path, out_path.parent),
                         eos_stops(tokenizer, model.generation_config),
                         note=f"Ollama: the base {base} with the LoRA adapter {parts.path.name}.\n"
                              f"ollama create NAME -f {modelfile.name}").text()
        with atomic_write(modelfile, "w") as f:
            f.write(text)
    else:
        notes.append(f"no GGUF file is known for the base {base}: convert it with llama.cpp's convert_hf_to_gguf.py "
                     "and load the adapter onto that file (pass it as --base-gguf to check the fit and get an "
                     "Ollama Modelfile)")
    return GGUFExport(out_path, base, gguf_base, arch.name, converted.alpha, len(converted.tensors),
                      tuple(sorted(set(parts.ranks.values()))), modelfile, notes)
