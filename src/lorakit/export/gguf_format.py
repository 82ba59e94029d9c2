"""What llama.cpp's GGUF files need, shared by the adapter export (export/gguf.py) and the merged model
(export/merged_gguf.py): the architectures llama.cpp names, its tensor names, the row order of its q/k weights,
tensor encodings (--outtype), atomic GGUF writes, and Ollama Modelfiles.

Written with the `gguf` package (llama.cpp's own Python library), which owns the names: tensor names come from
gguf.get_tensor_name_map, metadata keys from gguf.Keys.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from lorakit.errors import ExportError
from lorakit.io_utils import current_umask, nearest_existing

# transformers model_type -> (llama.cpp architecture, whether llama.cpp stores q/k rows in its own rope order).
# llama.cpp's converter files Mistral under "llama"; the Llama family's q and k rows are reordered so that each
# head's rotary pairs sit side by side (llama.cpp rotates adjacent pairs; transformers rotates the two halves).
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
OUTTYPES = ("f16", "f32", "q8_0")


class GGUFArchitecture:
    """The llama.cpp side of one base model's architecture: names of its tensors and the order of q/k rows."""

    def __init__(self, config) -> None:
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise ExportError(
                f"the base model's architecture {model_type!r} is not one this export maps to llama.cpp's names "
                f"(supported: {', '.join(sorted(ARCHITECTURES))}). Merge the adapter with `lorakit merge` and convert "
                "the merged directory with llama.cpp's convert_hf_to_gguf.py, or export for vLLM (--format vllm).")
        import gguf

        self.model_type = model_type
        self.name, self.permutes_qk = ARCHITECTURES[model_type]
        self.config = config
        self.n_layers = int(config.num_hidden_layers)
        self.n_head = int(config.num_attention_heads)
        self.n_head_kv = int(getattr(config, "num_key_value_heads", None) or self.n_head)
        arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[self.name]
        self._names = gguf.get_tensor_name_map(arch, self.n_layers)

    def tensor_name(self, hf_name: str) -> Optional[str]:
        """llama.cpp's name for the transformers parameter `hf_name` (model.layers.0.self_attn.q_proj.weight ->
        blk.0.attn_q.weight), or None when llama.cpp has no such tensor."""
        return self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def rows_to_llama_cpp(self, gguf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (the output dimension first: a weight, or a LoRA B) in llama.cpp's order for tensor `gguf_name`.

        Within each head transformers keeps the first halves of the rotary pairs, then the second halves;
        llama.cpp interleaves them (pair i is rows 2i and 2i+1)."""
        if not self.permutes_qk:
            return rows
        if ".attn_q." in gguf_name:
            heads = self.n_head
        elif ".attn_k." in gguf_name:
            heads = self.n_head_kv
        else:
            return rows
        out = rows.shape[0]
        half = out // heads // 2
        return rows.reshape(heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)

    def rows_from_llama_cpp(self, gguf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """The inverse of rows_to_llama_cpp (for reading llama.cpp's tensors back, as the tests do)."""
        if not self.permutes_qk or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            return rows
        heads = self.n_head if ".attn_q." in gguf_name else self.n_head_kv
        half = rows.shape[0] // heads // 2
        return rows.reshape(heads, half, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


# -- tensor encodings ----------------------------------------------------------------------------------------

def check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    return outtype


def encode(tensor: torch.Tensor, outtype: str):
    """(numpy data, gguf type or None) for GGUFWriter.add_tensor: vectors stay float32, as llama.cpp keeps norms;
    q8_0 needs rows that are a multiple of its 32-value blocks, so narrower matrices (a LoRA B of rank 16) are f16."""
    import gguf

    data = tensor.detach().to(torch.float32).contiguous().numpy()
    if tensor.dim() < 2 or outtype == "f32":
        return data, None
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def file_type(outtype: str) -> int:
    """general.file_type: the type of most of the file's tensors, as llama.cpp records it."""
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


# -- files ------------------------------------------------------------------------------------------------

def check_out_file(out: str | os.PathLike, force: bool, suffix: str = ".gguf") -> Path:
    """Fail before any slow work when `out` cannot be written or would silently replace something."""
    path = Path(out)
    if path.suffix != suffix:
        raise ExportError(f"--out {out}: the file name must end in {suffix}, as llama.cpp and Ollama expect")
    if path.is_dir():
        raise ExportError(f"--out {out} is a directory; give the path of the {suffix} file to write")
    if path.exists() and not force:
        raise ExportError(f"{out} exists; pass --force to replace it")
    existing = nearest_existing(path.parent)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: {existing} is not writable by this user. Choose another --out.")
    return path


def write_gguf(out: Path, arch: str, fill: Callable) -> None:
    """Write a GGUF file: fill(writer) adds its metadata and tensors; the file appears whole or not at all."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Each tensor of a GGUF file and its shape in torch's order (rows first)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def read_architecture(path: str | os.PathLike) -> str:
    import gguf

    field = gguf.GGUFReader(str(path)).get_field(gguf.Keys.General.ARCHITECTURE)
    return field.contents() if field is not None else ""


@dataclass
class Modelfile:
    """An Ollama Modelfile: FROM a model file, optionally an ADAPTER, and the stop words of the chat format."""
    model: str
    adapter: Optional[str] = None
    stops: tuple[str, ...] = ()
    note: str = ""

    def text(self) -> str:
        lines = [f"# {line}" for line in self.note.splitlines()] + [f"FROM {self.model}"]
        if self.adapter:
            lines.append(f"ADAPTER {self.adapter}")
        lines += [f'PARAMETER stop "{stop}"' for stop in self.stops]
        return "\n".join(lines) + "\n"


def relative_or_absolute(target: Path, directory: Path) -> str:
    """How a Modelfile in `directory` names `target`: ./name beside it, else the absolute path."""
    target = target.resolve()
    return f"./{target.name}" if target.parent == directory.resolve() else str(target)
