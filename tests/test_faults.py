"""Training under faults: killed at random steps (once inside a checkpoint write) and resumed, the same adapter and
metrics as a run never killed; a full disk or a read-only directory, a clear error and nothing lost; a NaN loss,
a stop that names the step and the checkpoint to go back to, and no NaN adapter."""

import dataclasses
import errno
import json
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_train_config as cfg
from tiny_models import write_code_pairs

from lorakit import PeftModel
from lorakit.checkpoints import list_checkpoints
from lorakit.train import TrainError, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
# dropout, accumulation and a short last micro-batch per epoch: the RNG and the data position must be restored
SETTINGS = dict(epochs=3, batch_size=5, grad_accum=2, lora={"lora_dropout": 0.1}, save_every=2, lr=5e-3)
STEPS = 9  # 24 rows in micro-batches of 5: 5 per epoch, 3 steps per epoch


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_code_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 24)


@pytest.fixture(scope="module")
def reference(tiny_base, data_file, tmp_path_factory):
    """The run that was never interrupted."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    assert train(cfg(tiny_base, data_file, out, **SETTINGS)).steps == STEPS
    return out


def assert_same_run(out, reference):
    want, got = load_file(str(reference / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))  # each step exactly once
    drop = ("tokens_per_s",)  # a timing
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref_rows]


# -- SIGKILL -------------------------------------------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import io, json, os, signal, sys, torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    torch.set_num_threads(1)  # as in the reference run, so the arithmetic is the same
    import lorakit.checkpoints
    from lorakit.train import TrainConfig, train
    config, kill_at_step, kill_in_write = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    steps = [0]
    def count(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)  # inside the step: after the update, before its row and checkpoint
    register_optimizer_step_post_hook(count)
    real_save = torch.save
    def save_then_die(obj, f, *args, **kwargs):  # the checkpoint's trainer state half written, then killed
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if kill_in_write:
        lorakit.checkpoints.torch.save = save_then_die
    result = train(TrainConfig(**config))
    print("RESULT", json.dumps({"steps": result.steps, "interrupted": result.interrupted}))
""")


def test_killed_at_three_random_points_and_resumed_equals_a_run_never_killed(tiny_base, data_file, reference,
                                                                              tmp_path):
    out = tmp_path / "killed"
    config = dataclasses.asdict(cfg(tiny_base, data_file, out, **SETTINGS))
    rng = random.Random(21)
    first = rng.randrange(1, STEPS)  # a step of the fresh run
    second = rng.randrange(1, 3)  # the resumed run dies in its first or second step
    points = f"killed in step {first}, in the first checkpoint write after resuming, then in step {second} after"

    def run(kill_at_step: int, kill_in_write: bool, resume: bool):
        args = [sys.executable, "-c", RUNNER, json.dumps({**config, "resume": resume}), str(kill_at_step),
                "1" if kill_in_write else "0"]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    done = run(first, False, False)
    assert done.returncode == -9, (points, done.stderr[-2000:])
    saved = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    assert saved == list(range(2, first, 2))[-config["keep_checkpoints"]:], points  # whole ones, the last kept

    done = run(0, True, True)  # resumes, dies half-way through writing its next checkpoint
    assert done.returncode == -9, (points, done.stderr[-2000:])
    assert [int(p.name.split("-")[1]) for p in list_checkpoints(out)] == saved, points  # no half checkpoint
    assert any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())  # the kill left its temp dir

    done = run(second, False, True)
    assert done.returncode == -9, (points, done.stderr[-2000:])
    assert not any(p.name.startswith(".tmp-") for p in (out / "checkpoints").iterdir())  # cleared on resuming

    assert train(cfg(tiny_base, data_file, out, resume=True, **SETTINGS)).steps == STEPS  # here: one thread too
    assert_same_run(out, reference)


# -- a full disk, a read-only directory ----------------------------------------------------------------------

class Disk:
    """Fail every atomic write (lorakit.io_utils) from a given optimizer step on, as a full or read-only disk does."""

    def __init__(self, monkeypatch, fail_from_step: int, error: int):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.steps, self.fail_from, self.error = 0, fail_from_step, error
        self.hook = register_optimizer_step_post_hook(self._count)
        real_fdopen, real_mkstemp, real_mkdtemp = os.fdopen, __import__("tempfile").mkstemp, \
            __import__("tempfile").mkdtemp
        disk = self

        class Full:  # a file whose writes fail, as on a full disk
            def __init__(self, f):
                self.f = f

            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        def fdopen(fd, *args, **kwargs):
            f = real_fdopen(fd, *args, **kwargs)
            return Full(f) if disk.failing and disk.error == errno.ENOSPC else f

        def read_only(real):
            def make(*args, **kwargs):
                if disk.failing and disk.error == errno.EROFS:
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))
                return real(*args, **kwargs)
            return make

        monkeypatch.setattr("lorakit.io_utils.os.fdopen", fdopen)
        monkeypatch.setattr("lorakit.io_utils.tempfile.mkstemp", read_only(real_mkstemp))
        monkeypatch.setattr("lorakit.checkpoints.tempfile.mkdtemp", read_only(real_mkdtemp))

    @property
    def failing(self) -> bool:
        return self.steps >= self.fail_from

    def _count(self, *args):
        self.steps += 1

    def mend(self):
        self.hook.remove()
        self.fail_from = 10 ** 9


@pytest.mark.parametrize("error,fail_from,last_good", [
    (errno.ENOSPC, 3, 2),  # the disk fills during step 3: the checkpoint of step 4 cannot be written
    (errno.ENOSPC, STEPS, 8),  # ... during the last step: the adapter cannot be written
    (errno.EROFS, 5, 4),  # the directory becomes read-only during step 5
])
def test_a_full_disk_or_a_read_only_directory_stops_with_a_clear_message_and_loses_nothing(
        tiny_base, data_file, reference, tmp_path, monkeypatch, error, fail_from, last_good):
    out = tmp_path / "run"
    disk = Disk(monkeypatch, fail_from, error)
    strerror = os.strerror(error).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(TrainError, match=rf"could not write .*: {strerror} \({errno.errorcode[error]}\)\. Files "
                                         rf"written before are intact; the last checkpoint, .*step-0000{last_good:02d}, "
                                         r"is intact: fix that, then run the same command with --resume"):
        train(cfg(tiny_base, data_file, out, **SETTINGS))
    disk.mend()
    assert [p.name for p in list_checkpoints(out)][-1] == f"step-0000{last_good:02d}"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]  # no half-written files
    assert not (out / "adapter_model.safetensors").exists() and not (out / "lorakit_train.json").exists()
    assert not [p for p in out.rglob("*.tmp")]
    for checkpoint in list_checkpoints(out):  # each one a whole adapter
        PeftModel.from_pretrained(_tiny(tiny_base), checkpoint)
    # space freed: the same command with --resume finishes the run as if nothing had happened
    assert train(cfg(tiny_base, data_file, out, resume=True, **SETTINGS)).steps == STEPS
    assert_same_run(out, reference)


def _tiny(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base)


# -- NaN -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nan_at,last_good", [(5, 4), (1, None)])
def test_a_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tiny_base, data_file, tmp_path,
                                                                            monkeypatch, nan_at, last_good):
    import lorakit.train as train_module

    real, calls = train_module.accumulate_gradients, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return float("nan") if calls[0] == nan_at else loss

    monkeypatch.setattr(train_module, "accumulate_gradients", poisoned)
    out = tmp_path / "run"
    where = (rf"The last good checkpoint is .*step-0000{last_good:02d}: resume from it with --resume"
             if last_good else "No checkpoint had been written yet")
    with pytest.raises(TrainError, match=rf"the loss at step {nan_at} is nan \(gradient norm .*\): training stopped "
                                         rf"without saving the adapter\. {where}"):
        train(cfg(tiny_base, data_file, out, **SETTINGS))
    assert not (out / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, nan_at)) and all(r["loss"] == r["loss"] for r in rows)
    assert [p.name for p in list_checkpoints(out)] == [f"step-{s:06d}" for s in range(2, nan_at, 2)]
    for checkpoint in list_checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(str(checkpoint / "adapter_model.safetensors")).values())
