"""Base + adapter merged into one GGUF model file that llama.cpp and Ollama load directly, with a Modelfile beside it.

The merge is lorakit's own (models.load_with_adapters + merge_and_unload: the base the adapter was trained on,
NF4-rounded for QLoRA). The file's metadata: when the base itself came from a GGUF file (the embedded SmolLM2),
every key of that file but its name and type is kept (tokenizer, pre-tokenizer, chat template, rope settings),
so llama.cpp tokenizes exactly as it does for the base; otherwise the keys are built from the transformers
config and tokenizer with the `gguf` package's vocabulary readers.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lorakit.errors import ExportError
from lorakit.export.adapter_parts import read_adapter_parts
from lorakit.export.gguf import base_gguf_for, eos_stops
from lorakit.export.gguf_format import (GGUFArchitecture, Modelfile, check_out_file, check_outtype, encode,
                                        file_type, read_architecture, relative_or_absolute, write_gguf)
from lorakit.io_utils import atomic_write
from lorakit.models import load_with_adapters

# Keys of the base's GGUF file that describe the file rather than the model: written anew.
_FILE_KEYS = ("GGUF.", "general.type", "general.file_type", "general.quantization_version", "general.name",
              "general.architecture")


@dataclass
class MergedExport:
    out: Path
    base: str
    architecture: str
    tensors: int
    metadata_from: str  # the base's GGUF file, or "transformers config and tokenizer"
    modelfile: Path
    notes: list[str] = field(default_factory=list)


def merged_tensors(model, arch: GGUFArchitecture) -> dict[str, torch.Tensor]:
    """The merged model's weights under llama.cpp's names, q/k rows in llama.cpp's order; a tied output layer is
    left out, as llama.cpp reuses token_embd for it."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        gguf_name = arch.tensor_name(name)
        if gguf_name is None:
            raise ExportError(f"the merged model's tensor {name} has no name among llama.cpp's {arch.name} tensors; "
                              "convert a `lorakit merge` directory with llama.cpp's convert_hf_to_gguf.py instead")
        out[gguf_name] = arch.rows_to_llama_cpp(gguf_name, tensor.detach().float())
    return out


def _copy_base_metadata(writer, base_gguf: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every model key of the base's GGUF file, after checking that the merged tensors are exactly its tensors."""
    import gguf

    reader = gguf.GGUFReader(str(base_gguf))
    names = {t.name for t in reader.tensors}
    if names != set(tensors):
        extra, missing = sorted(set(tensors) - names), sorted(names - set(tensors))
        raise ExportError(f"the merged model's tensors differ from {base_gguf}'s (only in the merge: {extra[:3]}, only "
                          f"in the file: {missing[:3]}): it is not the base the adapter was trained on. Pass the "
                          "right --base-gguf, or none to build the metadata from the transformers model.")
    for key, value in reader.fields.items():
        if key.startswith(_FILE_KEYS):
            continue
        types = value.types
        writer.add_key_value(key, value.contents(), types[0], sub_type=types[-1] if len(types) > 1 else None)


def _architecture_metadata(writer, config) -> None:
    """The {arch}.* keys llama.cpp reads for the Llama and Qwen families, from the transformers config."""
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ExportError(f"the base uses {rope_type!r} rope scaling, which this export does not write; convert a "
                          "`lorakit merge` directory with llama.cpp's convert_hf_to_gguf.py instead")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    writer.add_rope_freq_base(float(theta or 10000.0))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(config.vocab_size))


def _tokenizer_metadata(writer, tokenizer, vocab_size: int) -> list[str]:
    """tokenizer.ggml.* from a transformers tokenizer (GPT-2-style BPE or Llama's byte-fallback BPE); notes."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        vocab = None
        for kind in (BpeVocab, LlamaHfVocab):
            try:
                vocab = kind(Path(tmp))
                break
            except (FileNotFoundError, TypeError, KeyError):
                continue
        if vocab is None:
            raise ExportError("the base's tokenizer is neither GPT-2-style BPE nor Llama's byte-fallback BPE, the "
                              "two this export writes; convert a `lorakit merge` directory with llama.cpp's "
                              "convert_hf_to_gguf.py instead")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        if len(tokens) > vocab_size:
            raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
        for i in range(len(tokens), vocab_size):  # embeddings past the tokenizer: padding llama.cpp never emits
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        notes = []
        if vocab.tokenizer_model == "gpt2":
            # llama.cpp picks its pre-tokenizer (how text is split before BPE) by name; its converter names it
            # from a hash of known tokenizers, which this export does not keep: the generic split is used.
            writer.add_tokenizer_pre("default")
            notes.append("the base came from no GGUF file, so the tokenizer's pre-tokenizer is llama.cpp's "
                         "'default': text with digits or unusual spacing may split differently than in transformers")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        SpecialVocab(tmp, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer,
                                                                                                      quiet=True)
    return notes


def write_model_gguf(model, tokenizer, out: Path, outtype: str, source: Optional[Path], name: str) -> tuple[str, int, list[str]]:
    """Write a transformers causal LM as the GGUF model file `out`; metadata copied from `source` (the GGUF file
    the model came from) when given, else built from its config and tokenizer. Returns (architecture, tensors,
    notes)."""
    arch = GGUFArchitecture(model.config)
    tensors = merged_tensors(model, arch)
    if source is not None and read_architecture(source) != arch.name:
        raise ExportError(f"--base-gguf {source} is a {read_architecture(source)!r} model, not {arch.name!r}")
    notes: list[str] = []

    def fill(writer) -> None:
        import gguf

        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if source is not None:
            _copy_base_metadata(writer, source, tensors)
        else:
            _architecture_metadata(writer, model.config)
            notes.extend(_tokenizer_metadata(writer, tokenizer, int(model.config.vocab_size)))
        for tensor_name, tensor in tensors.items():
            data, raw = encode(tensor, outtype)
            writer.add_tensor(tensor_name, data, raw_dtype=raw)

    write_gguf(out, arch.name, fill)
    return arch.name, len(tensors), notes


def export_merged_gguf(adapter: str | os.PathLike, out: str | os.PathLike, base: Optional[str] = None,
                       outtype: str = "f16", base_gguf: Optional[str] = None, force: bool = False) -> MergedExport:
    """Merge the adapter into its base and write the result as the GGUF model `out`, with `<out>.Modelfile`."""
    check_outtype(outtype)
    out_path = check_out_file(out, force)
    parts = read_adapter_parts(adapter)
    model, tokenizer, _, base_name = load_with_adapters(base, [str(adapter)])
    merged = model.merge_and_unload()
    source = base_gguf_for(base_name, base_gguf)
    arch, count, notes = write_model_gguf(merged, tokenizer, out_path, outtype, source,
                                          f"{base_name} + {parts.path.resolve().name}")
    if parts.quantization:
        notes.insert(0, f"{parts.path} was trained as QLoRA: merged into the {parts.quantization}-rounded weights of "
                        f"{base_name}, the ones it was trained on")
    modelfile = out_path.with_suffix(".Modelfile")
    text = Modelfile(relative_or_absolute(out_path, out_path.parent), None,
                     eos_stops(tokenizer, merged.generation_config),
                     note=f"Ollama: {base_name} with the adapter {parts.path.name} merged in.\n"
                          f"ollama create NAME -f {modelfile.name}").text()
    with atomic_write(modelfile, "w") as f:
        f.write(text)
    return MergedExport(out_path, base_name, arch, count, str(source) if source else "transformers config and tokenizer",
                        modelfile, notes)
