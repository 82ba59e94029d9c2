"""TrainConfig: every setting of a training run, its defaults and their checks (the CLI maps its flags onto it)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.errors import ConfigError, LoraKitError, TrainError
from lorakit.models import DEFAULT_BASE, resolve_device

LR_SCHEDULERS = ("cosine", "linear", "constant")


def lora_recipe(**changes: Any) -> LoraConfig:
    """The adapter `lorakit train` trains unless told otherwise: r=16, alpha 32 on q, k, v, o; `changes` replace
    LoraConfig fields (r=8, lora_dropout=0.1, ...)."""
    return LoraConfig(**{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                         "lora_dropout": 0.05, "task_type": "CAUSAL_LM", **changes})


@dataclass
class TrainConfig:
    """Everything a run needs. `lora` is the adapter (a LoraConfig); the rest is how it is trained."""

    data: str = ""
    base: str = DEFAULT_BASE
    eval_data: Optional[str] = None
    out: str = "lorakit-out"
    lora: LoraConfig = field(default_factory=lora_recipe)
    # optimisation
    epochs: int = 3
    max_steps: Optional[int] = None  # if set, overrides epochs
    # lr, schedule, warmup, clipping and grouping: chosen by benchmarks/quality.py on validation splits (README,
    # Training quality): a constant lr beat cosine and linear decay, 2e-3 beat 1e-3, no clipping beat clipping at
    # 1.0 (at lr 2e-3), plain shuffled batches beat length-grouped ones, and a 5% warmup tied with none, so none
    # (the HF Trainer's default).
    lr: float = 2e-3
    lr_scheduler: str = "constant"  # "cosine", "linear" (both decay to 0 at the last step) or "constant"
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.0  # share of the steps spent warming up (the lr rising linearly from 0)
    warmup_steps: int = 0  # if > 0, the warmup in steps instead of warmup_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (the gradient norm is still measured and logged)
    seed: int = 0
    group_by_length: bool = False  # batches of similar-length rows: less padding, less varied batches
    length_tolerance: float = 0.125  # grouping: lengths within this share of each other count as equal (0: exact)
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard the model across the processes (FSDP) instead of copying it (DDP)
    attention: Optional[str] = None  # transformers attn_implementation ("eager", "sdpa"); None: its default
    device: str = "auto"  # "auto": the GPU if there is one, else the CPU; or "cpu", "cuda", "cuda:1"
    loraplus_lr_ratio: Optional[float] = None  # LoRA+: B matrices learn at lr * ratio
    neftune_alpha: float = 0.0  # NEFTune: noise on the input embeddings while training (0: none)
    # bookkeeping
    eval_every: int = 0  # steps between eval-loss measurements (0: only at the end, or each epoch with keep_best)
    keep_best: bool = False  # with eval_data: the adapter at the top of `out` is the one of the lowest eval loss
    save_every: int = 0  # steps between checkpoints (0: none, except on Ctrl-C)
    keep_checkpoints: int = 2
    log_every: int = 1  # steps between metrics.jsonl rows
    progress: bool = True
    # data
    query_field: str = "query"
    response_field: str = "response"
    system_prompt: Optional[str] = None
    max_length: int = 512
    too_long: str = "truncate"  # or "skip"
    # variants
    full: bool = False  # full fine-tuning baseline: all weights train, a full model dir is saved
    quantize: Optional[str] = None  # "nf4": QLoRA, the frozen base is stored in 4 bits
    resume: bool = False

    def __post_init__(self):
        if isinstance(self.lora, dict):  # read back from a training record or a checkpoint
            try:
                self.lora = LoraConfig.from_dict(self.lora, source="lora settings")
            except (ConfigError, TypeError) as e:
                raise TrainError(f"lora: {e}") from None
        if not isinstance(self.lora, LoraConfig):
            raise TrainError(f"lora must be a LoraConfig, got {type(self.lora).__name__}")
        _check_field_types(self)
        lora = self.lora
        not_finite = [f"{name}={getattr(self, name)}" for name in _FLOAT_FIELDS
                      if getattr(self, name) is not None and not math.isfinite(getattr(self, name))]
        checks = [
            (bool(self.data), "data: give a training data file (--data)"),
            (not not_finite, f"{', '.join(not_finite)}: give a finite number"),
            (self.epochs >= 0, f"epochs must be positive, got {self.epochs}"),
            (self.max_steps is None or self.max_steps > 0, f"max_steps must be positive, got {self.max_steps}"),
            (self.epochs > 0 or self.max_steps is not None, "epochs is 0: give a positive epochs (or max_steps)"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.lr_scheduler in LR_SCHEDULERS,
             f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.grad_accum > 0, f"grad_accum must be positive, got {self.grad_accum}"),
            (0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (not (self.warmup_steps and self.warmup_ratio),
             f"warmup_steps ({self.warmup_steps}) and warmup_ratio ({self.warmup_ratio}) both set the warmup; give "
             "one of them (set warmup_ratio to 0 to count the warmup in steps)"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.length_tolerance >= 0, f"length_tolerance must be >= 0 (0: sort by exact length), got "
                                         f"{self.length_tolerance}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}"),
            (0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
            (self.max_length > 1, f"max_length must be > 1, got {self.max_length}"),
            (self.too_long in ("truncate", "skip"), f"too_long must be 'truncate' or 'skip', got {self.too_long!r}"),
            (self.full or lora.lora_alpha > 0, f"lora alpha must be positive, got {lora.lora_alpha}: the adapter's "
                                               "output is scaled by alpha / r, so 0 trains an adapter that changes "
                                               "nothing"),
            (self.quantize in (None, "nf4"), f"quantize must be None or 'nf4', got {self.quantize!r}"),
            (not (self.full and self.quantize), "full fine-tuning cannot train 4-bit weights; drop quantize"),
            (not (self.full and (lora.use_dora or lora.use_rslora)),
             "dora and rslora are LoRA options; drop them with full"),
            (not (self.fsdp and self.quantize), "fsdp shards floating-point weights, and a 4-bit (quantize nf4) base "
                                                "has none to shard: train QLoRA with DDP (drop fsdp)"),
            (not (self.fsdp and self.full), "fsdp trains LoRA adapters here; run full fine-tuning with DDP (drop fsdp)"),
            (self.neftune_alpha >= 0, f"neftune_alpha must be >= 0 (0: no noise), got {self.neftune_alpha}"),
            (self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0,
             f"loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.save_every >= 0 and self.eval_every >= 0,
             f"save_every and eval_every must be >= 0 (0: off), got {self.save_every} and {self.eval_every}"),
            (not self.keep_best or bool(self.eval_data),
             "keep_best picks the adapter by its eval loss: give held-out data with eval_data (--eval-data)"),
            (self.attention in (None, "eager", "sdpa"), f"attention must be 'eager' or 'sdpa', got {self.attention!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)
        try:
            resolve_device(self.device)
        except LoraKitError as e:
            raise TrainError(str(e)) from None

    @property
    def target_names(self) -> list[str]:
        """The adapter's targets as a list of names (["all-linear"] for all linear layers)."""
        targets = self.lora.target_modules
        return [targets] if isinstance(targets, str) else list(targets or [])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the training record and checkpoints keep these)."""
        return dataclasses.asdict(self)


_FLOAT_FIELDS = ("lr", "warmup_ratio", "weight_decay", "max_grad_norm", "loraplus_lr_ratio", "length_tolerance",
                 "neftune_alpha")


def _check_field_types(config: TrainConfig) -> None:
    """Each field holds the type it is declared with (a YAML "1e-3" is a string, "no" is not False)."""
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    for f in dataclasses.fields(config):
        value, declared = getattr(config, f.name), f.type
        if declared == "LoraConfig":
            continue  # checked by LoraConfig itself
        if declared.startswith("Optional["):
            if value is None:
                continue
            declared = declared[len("Optional["):-1]
        if declared == "str" and isinstance(value, os.PathLike):  # paths: data, out, base ...
            value = os.fspath(value)
            setattr(config, f.name, value)
        kind = {"bool": bool, "int": int, "float": float, "str": str}[declared]
        accepted = (int, float) if kind is float else kind  # an integer is a fine float
        if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
            raise TrainError(f"{f.name} must be {names[kind]}, got {value!r} ({type(value).__name__})")


def targets_from_names(names: list[str]) -> list[str] | str:
    """--targets as LoraConfig.target_modules: a list of names, or "all-linear"."""
    return ALL_LINEAR if list(names) == [ALL_LINEAR] else list(names)


@dataclass
class TrainResult:
    out: str
    steps: int
    epochs: float  # passes over the training data, fractional
    first_loss: Optional[float]
    final_loss: Optional[float]  # mean train loss over the last 10% of steps
    eval_loss: Optional[float]
    tokens: int  # non-padding tokens processed
    train_seconds: float
    tokens_per_s: float
    trainable_params: int
    interrupted: bool = False
    checkpoint: Optional[str] = None  # last checkpoint written
    best_step: Optional[int] = None  # keep_best: the step whose adapter is at the top of `out`
    best_eval_loss: Optional[float] = None
    last_dir: Optional[str] = None  # keep_best: where the last step's adapter went, when it is not the best

    def summary(self) -> str:
        first = "?" if self.first_loss is None else f"{self.first_loss:.3f}"
        last = "?" if self.final_loss is None else f"{self.final_loss:.3f}"
        steps = f"{self.steps} step{'' if self.steps == 1 else 's'}"
        text = (f"trained {steps} ({self.epochs:.2f} epochs) in {format_duration(self.train_seconds)} "
                f"at {self.tokens_per_s:.0f} tok/s: loss {first} -> {last}")
        if self.eval_loss is not None:
            text += f", eval loss {self.eval_loss:.3f}"
        if self.interrupted:
            return text + f"; interrupted, checkpoint {self.checkpoint} (continue with --resume)"
        if self.best_step is None:
            return text + f"; saved to {self.out}"
        text += f"; saved to {self.out} the adapter of step {self.best_step}, the lowest eval loss ({self.best_eval_loss:.3f})"
        return text + (f"; the last step's adapter is in {self.last_dir}" if self.last_dir else " (the last step)")


def format_duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m09s."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{seconds:.1f}s")
