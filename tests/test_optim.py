"""The learning-rate schedules, the warmup, and gradient clipping (0: none)."""

import math

import pytest
import torch

from lorakit.optim import build_scheduler, clip_gradients, lr_multiplier, warmup_steps
from lorakit.train_config import TrainConfig


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_each_schedule_warms_up_linearly_then_follows_its_shape(scheduler):
    values = [lr_multiplier(s, 4, 20, scheduler) for s in range(20)]
    assert values[:4] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert values[4] == pytest.approx(1.0)
    after = values[4:]
    if scheduler == "constant":
        assert after == pytest.approx([1.0] * 16)
    else:
        assert all(a > b for a, b in zip(after, after[1:]))  # decaying towards 0 at step 20
        middle = 0.5 if scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * 0.5))
        assert lr_multiplier(12, 4, 20, scheduler) == pytest.approx(middle)
        assert lr_multiplier(20, 4, 20, scheduler) == pytest.approx(0.0, abs=1e-12)
        if scheduler == "linear":
            assert after == pytest.approx([1 - k / 16 for k in range(16)])


def test_no_warmup_starts_at_the_peak():
    assert lr_multiplier(0, 0, 10, "constant") == 1.0
    assert lr_multiplier(0, 0, 10, "linear") == 1.0


def test_warmup_in_steps_or_as_a_share_rounded_up():
    assert warmup_steps(TrainConfig(data="d", warmup_ratio=0.05), 455) == 22
    assert warmup_steps(TrainConfig(data="d", warmup_ratio=0.0, warmup_steps=7), 455) == 7
    assert warmup_steps(TrainConfig(data="d", warmup_ratio=0.0), 455) == 0


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_build_scheduler_drives_the_optimizer_lr(scheduler):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    config = TrainConfig(data="d", lr=0.1, lr_scheduler=scheduler, warmup_ratio=0.0, warmup_steps=2)
    schedule = build_scheduler(optimizer, config, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.1 * lr_multiplier(s, 2, 10, scheduler) for s in range(10)])


def test_clipping_at_zero_measures_and_leaves_gradients_alone():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_gradients(params, 0.0)
    assert float(norm) == pytest.approx(5.0)
    assert params[0].grad.tolist() == [3.0, 0.0, 0.0]  # not clipped to zero
    norm = clip_gradients(params, 1.0)
    assert float(norm) == pytest.approx(5.0)  # the norm before clipping
    total = torch.cat([p.grad for p in params]).norm()
    assert float(total) == pytest.approx(1.0, rel=1e-4)
