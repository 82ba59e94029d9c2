"""LoraConfig: PEFT's field names and defaults, validated at construction."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .adapter_folder import read_config
from .errors import ConfigError

TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "olora", "orthogonal")
ALL_LINEAR = "all-linear"

# Fields that PEFT writes into adapter_config.json but that lorakit does not implement. They are
# written with PEFT's defaults so files look exactly like PEFT's; reading a file that sets one of
# them to something else would silently change the adapter's meaning, so that is refused.
PEFT_ONLY_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "astra_config": None,
    "corda_config": None,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_bias": False,
    "lora_ga_config": None,
    "megatron_config": None,
    "monteclora_config": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# Fields PEFT writes that carry no meaning for the adapter's math; accepted with any value.
PEFT_INERT_FIELDS: dict[str, Any] = {
    "auto_mapping": None,
    "ensure_weight_tying": False,
    "megatron_core": "megatron.core",
    "peft_version": None,
    "qalora_group_size": 16,
}

# Targets when target_modules is None, by transformers model_type (PEFT's choice: q and v).
TARGETS_BY_MODEL_TYPE = {
    **{t: ["q_proj", "v_proj"] for t in (
        "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
        "olmo", "olmo2", "granite", "stablelm", "starcoder2", "opt", "smollm3", "cohere")},
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "phi": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
}


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter; field names and defaults follow PEFT's LoraConfig."""

    r: int = 8
    lora_alpha: float = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    task_type: Optional[str] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        def bad(name: str, value: Any, expected: str) -> ConfigError:
            return ConfigError(f"LoraConfig.{name}={value!r} is invalid: expected {expected}.")

        if self.peft_type != "LORA":
            raise bad("peft_type", self.peft_type, "'LORA' (lorakit only implements LoRA adapters)")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", self.r, "a positive integer rank such as 8 or 16")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha):
            raise bad("lora_alpha", self.lora_alpha, "a finite number (the LoRA scale is lora_alpha / r)")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise bad("lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        if self.bias not in BIAS_MODES:
            raise bad("bias", self.bias, f"one of {BIAS_MODES}")
        init = self.init_lora_weights
        if init not in INIT_MODES and not (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            raise bad("init_lora_weights", init, "True (A kaiming-uniform, B zeros), 'gaussian', False (both "
                      "random), 'pissa', 'pissa_niter_N', 'olora' or 'orthogonal'")
        if self.task_type not in TASK_TYPES:
            raise bad("task_type", self.task_type, f"one of {TASK_TYPES}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as exc:
                    raise bad(name, value, f"a list of module-name suffixes or a valid regex ({exc})") from None
            elif not (isinstance(value, list) and value and all(isinstance(t, str) and t for t in value)):
                raise bad(name, value, "a non-empty list of module-name suffixes, a regex string, or 'all-linear'")
        if self.modules_to_save is not None and not all(isinstance(m, str) for m in self.modules_to_save):
            raise bad("modules_to_save", self.modules_to_save, "a list of module-name suffixes")
        if self.layers_to_transform is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers_to_transform):
                raise bad("layers_to_transform", self.layers_to_transform, "a layer index or a list of indices >= 0")
            if isinstance(self.target_modules, str):
                raise ConfigError("LoraConfig.layers_to_transform cannot be combined with a regex target_modules: "
                                  "put the layer numbers into the regex instead, or pass target_modules as a list.")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ConfigError("LoraConfig.layers_pattern only has an effect together with layers_to_transform.")
        for name, expect_int in (("rank_pattern", True), ("alpha_pattern", False)):
            pattern = getattr(self, name)
            if not isinstance(pattern, dict):
                raise bad(name, pattern, "a dict mapping a module-name pattern to a value")
            for key, value in pattern.items():
                ok = isinstance(value, int) and value > 0 if expect_int else isinstance(value, (int, float))
                if isinstance(value, bool) or not ok:
                    raise bad(f"{name}[{key!r}]", value, "a positive integer rank" if expect_int else "a number")
        if self.use_dora and str(self.init_lora_weights).startswith("pissa"):
            raise ConfigError(f"LoraConfig: use_dora=True cannot be combined with "
                              f"init_lora_weights={self.init_lora_weights!r}.")

    # -- per-module rank and alpha ---------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- serialisation ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {**PEFT_ONLY_FIELDS, **{k: v for k, v in PEFT_INERT_FIELDS.items() if k != "peft_version"}}
        out.update(dataclasses.asdict(self))
        if isinstance(out["target_modules"], set):
            out["target_modules"] = sorted(out["target_modules"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter config") -> "LoraConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for name, default in PEFT_ONLY_FIELDS.items():
            if name in data and data[name] not in (default, None, {}, False):
                raise ConfigError(f"{source} sets {name}={data[name]!r}, a PEFT feature lorakit does not implement; "
                                  f"this adapter cannot be loaded faithfully. Use PEFT for it, or retrain without it.")
        unknown = sorted(k for k in data if k not in known and k not in PEFT_ONLY_FIELDS and k not in PEFT_INERT_FIELDS)
        if unknown:
            warnings.warn(f"{source}: ignoring fields lorakit does not know: {', '.join(unknown)}", stacklevel=3)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LoraConfig":
        """The config saved in an adapter directory (or in its adapter_config.json)."""
        file = Path(path)
        return cls.from_dict(read_config(file), source=str(file))


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT semantics: the first pattern that matches the end of the module name wins."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module_name):
            return value
    return default
