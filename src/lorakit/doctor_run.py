"""`lorakit doctor RUN_DIR`: a finished run's curves and weights: over-fitting, NaN/inf losses and weights, an
adapter that never trained, one kept unmerged, and how many of its ranks each layer really uses."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

import torch

from lorakit.adapter_folder import (METRICS_NAME, check_adapter_dir, read_config, read_weights, trained_settings)
from lorakit.compress import A_SUFFIX, B_SUFFIX, FILE_PREFIX, energy_rank, lora_layers, lora_svd
from lorakit.config import LoraConfig
from lorakit.doctor import Finding, Report, check_settings
from lorakit.train_config import TrainConfig

OVERFIT_RISE = 0.05  # the last eval loss this far above the best one, with train loss still falling: over-fitting
RANK_ENERGY = 0.99  # a layer's effective rank: the singular values that hold this share of its update's energy
TOP_K = 4  # the energy in each layer's top-k singular values is reported too


def read_metrics(root: Path) -> list[dict[str, Any]]:
    file = root / METRICS_NAME
    if not file.is_file():
        return []
    rows = []
    for line in file.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a killed run
    return rows


def check_curves(rows: list[dict[str, Any]], root: Path) -> list[Finding]:
    findings = []
    bad = [r for r in rows if any(k in r and r[k] is not None and not math.isfinite(r[k])
                                  for k in ("loss", "eval_loss", "grad_norm"))]
    if bad:
        findings.append(Finding(
            "error", "loss-not-finite", f"the loss (or gradient norm) is NaN/inf from step {bad[0].get('step')} "
                                        f"({len(bad)} logged step(s))",
            "once NaN reaches the weights every later step is wasted, and the saved adapter may be broken",
            "retrain with a lower learning rate (--lr 1e-4) and clipping on (--max-grad-norm 1.0)"))
    evals = [r for r in rows if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
    if len(evals) >= 3:
        best = min(evals, key=lambda r: r["eval_loss"])
        last = evals[-1]
        train_before = [r["loss"] for r in rows if r.get("step", 0) <= best["step"] and "loss" in r]
        train_after = [r["loss"] for r in rows if r.get("step", 0) > best["step"] and "loss" in r]
        falling = train_before and train_after and statistics.mean(train_after) < statistics.mean(train_before[-len(
            train_after):] or train_before)
        if last is not best and last["eval_loss"] > best["eval_loss"] * (1 + OVERFIT_RISE) and falling:
            findings.append(Finding(
                "warning", "over-fitting",
                f"eval loss rose from {best['eval_loss']:.4f} at step {best['step']} to {last['eval_loss']:.4f} at "
                f"step {last['step']} while the train loss kept falling",
                "the model memorises the training rows after that step and answers held-out questions worse",
                f"retrain with --max-steps {best['step']}, or keep the best adapter: --keep-best --eval-every "
                f"{max(1, evals[1]['step'] - evals[0]['step'])}"))
    return findings


def layer_ranks(root: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Per LoRA layer: rank, effective rank (RANK_ENERGY of the energy) and the energy of the top TOP_K singular
    values of scaling * B @ A."""
    config = LoraConfig.from_dict(read_config(root), source=str(root))
    tensors = read_weights(root)
    layers = []
    for name in lora_layers(tensors):
        a, b = tensors[FILE_PREFIX + name + A_SUFFIX], tensors[FILE_PREFIX + name + B_SUFFIX]
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            continue
        _, s, _ = lora_svd(a, b, config.scaling_for(name))
        total = float((s ** 2).sum())
        layers.append({"name": name, "rank": a.shape[0], "effective_rank": energy_rank(s, RANK_ENERGY),
                       f"top{TOP_K}_energy": float((s[:TOP_K] ** 2).sum()) / total if total else 0.0})
    return layers, tensors


def check_weights(root: Path) -> list[Finding]:
    layers, tensors = layer_ranks(root)
    findings = []
    broken = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if broken:
        findings.append(Finding("error", "weights-not-finite", f"{len(broken)} tensor(s) hold NaN/inf, e.g. "
                                                               f"{broken[0]}",
                                "the adapter's outputs are NaN: it cannot be used or merged",
                                "retrain with a lower learning rate (--lr 1e-4) and --max-grad-norm 1.0"))
    b_tensors = [t for k, t in tensors.items() if k.endswith(B_SUFFIX)]
    if b_tensors and all(not t.any() for t in b_tensors):
        findings.append(Finding("error", "never-trained", "every lora_B matrix is all zeros",
                                "B starts at zero, so this adapter is still its initialisation: it changes nothing",
                                "check that the run took steps (--max-steps, --epochs) and that --lr is not ~0; "
                                "retrain"))
    elif layers:
        ranks = sorted(layer["effective_rank"] for layer in layers)
        r = max(layer["rank"] for layer in layers)
        median = ranks[len(ranks) // 2]
        top = statistics.median(layer[f"top{TOP_K}_energy"] for layer in layers)
        what = (f"the layers use a median {median} of their {r} ranks ({RANK_ENERGY:.0%} of each update's energy; "
                f"largest {ranks[-1]}); the top {TOP_K} singular values hold {top:.1%} of the energy (median)")
        if median <= r // 2:
            findings.append(Finding("info", "compressible", what,
                                    "the unused ranks cost memory and load time but add little",
                                    f"lorakit compress {root} --energy {RANK_ENERGY} --out {root}-compressed (each "
                                    f"layer keeps its own rank), or --rank {median}; next time --r {median}",
                                    data={"layers": layers}))
        else:
            findings.append(Finding("info", "rank-usage", what, "most layers use more than half of their ranks",
                                    "nothing to compress; a higher --r may help if the task is large",
                                    data={"layers": layers}))
    findings.append(Finding(
        "info", "unmerged", "the adapter is kept apart from its base",
        "right for serving several adapters on one base (lorakit serve); a deployment that serves only this "
        "adapter runs faster with it merged into the weights (no LoRA matmuls per token)",
        f"lorakit merge --adapter {root} --out {root}-merged"))
    return findings


def check_run(root: Path) -> list[Finding]:
    return check_curves(read_metrics(root), root) + check_weights(root)


def doctor_run_dir(run_dir: str, config: Optional[TrainConfig] = None) -> Report:
    """A finished run folder: its recorded settings, its metrics and its adapter's weights; and its data (the
    recorded files, or `config`'s) when they exist."""
    from lorakit.doctor_data import check_data

    root = check_adapter_dir(run_dir, flag="RUN_DIR")
    findings = check_run(root)
    checked = [f"run {root}"]
    recorded = trained_settings(root)
    if config is None and recorded:
        try:
            config = TrainConfig(**{**recorded, "device": "cpu", "resume": False})
        except Exception:  # noqa: BLE001 - a record of another lorakit version: the weights are still checked
            config = None
    if config is not None:
        n_examples = None
        if config.data and Path(config.data).exists():
            data_findings, n_examples = check_data(config)
            findings += data_findings
            checked.append(config.data)
        findings = check_settings(config, n_examples, with_costs=False) + findings
        checked.insert(0, "settings")
    return Report(findings, checked)
