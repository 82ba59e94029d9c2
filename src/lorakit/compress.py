"""`lorakit compress`: SVD-truncate every layer's LoRA update to a lower rank and save a PEFT-compatible adapter.

A layer's update is s * B @ A (s = lora_alpha / r, or / sqrt(r) with rsLoRA). Its SVD comes from the r x r core
of two thin QR factorisations (B = Qb Rb, A^T = Qa Ra, so s B A = Qb (s Rb Ra^T) Qa^T), never from the full
[out x in] matrix. Keeping the top k singular triplets is the best rank-k update (Eckart-Young); the kept part is
split evenly between the new B and A (sqrt of the singular values on each side), with the new config's scaling
divided out, so the saved adapter computes exactly the truncated update.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lorakit.adapter_folder import (WEIGHTS_NAME, check_adapter_dir, read_config, read_weights, read_train_record,
                                    write_adapter, write_train_record)
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
FILE_PREFIX = "base_model.model."


def lora_svd(a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [out x r], S [r] (descending), Vh [r x in] of scaling * B @ A, in float64."""
    qb, rb = torch.linalg.qr(b.double())  # out x r, r x r
    qa, ra = torch.linalg.qr(a.double().T)  # in x r, r x r
    u, s, vh = torch.linalg.svd(scaling * rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The fewest singular values whose squares hold `energy` of the total (at least 1)."""
    squares = s.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    return max(1, int((kept < energy - 1e-12).sum()) + 1)


def lora_layers(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Module names (without the file prefix) that have a lora_A / lora_B pair, in file order."""
    names = [k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX)]
    return [n.removeprefix(FILE_PREFIX) for n in names if n + B_SUFFIX in tensors]


@dataclass
class LayerResult:
    name: str
    rank: int
    kept: int
    relative_error: float  # ||dW - dW_k||_F / ||dW||_F
    energy_kept: float  # share of sum(s^2) kept


@dataclass
class CompressResult:
    out: str
    layers: list[LayerResult]
    bytes_before: int
    bytes_after: int
    original_accuracy: Optional[float] = None
    compressed_accuracy: Optional[float] = None
    eval_n: Optional[int] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def render(self) -> str:
        lines = [f"{'layer':60s} {'rank':>4s} {'kept':>4s} {'rel. error':>10s} {'energy kept':>11s}"]
        lines += [f"{r.name:60s} {r.rank:4d} {r.kept:4d} {r.relative_error:10.4f} {r.energy_kept:11.6f}"
                  for r in self.layers]
        worst = max(self.layers, key=lambda r: r.relative_error)
        saved = self.bytes_before - self.bytes_after
        lines.append(f"{len(self.layers)} layers; largest relative error {worst.relative_error:.4f} ({worst.name}); "
                     f"{WEIGHTS_NAME} {self.bytes_before:,} -> {self.bytes_after:,} bytes "
                     f"({saved:,} saved, {100 * saved / max(1, self.bytes_before):.1f}%)")
        if self.original_accuracy is not None:
            lines.append(f"held-out accuracy on {self.eval_n} questions: original {100 * self.original_accuracy:.1f}%, "
                         f"compressed {100 * self.compressed_accuracy:.1f}%")
        lines.append(f"compressed adapter saved to {self.out}")
        return "\n".join(lines)


def _new_config(config: LoraConfig, ranks: dict[str, int]) -> LoraConfig:
    """The config of the compressed adapter: r the largest kept rank, rank_pattern for the layers that keep fewer;
    alpha unchanged (the new B and A absorb the change of scaling)."""
    top = max(ranks.values())
    pattern = {re.escape(name): k for name, k in ranks.items() if k != top}
    return dataclasses.replace(config, r=top, rank_pattern=pattern, alpha_pattern=dict(config.alpha_pattern),
                               init_lora_weights=True)


def compress_adapter(run_dir: str, out: str, rank: Optional[int] = None, energy: Optional[float] = None,
                     force: bool = False) -> CompressResult:
    """Truncate every layer of the adapter in `run_dir` to `rank` (or to the rank that keeps `energy` of each
    layer's squared singular values) and save it to `out`."""
    from lorakit.export.merged import check_out_dir, replace_dir_atomically

    if (rank is None) == (energy is None):
        raise ConfigError("give one of --rank K or --energy FRACTION")
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"--energy must be in (0, 1], got {energy}")
    src = check_adapter_dir(run_dir, flag="RUN_DIR")
    check_out_dir(src, out, force, holds=WEIGHTS_NAME, kind="adapter", command="compress")
    config = LoraConfig.from_dict(read_config(src), source=str(src))
    if config.use_dora:
        raise ConfigError(f"{src} is a DoRA adapter: its magnitude vectors are normalised by the full update, so a "
                          "truncated update would change them; compress supports plain LoRA adapters")
    tensors = read_weights(src)
    names = lora_layers(tensors)
    if not names:
        raise ConfigError(f"{src} holds no lora_A / lora_B pairs to compress")
    factors, ranks, results = {}, {}, []
    for name in names:
        a, b = tensors[FILE_PREFIX + name + A_SUFFIX], tensors[FILE_PREFIX + name + B_SUFFIX]
        u, s, vh = lora_svd(a, b, config.scaling_for(name))
        k = min(rank, len(s)) if rank is not None else energy_rank(s, energy)
        squares = s ** 2
        total = float(squares.sum())
        kept_energy = float(squares[:k].sum()) / total if total else 1.0
        results.append(LayerResult(name, a.shape[0], k, math.sqrt(max(0.0, 1 - kept_energy)), kept_energy))
        factors[name], ranks[name] = (u[:, :k], s[:k], vh[:k], a.dtype), k
    new_config = _new_config(config, ranks)
    new_tensors = {k: v for k, v in tensors.items()
                   if not k.endswith((A_SUFFIX, B_SUFFIX)) or k.removeprefix(FILE_PREFIX).rsplit(".", 2)[0] not in factors}
    for name, (u, s, vh, dtype) in factors.items():
        root = (s / new_config.scaling_for(name)).sqrt()
        new_tensors[FILE_PREFIX + name + B_SUFFIX] = (u * root).to(dtype).contiguous()
        new_tensors[FILE_PREFIX + name + A_SUFFIX] = (root[:, None] * vh).to(dtype).contiguous()
    data = new_config.to_dict()
    data.update({k: v for k, v in read_config(src).items() if k in ("auto_mapping", "peft_version")})
    record = read_train_record(src)

    def write(tmp: Path) -> None:
        write_adapter(tmp, new_tensors, data)
        if record:
            write_train_record(tmp, record.get("config", {}),
                               {**record.get("result", {}), "compressed_from": str(src), "compressed_ranks": ranks})

    replace_dir_atomically(Path(out), write)
    return CompressResult(str(out), results, (src / WEIGHTS_NAME).stat().st_size,
                          (Path(out) / WEIGHTS_NAME).stat().st_size)


def compare_accuracy(result: CompressResult, run_dir: str, eval_data: str, base: Optional[str] = None,
                     batch_size: int = 16, limit: Optional[int] = None, bf16: bool = False) -> CompressResult:
    """Held-out accuracy of the original and the compressed adapter (lorakit.evaluate, same questions)."""
    from lorakit.adapter_folder import required_base
    from lorakit.evaluate import evaluate
    from lorakit.models import DEFAULT_BASE

    base = required_base(base, [run_dir], DEFAULT_BASE)
    scores = [evaluate(base=base, adapter=path, data=eval_data, include_base=False, batch_size=batch_size,
                       limit=limit, bf16=bf16, progress=False) for path in (run_dir, result.out)]
    result.original_accuracy, result.compressed_accuracy = (s.tuned.accuracy for s in scores)
    result.eval_n = scores[0].n
    return result
