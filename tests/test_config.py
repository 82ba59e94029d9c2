"""LoraConfig: PEFT's defaults, validation messages, JSON round trips."""

import json
import warnings

import peft
import pytest

from lorakit import ConfigError, LoraConfig


def test_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for field in ("r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out", "use_rslora", "init_lora_weights",
                  "use_dora", "rank_pattern", "alpha_pattern", "target_modules", "modules_to_save",
                  "layers_to_transform", "inference_mode"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_scaling_plain_rslora_and_patterns():
    assert LoraConfig(r=16, lora_alpha=32).scaling_for("x.q_proj") == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling_for("x.q_proj") == 8.0
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.1\.v_proj": 2})
    assert cfg.rank_for("model.layers.0.q_proj") == 4
    assert cfg.rank_for("model.layers.0.qq_proj") == 8  # a pattern matches whole name components
    assert cfg.alpha_for("model.layers.1.v_proj") == 2
    assert cfg.alpha_for("model.layers.11.v_proj") == 16


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 0}, r"LoraConfig.r=0 is invalid: expected a positive integer"),
    ({"r": 2.5}, r"LoraConfig.r=2.5 is invalid"),
    ({"lora_alpha": float("nan")}, r"lora_alpha=nan is invalid"),
    ({"lora_dropout": 1.0}, r"lora_dropout=1.0 is invalid: expected a probability in \[0, 1\)"),
    ({"bias": "some"}, r"bias='some' is invalid: expected one of \('none', 'all', 'lora_only'\)"),
    ({"init_lora_weights": "loftq"}, r"init_lora_weights='loftq' is invalid: expected .*'pissa_niter_N', 'olora'"),
    ({"init_lora_weights": "pissa_niter_x"}, r"init_lora_weights='pissa_niter_x' is invalid"),
    ({"task_type": "CAUSAL"}, r"task_type='CAUSAL' is invalid"),
    ({"target_modules": "q_proj("}, r"target_modules='q_proj\(' is invalid: expected .* valid regex"),
    ({"target_modules": []}, r"target_modules=\[\] is invalid"),
    ({"target_modules": "q.*", "layers_to_transform": [0]}, r"cannot be combined with a regex"),
    ({"layers_to_transform": [-1]}, r"layers_to_transform=\[-1\] is invalid"),
    ({"layers_pattern": "layers"}, r"layers_pattern only has an effect together with layers_to_transform"),
    ({"rank_pattern": {"q": 0}}, r"rank_pattern\['q'\]=0 is invalid"),
    ({"use_dora": True, "init_lora_weights": "pissa"}, r"use_dora=True cannot be combined"),
    ({"use_dora": True, "init_lora_weights": "pissa_niter_4"}, r"use_dora=True cannot be combined"),
    ({"peft_type": "IA3"}, r"peft_type='IA3' is invalid"),
])
def test_invalid_values_fail_at_construction(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraConfig(**kwargs)


def test_json_round_trip_and_peft_fields(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    data = cfg.to_dict()
    assert LoraConfig.from_dict(data) == cfg
    peft_fields = set(peft.LoraConfig().to_dict())
    assert peft_fields - set(data) <= {"peft_version"}, "every field PEFT writes is written"


def test_unknown_fields_warn_once_and_missing_fields_take_defaults(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "target_modules": ["q_proj"], "peft_type": "LORA", "shiny_new_field": 1, "another": "x"}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = LoraConfig.from_pretrained(tmp_path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "another, shiny_new_field" in messages[0]
    assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.bias == "none"


def test_unsupported_peft_features_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="use_qalora=True, a PEFT feature lorakit does not implement"):
        LoraConfig.from_dict({"r": 4, "use_qalora": True})
    with pytest.raises(ConfigError, match="astra_config=.*a PEFT feature lorakit does not implement"):
        LoraConfig.from_dict({"r": 4, "astra_config": {"ratio": 0.5}})  # PEFT 0.22's Astra initialisation
    assert LoraConfig.from_dict({"r": 4, "astra_config": None}).r == 4  # what PEFT writes when unused


def test_missing_and_corrupt_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter_config.json"):
        LoraConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        LoraConfig.from_pretrained(tmp_path)
