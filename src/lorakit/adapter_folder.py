"""The adapter folder: what a saved adapter's directory holds, and every rule for reading and writing it.

    adapter_config.json          the LoraConfig as JSON, in PEFT's field names
    adapter_model.safetensors    the tensors, in PEFT's key names (q_proj.lora_A.weight: no adapter name)
    <name>/                      further adapters saved together (PEFT's layout for non-"default" names)
    lorakit_train.json           how `lorakit train` made it: its settings and result
    metrics.jsonl, loss_curve.png, checkpoints/step-N/    the rest of a training run
    eval.json, report.html       the demo's scores; the run on one page (lorakit.report)

A directory with config.json and no adapter_config.json is a full model (`lorakit train --full`, `lorakit
merge`), to be used as a base. In memory a tensor carries its adapter's name (`q_proj.lora_A.default.weight`),
on disk it does not, so one file loads under any name.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .errors import AdapterFileNotFoundError, AdapterLoadError, ConfigError, LoraKitError
from .io_utils import atomic_save_json, atomic_save_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT's older pickle format; read with torch's safe loader only
MODEL_CONFIG_NAME = "config.json"  # a full transformers model
TRAIN_RECORD_NAME = "lorakit_train.json"
METRICS_NAME = "metrics.jsonl"
LOSS_PLOT_NAME = "loss_curve.png"
CHECKPOINTS_NAME = "checkpoints"
EVAL_NAME = "eval.json"
BEST_NAME = "best"  # keep_best: the lowest-eval-loss adapter so far, during training (it moves to the top at the end)
LAST_NAME = "last"  # keep_best: the last step's adapter, when an earlier one had the lower eval loss
REPORT_NAME = "report.html"  # `lorakit report`: the run on one page
# Everything `lorakit train` (and the demo's eval) writes into a run folder.
RUN_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAIN_RECORD_NAME, METRICS_NAME, LOSS_PLOT_NAME, CHECKPOINTS_NAME, EVAL_NAME,
             BEST_NAME, LAST_NAME, REPORT_NAME)


# -- what a directory is -------------------------------------------------------------------------------

def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def is_full_model_dir(path: str | os.PathLike) -> bool:
    return not is_adapter_dir(path) and (Path(path) / MODEL_CONFIG_NAME).is_file()


def check_adapter_dir(path: str | os.PathLike, flag: str = "--adapter") -> Path:
    """`path` as an adapter directory, or an error that says what it is instead and what to pass."""
    p = Path(path)
    if not p.is_dir():
        what = "is a file" if p.exists() else "does not exist"
        raise AdapterLoadError(f"{flag} {path} {what}; pass the directory that holds {CONFIG_NAME} (the --out "
                               "of `lorakit train`, or a folder PEFT's save_pretrained wrote)")
    if is_full_model_dir(p):
        raise AdapterLoadError(f"{flag} {path} is a full model directory ({MODEL_CONFIG_NAME}, no {CONFIG_NAME}), "
                               f"as `lorakit train --full` and `lorakit merge` write; pass it as --base {path} instead")
    if not is_adapter_dir(p):
        raise AdapterLoadError(f"{flag} {path} has no {CONFIG_NAME}; pass the directory `lorakit train` (--out) "
                               "or PEFT's save_pretrained wrote")
    return p


def parse_adapter_specs(specs: Sequence[str], flag: str = "--adapter") -> list[tuple[str, str]]:
    """(name, path) for each `[NAME=]PATH`: an unnamed adapter takes its folder's name; names must differ."""
    adapters: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.rpartition("=")
        if not sep:
            path = spec
            name = Path(spec.rstrip("/")).name or "default"
        if not name or not path:
            raise LoraKitError(f"{flag} {spec!r}: expected PATH or NAME=PATH, e.g. {flag} support=runs/support")
        same = [other for other_name, other in adapters if other_name == name]
        if same:
            raise LoraKitError(f"two adapters are named {name!r} ({same[0]} and {path}); name them with "
                               f"{flag} NAME=PATH, e.g. {flag} {name}2={path}")
        adapters.append((name, path))
    return adapters


def checked_adapter_specs(specs: Sequence[str], flag: str = "--adapter") -> list[tuple[str, str]]:
    """parse_adapter_specs, then every folder checked by check_adapter_dir: what the commands do with their
    `--adapter [NAME=]DIR` options before any slow model load."""
    adapters = parse_adapter_specs(specs, flag)
    for _, path in adapters:
        check_adapter_dir(path, flag)
    return adapters


# -- reading and writing the two PEFT files ------------------------------------------------------------

def read_json(file: Path, error: type[LoraKitError] = AdapterLoadError) -> dict[str, Any]:
    """A JSON object from `file`, or an `error` naming the file and what is wrong with it."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{file} is not valid JSON ({exc}); the file is damaged: re-save or re-copy it") from None
    if not isinstance(data, dict):
        raise error(f"{file} must hold a JSON object, not {type(data).__name__}; re-save or re-copy it")
    return data


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw adapter_config.json of an adapter directory (or of that file itself)."""
    file = Path(path) / CONFIG_NAME if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise AdapterFileNotFoundError(f"No {CONFIG_NAME} at {file}: pass the directory written by save_pretrained.")
    return read_json(file, ConfigError)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter's tensors, with errors that say what is wrong with the directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFileNotFoundError(f"Adapter directory {directory} does not exist (expected {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} written by save_pretrained).")
    file = directory / WEIGHTS_NAME
    if file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise AdapterLoadError(f"{file} is corrupt or truncated and cannot be read ({exc}). "
                                   "Re-save or re-download the adapter.") from None
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        advice = (f"lorakit loads only tensors from a pickle; convert the adapter to {WEIGHTS_NAME} with PEFT "
                  "(save_pretrained with safe_serialization=True)")
        try:  # weights_only: tensors and plain containers; a pickle that asks for anything else is refused
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad or unsafe pickle
            raise AdapterLoadError(f"{legacy} cannot be read safely ({_pickle_problem(exc)}). {advice}.") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in tensors.items()):
            raise AdapterLoadError(f"{legacy} holds a {type(tensors).__name__}, not a dict of named tensors as PEFT "
                                   f"writes. {advice}.")
        return tensors
    raise AdapterLoadError(f"No adapter weights in {directory}: expected {WEIGHTS_NAME} "
                           f"(or PEFT's older {LEGACY_WEIGHTS_NAME}). Found: "
                           f"{', '.join(sorted(p.name for p in directory.iterdir())) or 'nothing'}.")


def _pickle_problem(exc: Exception) -> str:
    """What torch's safe loader refused, without its advice to load the file unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith(("Trying to load", "Unsupported"))),
                lines[0] if lines else type(exc).__name__)


def write_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """adapter_model.safetensors and adapter_config.json, each written atomically (weights first)."""
    directory = Path(directory)
    atomic_save_safetensors(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_save_json(config, directory / CONFIG_NAME)


# -- tensor names: in memory (with the adapter's name) and on disk (without) ------------------------------

def file_key(key: str, adapter: str) -> Optional[str]:
    """The on-disk name of state-dict entry `key` if it belongs to `adapter`, else None."""
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if parts[i + 1] != adapter:
            continue
        if part in ("lora_A", "lora_B"):
            return ".".join(parts[: i + 1] + parts[i + 2:])
        if part in ("lora_embedding_A", "lora_embedding_B") and i + 2 == len(parts):
            return ".".join(parts[: i + 1])
        if part == "lora_magnitude_vector":
            return ".".join(parts[: i + 1])
        if part == "modules_to_save":
            return ".".join(parts[:i] + parts[i + 2:])
    return None


def bias_keys(state: dict[str, torch.Tensor], mode: str, lora_layer_names: set[str]) -> list[str]:
    """Bias entries that an adapter trained with bias=`mode` owns (PEFT saves them with the adapter)."""
    if mode == "none":
        return []
    keys = []
    for key in state:
        if not key.endswith(".bias") or any(p in key for p in (".lora_", ".modules_to_save.", ".original_module.")):
            continue
        owner = key[: -len(".bias")]
        if mode == "all" or (owner.endswith(".base_layer") and owner[: -len(".base_layer")] in lora_layer_names):
            keys.append(key)
    return keys


def adapter_state_dict(module: nn.Module, adapter: str, bias: str, lora_layer_names: set[str],
                       state: Optional[dict] = None) -> dict:
    """The tensors of one adapter under their on-disk names (from `state`, by default module.state_dict())."""
    state = module.state_dict() if state is None else state
    out = {}
    for key, value in state.items():
        name = file_key(key, adapter)
        if name is not None:
            out[name] = value
    for key in bias_keys(state, bias, lora_layer_names):
        out[key] = state[key]
    return out


def load_adapter_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], adapter: str, source: str,
                         base_hint: str = "") -> None:
    """Copy on-disk tensors into `adapter`'s parameters, checking every name and shape first."""
    state = module.state_dict(keep_vars=True)
    expected = {}
    for key, value in state.items():
        name = file_key(key, adapter)
        if name is not None:
            expected[name] = value
    plan = []
    for name, tensor in tensors.items():
        target = expected.pop(name, None)
        if target is None:
            target = state.get(name)
        if target is None and name.endswith((".weight", ".bias")):  # a base tensor of a wrapped layer
            stem, _, leaf = name.rpartition(".")
            target = state.get(f"{stem}.base_layer.{leaf}")
        if target is None:
            raise AdapterLoadError(f"Adapter {source} has tensor {name!r}, which matches nothing in this model. "
                                   f"The adapter was made for another architecture{base_hint}.")
        if tuple(target.shape) != tuple(tensor.shape):
            rank = _rank_disagreement(name, tuple(tensor.shape), tuple(target.shape))
            if rank is not None:
                raise AdapterLoadError(
                    f"Adapter {source}: its {CONFIG_NAME} gives rank {rank[1]} to {name.rsplit('.lora_', 1)[0]!r} "
                    f"but the tensor {name!r} in the file has rank {rank[0]}: the config does not belong to these "
                    f"weights. Set r (or its rank_pattern entry) to {rank[0]} in {CONFIG_NAME}, or re-save the "
                    "adapter.")
            raise AdapterLoadError(
                f"Adapter {source} does not fit this base model: tensor {name!r} has shape {tuple(tensor.shape)} "
                f"in the file but the model expects {tuple(target.shape)}. The adapter was trained on a "
                f"different base model, or its config's rank disagrees with its tensors{base_hint}.")
        plan.append((target, tensor))
    if expected:
        missing = sorted(expected)
        raise AdapterLoadError(f"Adapter {source} lacks {len(missing)} tensor(s) its config calls for, e.g. "
                               f"{missing[0]!r}; the file is incomplete or does not belong to this config.")
    with torch.no_grad():
        for target, tensor in plan:
            target.copy_(tensor.to(dtype=target.dtype, device=target.device))


def _rank_disagreement(name: str, file_shape: tuple, model_shape: tuple) -> Optional[tuple[int, int]]:
    """(rank in the file, rank the config asks for) when a LoRA matrix differs in its rank dimension only."""
    if len(file_shape) != 2 or len(model_shape) != 2:
        return None
    if ".lora_A." in name or name.endswith(".lora_embedding_A"):  # A is (r, in), B is (out, r), as in PEFT
        axis = 0
    elif ".lora_B." in name or name.endswith(".lora_embedding_B"):
        axis = 1
    else:
        return None
    other = 1 - axis
    if file_shape[other] != model_shape[other]:
        return None  # the base's dimension differs: another base model
    return file_shape[axis], model_shape[axis]


def resolve_adapter_path(model_id: str | os.PathLike, subfolder: Optional[str] = None, revision: Optional[str] = None,
                         token=None) -> Path:
    """The local directory of an adapter given as a directory or a hub repo id (fetching its two files)."""
    path = Path(model_id)
    if path.is_dir():
        return _within_subfolder(path, subfolder)
    if path.exists():
        raise AdapterLoadError(f"{path} is a file; pass the adapter directory that holds {CONFIG_NAME}.")
    text = str(model_id)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        try:  # a hub repo id: fetch the two files into the local hub cache
            from huggingface_hub import snapshot_download

            prefix = f"{subfolder.strip('/')}/" if subfolder else ""
            patterns = [prefix + CONFIG_NAME, prefix + WEIGHTS_NAME, prefix + "*/" + CONFIG_NAME,
                        prefix + "*/" + WEIGHTS_NAME]
            root = Path(snapshot_download(text, allow_patterns=patterns, revision=revision, token=token))
        except Exception as exc:
            raise AdapterLoadError(f"Adapter {text!r} is not a local directory and could not be fetched from "
                                   f"the Hugging Face Hub ({type(exc).__name__}: {exc}).") from None
        return _within_subfolder(root, subfolder)
    raise AdapterFileNotFoundError(f"Adapter directory {path} does not exist.")


def _within_subfolder(root: Path, subfolder: Optional[str]) -> Path:
    if not subfolder:
        return root
    path = root / subfolder
    if not path.is_dir():
        inside = sorted(p.name for p in root.iterdir() if is_adapter_dir(p))
        raise AdapterLoadError(f"{root} has no sub-folder {subfolder!r}"
                               + (f"; sub-folders holding an adapter: {', '.join(inside)}" if inside else "") + ".")
    return path


# -- how it was trained, and the base it needs ------------------------------------------------------------

def read_train_record(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """lorakit_train.json ({"config": settings, "result": figures}) of a run folder, or None."""
    file = Path(path) / TRAIN_RECORD_NAME
    return read_json(file) if file.is_file() else None


def write_train_record(path: str | os.PathLike, settings: dict[str, Any], result: dict[str, Any]) -> None:
    atomic_save_json({"config": settings, "result": result}, Path(path) / TRAIN_RECORD_NAME)


def trained_settings(path: Optional[str | os.PathLike]) -> dict[str, Any]:
    """The settings `lorakit train` recorded for this folder ({} for a folder from elsewhere, or no folder)."""
    if not path or not Path(path).is_dir():
        return {}
    record = read_train_record(path) or {}
    return record.get("config", {})


def recorded_base(path: str | os.PathLike) -> Optional[str]:
    """base_model_name_or_path from an adapter's config, if it records one."""
    try:
        value = read_config(path).get("base_model_name_or_path")
    except (LoraKitError, OSError):
        return None
    return value if isinstance(value, str) and value else None


def base_quantization(paths: Sequence[str | os.PathLike]) -> Optional[str]:
    """"nf4" when the adapters were trained as QLoRA (their training record says so), None when not.

    They share one base, so a QLoRA adapter and a full-precision one cannot be loaded together.
    """
    methods = {str(p): trained_settings(p).get("quantize") for p in paths}
    if len(set(methods.values())) > 1:
        qlora = ", ".join(a for a, m in methods.items() if m)
        plain = ", ".join(a for a, m in methods.items() if not m)
        raise LoraKitError(f"{qlora} trained on an NF4-rounded base (QLoRA) and {plain} on the full-precision "
                           "base; load them in separate sessions")
    return next(iter(methods.values()), None)


def required_base(base: Optional[str], paths: Sequence[str | os.PathLike], default: str,
                  available: Optional[set[str]] = None) -> str:
    """`base` when given; else the base the first adapter records, if that is here (a name in `available`, such
    as the embedded model, or an existing directory: never an unasked hub download); else `default`."""
    if base:
        return base
    for path in paths:
        recorded = recorded_base(path)
        if recorded and (recorded in (available or {default}) or Path(recorded).is_dir()):
            return recorded
    return default


# -- inspection -------------------------------------------------------------------------------------------

def inspect_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """What an adapter directory holds: config, targets, ranks, parameter count, weights and directory size."""
    from safetensors import SafetensorError, safe_open

    root = check_adapter_dir(path, flag="adapter")
    config = read_config(root)
    weights = root / WEIGHTS_NAME
    params, modules, tensors = 0, set(), 0
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    params += int(torch.Size(shape).numel())
                    tensors += 1
                    if ".lora_A" in key or ".lora_embedding_A" in key:
                        modules.add(key.split(".lora_")[0])
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterLoadError(f"{weights} cannot be read ({exc}); it is truncated or corrupt: re-save or "
                                   "re-copy the adapter") from None
    weights_file = next((root / name for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if (root / name).is_file()), None)
    info = {
        "path": str(root),
        **{key: config.get(key) for key in ("base_model_name_or_path", "peft_type", "task_type", "r", "lora_alpha",
                                            "lora_dropout", "target_modules", "use_rslora", "use_dora")},
        "rank_pattern": config.get("rank_pattern") or {},
        "adapted_modules": len(modules),
        "tensors": tensors,
        "parameters": params,
        "weights_file": weights_file.name if weights_file else None,
        "weights_bytes": weights_file.stat().st_size if weights_file else 0,
        # metrics, the loss curve and checkpoints too: what deleting the directory would free
        "directory_bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file()),
    }
    record = read_train_record(root)
    if record:
        result, settings = record.get("result", {}), record.get("config", {})
        info["training"] = {k: result.get(k) for k in ("steps", "epochs", "first_loss", "final_loss", "eval_loss")}
        info["training"]["data"] = settings.get("data")
        info["training"]["quantize"] = settings.get("quantize")
    return info


def human_bytes(n: float) -> str:
    """A size as people read it: 812 B, 3.1 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def warn_on_base_mismatch(expected: Optional[str], actual: Optional[str], path: Path) -> None:
    if expected and actual and expected != actual:
        warnings.warn(f"Adapter {path} was trained on {expected!r} but is being loaded onto {actual!r}; "
                      "loading goes ahead because the tensor shapes are checked.", stacklevel=4)
