"""TrainConfig: every numeric option is checked, with a message that names it and says what is wanted."""

import dataclasses

import pytest

from lorakit.train_config import TrainConfig, TrainError, TrainResult, lora_recipe


@pytest.mark.parametrize("changes, message", [
    ({"lr": 0}, "lr must be positive, got 0"),
    ({"lr": -1e-3}, "lr must be positive"),
    ({"lr": float("nan")}, "lr=nan: give a finite number"),
    ({"lr": float("inf")}, "lr=inf: give a finite number"),
    ({"epochs": 0}, "epochs is 0: give a positive epochs"),
    ({"epochs": -2}, "epochs must be positive, got -2"),
    ({"epochs": -2, "max_steps": 10}, "epochs must be positive, got -2"),
    ({"max_steps": 0}, "max_steps must be positive, got 0"),
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"grad_accum": -1}, "grad_accum must be positive, got -1"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\), got 1.0"),
    ({"warmup_ratio": -0.1}, r"warmup_ratio must be in \[0, 1\)"),
    ({"warmup_steps": -5, "warmup_ratio": 0}, "warmup_steps must be >= 0, got -5"),
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_steps .10. and warmup_ratio .0.1. both set the warmup"),
    ({"weight_decay": -0.01}, "weight_decay must be >= 0"),
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be >= 0 \(0: no clipping\)"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm=nan: give a finite number"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\), got -1"),
    ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32\)"),
    ({"max_length": 1}, "max_length must be > 1, got 1"),
    ({"length_tolerance": -0.1}, r"length_tolerance must be >= 0 \(0: sort by exact length\)"),
    ({"loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be positive, got 0"),
    ({"neftune_alpha": -1.0}, r"neftune_alpha must be >= 0 \(0: no noise\), got -1.0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1, got 0"),
    ({"log_every": 0}, "log_every must be >= 1, got 0"),
    ({"eval_every": -1}, "save_every and eval_every must be >= 0"),
    ({"save_every": -3}, "save_every and eval_every must be >= 0"),
    ({"lora": lora_recipe(lora_alpha=0)}, "lora alpha must be positive, got 0: .* changes nothing"),
    ({"lora": lora_recipe(lora_alpha=-16)}, "lora alpha must be positive"),
    ({"keep_best": True}, "keep_best picks the adapter by its eval loss: give held-out data with eval_data"),
    ({"lr_scheduler": "step"}, "lr_scheduler must be one of cosine, linear, constant, got 'step'"),
])
def test_meaningless_values_are_refused_with_a_message(changes, message):
    with pytest.raises(TrainError, match=message):
        TrainConfig(data="train.jsonl", **changes)


def test_zero_means_off_where_it_has_a_meaning():
    config = TrainConfig(data="train.jsonl", max_grad_norm=0, weight_decay=0, warmup_ratio=0, eval_every=0,
                         save_every=0, seed=0)
    assert (config.max_grad_norm, config.weight_decay, config.warmup_ratio) == (0, 0, 0)
    assert TrainConfig(data="d", epochs=0, max_steps=5).max_steps == 5  # max_steps overrides epochs
    assert TrainConfig(data="d", warmup_ratio=0, warmup_steps=7).warmup_steps == 7
    assert TrainConfig(data="d", keep_best=True, eval_data="eval.jsonl").keep_best
    assert TrainConfig(data="d", full=True, lora=lora_recipe(lora_alpha=0)).full  # alpha means nothing there


def test_defaults_are_the_benchmarked_recipe():
    """benchmarks/quality.py chose these on validation splits (README: Training quality)."""
    config = TrainConfig(data="d")
    assert (config.lr, config.lr_scheduler, config.max_grad_norm, config.warmup_ratio, config.group_by_length) == \
        (2e-3, "constant", 0.0, 0.0, False)
    assert (config.lora.r, config.lora.lora_alpha, config.epochs, config.batch_size) == (16, 32, 3, 8)


def test_summary_says_which_adapter_was_kept():
    result = TrainResult(out="runs/a", steps=40, epochs=4.0, first_loss=2.0, final_loss=0.1, eval_loss=0.9,
                         tokens=1000, train_seconds=10.0, tokens_per_s=100.0, trainable_params=10,
                         best_step=20, best_eval_loss=0.5, last_dir="runs/a/last")
    text = result.summary()
    assert "saved to runs/a the adapter of step 20, the lowest eval loss (0.500)" in text
    assert "the last step's adapter is in runs/a/last" in text
    last_is_best = dataclasses.replace(result, best_step=40, best_eval_loss=0.9, last_dir=None)
    assert last_is_best.summary().endswith("the lowest eval loss (0.900) (the last step)")
    assert dataclasses.replace(result, best_step=None).summary().endswith("; saved to runs/a")


def test_the_demo_keeps_the_run_it_was_measured_with():
    """The demo's recipe, chosen on its validation split: cosine, clipping at 1.0, exact length sorting, 3 epochs."""
    from lorakit.demo import demo_config

    config = demo_config()
    assert (config.lr, config.lr_scheduler, config.max_grad_norm, config.warmup_ratio, config.batch_size,
            config.epochs) == (3e-3, "cosine", 1.0, 0.05, 4, 3)
    assert config.group_by_length and config.length_tolerance == 0.0 and config.lora.lora_dropout == 0.0
