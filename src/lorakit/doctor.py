"""`lorakit doctor`: the common LoRA mistakes, found before training (settings and data) or after (a run folder).

Each finding has a severity (error: the run is broken or will be; warning: it will likely train worse than it
could; info: worth knowing), what was found, why it matters, and the fix as the exact flag or command. The data
checks and `doctor_before` are in doctor_data.py, the finished-run checks and `doctor_run_dir` in doctor_run.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from lorakit.train_config import TrainConfig

SEVERITIES = ("error", "warning", "info")
# The learning rates LoRA is usually trained at with AdamW (QLoRA paper: 1e-4 to 2e-4; lorakit's own measured
# default is TrainConfig.lr); full fine-tuning uses far smaller ones.
LORA_LR_RANGE = (1e-5, 1e-2)
FULL_LR_RANGE = (1e-7, 2e-4)
INSTRUCTION_MIN_RANK = 4  # ranks 1-2 underfit instruction tuning (LoRA paper's r=1 worked for narrow tasks only)
ALPHA_RATIO_RANGE = (0.5, 4.0)  # alpha / r outside this is far from the usual r..2r
TINY_DATASET_STEPS = 200  # optimizer steps below which dropout's noise costs more than it regularises


@dataclass
class Finding:
    severity: str
    code: str
    what: str
    why: str
    fix: str
    data: Optional[dict] = None  # figures behind the finding, for --json (per-layer ranks, ...)

    def render(self) -> str:
        return f"{self.severity.upper():7s} [{self.code}] {self.what}\n        why: {self.why}\n        fix: {self.fix}"


@dataclass
class Report:
    findings: list[Finding]
    checked: list[str]  # what was looked at: "settings", data files, a run folder

    @property
    def exit_code(self) -> int:
        return 1 if any(f.severity == "error" for f in self.findings) else 0

    def render(self) -> str:
        order = sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        head = f"lorakit doctor: checked {', '.join(self.checked)}"
        if not order:
            return head + "\nno findings: nothing to fix"
        counts = ", ".join(f"{sum(f.severity == s for f in order)} {s}{'s' if sum(f.severity == s for f in order) != 1 else ''}"
                           for s in SEVERITIES if any(f.severity == s for f in order))
        return "\n".join([head + f": {counts}"] + [f.render() for f in order])

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "exit_code": self.exit_code,
                "findings": [dataclasses.asdict(f) for f in self.findings]}


def _default(name: str) -> Any:
    """A TrainConfig default, read from the dataclass (never restated here)."""
    return next(f.default for f in dataclasses.fields(TrainConfig) if f.name == name)


def _targets_cost(config: TrainConfig, targets: list[str]) -> Optional[tuple[int, int]]:
    """Trainable parameters now and with `targets` (lorakit plan's count), or None when the base's config is not
    at hand."""
    from lorakit.errors import LoraKitError
    from lorakit.plan import make_plan

    try:
        now = make_plan(config).trainable
        wider = make_plan(dataclasses.replace(config, lora=dataclasses.replace(config.lora, target_modules=targets)))
        return now, wider.trainable
    except (LoraKitError, OSError, ValueError):
        return None


def check_settings(config: TrainConfig, n_examples: Optional[int] = None, with_costs: bool = True) -> list[Finding]:
    """Findings about the run's settings alone (`n_examples`: the training set's size, when known)."""
    findings = []
    lora, targets = config.lora, config.target_names
    if not config.full:
        if lora.r < INSTRUCTION_MIN_RANK:
            findings.append(Finding(
                "warning", "rank-too-low", f"rank r={lora.r}",
                "ranks 1-2 hold too few directions for instruction tuning (new formats, facts and styles at once); "
                "they suit a single narrow behaviour at most",
                f"--r 16 --alpha 32 (or at least --r {INSTRUCTION_MIN_RANK})"))
        short = {t.split(".")[-1] for t in targets} if targets != ["all-linear"] else set()
        if short and short <= {"q_proj", "v_proj"}:
            wider = ["q_proj", "k_proj", "v_proj", "o_proj"]
            cost = _targets_cost(config, wider) if with_costs else None
            extra = (f" ({cost[0]:,} -> {cost[1]:,} trainable parameters, lorakit plan's count)" if cost else "")
            findings.append(Finding(
                "warning", "q-v-only", f"only {', '.join(sorted(short))} targeted",
                "adapting only the query and value projections (the original LoRA paper's choice) learns less than "
                "covering every attention projection, or every linear layer (QLoRA paper), for little more memory",
                f"--targets {','.join(wider)}{extra}, or --targets all-linear"))
        ratio = lora.lora_alpha / lora.r
        if not lora.use_rslora and not ALPHA_RATIO_RANGE[0] <= ratio <= ALPHA_RATIO_RANGE[1]:
            findings.append(Finding(
                "warning", "alpha-off-scale", f"lora_alpha={lora.lora_alpha:g} with r={lora.r} (scale {ratio:g})",
                "the update is scaled by alpha / r; far from 1-2 it either barely moves the model or swamps it, "
                "and the usual learning rates stop fitting",
                f"--alpha {2 * lora.r} (2r), or --rslora to scale by alpha / sqrt(r)"))
        low, high = LORA_LR_RANGE
    else:
        low, high = FULL_LR_RANGE
    if not low <= config.lr <= high:
        kind = "full fine-tuning" if config.full else "LoRA"
        suggested = 2e-5 if config.full else _default("lr")
        findings.append(Finding(
            "warning", "lr-out-of-range", f"learning rate {config.lr:g} for {kind} with AdamW",
            f"{kind} with AdamW usually trains between {low:g} and {high:g}; outside it the loss either barely moves "
            "or diverges", f"--lr {suggested:g}"))
    if n_examples is not None and not config.full and lora.lora_dropout > 0:
        steps = total_steps(config, n_examples)
        if steps < TINY_DATASET_STEPS:
            findings.append(Finding(
                "info", "dropout-tiny-dataset",
                f"lora_dropout={lora.lora_dropout} on {n_examples} examples ({steps} optimizer steps)",
                "on a run this short, dropout's noise slows learning more than it prevents over-fitting (the demo "
                "trains without it for that reason)", "--dropout 0"))
    return findings


def total_steps(config: TrainConfig, n_examples: int) -> int:
    """Optimizer steps the run will take: max_steps, or epochs x ceil(batches / grad_accum)."""
    if config.max_steps:
        return config.max_steps
    batches = math.ceil(n_examples / config.batch_size)
    return config.epochs * math.ceil(batches / config.grad_accum)


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2)
