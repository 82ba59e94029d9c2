"""Checkpoints: written whole or not at all, pruned, refused when settings change, resumed with the same result."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_train_config as cfg
from tiny_models import write_code_pairs

from lorakit.checkpoints import list_checkpoints
from lorakit.train import TrainConfig, TrainError, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_code_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 24)


def test_a_failed_write_leaves_no_checkpoint_and_old_ones_are_pruned(tiny_base, data_file, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(cfg(tiny_base, data_file, out, max_steps=4, save_every=1, keep_checkpoints=2))
    assert [p.name for p in list_checkpoints(out)] == ["step-000002", "step-000003"]  # none at the last step

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    shutil.rmtree(out / "checkpoints" / "step-000003")  # so the resumed run writes step 3 again
    monkeypatch.setattr("lorakit.checkpoints.torch.save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(cfg(tiny_base, data_file, out, max_steps=4, save_every=1, keep_checkpoints=2, resume=True))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002"]  # no half-written step-3, no temp dir


def test_existing_checkpoints_and_changed_settings_are_refused(tiny_base, data_file, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_base, data_file, out, max_steps=2, save_every=1))
    with pytest.raises(TrainError, match="already holds the result of a finished run; choose another --out"):
        train(cfg(tiny_base, data_file, out, max_steps=2))
    (out / "lorakit_train.json").rename(tmp_path / "info.json")  # as a killed run leaves it
    with pytest.raises(TrainError, match="already holds checkpoints.*--resume"):
        train(cfg(tiny_base, data_file, out, max_steps=2))
    (tmp_path / "info.json").rename(out / "lorakit_train.json")
    with pytest.raises(TrainError, match=r"lr: 0\.005 -> 0\.001"):
        train(cfg(tiny_base, data_file, out, max_steps=2, lr=1e-3, resume=True))
    with pytest.raises(TrainError, match=r"dora: False -> True"):
        train(cfg(tiny_base, data_file, out, lora={"use_dora": True}, max_steps=2, resume=True))
    # A checkpoint written before a setting existed resumes when that setting keeps its default.
    for state_file in out.glob("checkpoints/*/trainer_state.pt"):
        state = torch.load(state_file, weights_only=False)
        for newer in ("attention", "lr_scheduler"):
            state["config"].pop(newer)
        for newer in ("use_dora", "use_rslora"):
            state["config"]["lora"].pop(newer)
        torch.save(state, state_file)
    assert train(cfg(tiny_base, data_file, out, max_steps=2, resume=True)).steps == 2
    # the same file with other rows would not continue the run; the order of --targets does not matter
    shutil.copy(data_file, tmp_path / "mine.jsonl")
    train(cfg(tiny_base, tmp_path / "mine.jsonl", tmp_path / "run2", max_steps=2, save_every=1))
    write_code_pairs(tmp_path / "mine.jsonl", 10)
    with pytest.raises(TrainError, match="training data .* has changed since the interrupted run"):
        train(cfg(tiny_base, tmp_path / "mine.jsonl", tmp_path / "run2", max_steps=2, resume=True))
    shutil.copy(data_file, tmp_path / "mine.jsonl")
    again = cfg(tiny_base, tmp_path / "mine.jsonl", tmp_path / "run2", max_steps=2, resume=True)
    reversed_targets = dataclasses.replace(again.lora, target_modules=list(reversed(again.lora.target_modules)))
    assert train(dataclasses.replace(again, lora=reversed_targets)).steps == 2
    with pytest.raises(TrainError, match="full fine-tuning cannot train 4-bit"):
        TrainConfig(data="x", full=True, quantize="nf4")
    with pytest.raises(TrainError, match="--data"):
        TrainConfig()
    # values from YAML keep their YAML types: "1e-3" is a string and "no" is not False
    with pytest.raises(TrainError, match=r"lr must be a number, got '1e-3' \(str\)"):
        TrainConfig(data="x", lr="1e-3")
    with pytest.raises(TrainError, match="bf16 must be true or false, got 'no'"):
        TrainConfig(data="x", bf16="no")
    with pytest.raises(TrainError, match="log_every must be >= 1"):
        TrainConfig(data="x", log_every=0)
    with pytest.raises(TrainError, match="is a file; training writes a directory there"):
        train(cfg(tiny_base, data_file, data_file, max_steps=1))


RUNNER = textwrap.dedent("""
    import json, os, signal, sys, torch
    from torch.optim.optimizer import register_optimizer_step_post_hook
    torch.set_num_threads(1)  # as in the reference run, so the arithmetic is the same
    from lorakit.train import TrainConfig, train
    config, stop_after, sig = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    count = [0]
    def hook(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == stop_after:
            os.kill(os.getpid(), getattr(signal, sig))
    register_optimizer_step_post_hook(hook)
    result = train(TrainConfig(**config))
    print("RESULT", json.dumps({"steps": result.steps, "interrupted": result.interrupted}))
    sys.exit(130 if result.interrupted else 0)
""")


def test_resume_after_sigint_and_sigkill_matches_an_uninterrupted_run(tiny_base, data_file, tmp_path):
    # dropout > 0, NEFTune noise, accumulation and a short last step per epoch: RNG and data position must be
    # restored
    settings = dict(epochs=4, batch_size=5, grad_accum=2, lora={"lora_dropout": 0.1}, save_every=2, lr=5e-3,
                    neftune_alpha=5.0)
    reference = train(cfg(tiny_base, data_file, tmp_path / "ref", **settings))
    assert reference.steps == 12

    out = tmp_path / "killed"
    config = dataclasses.asdict(cfg(tiny_base, data_file, out, **settings))

    def run(stop_after, sig, resume):
        args = [sys.executable, "-c", RUNNER, json.dumps({**config, "resume": resume}), str(stop_after), sig]
        return subprocess.run(args, capture_output=True, text=True, timeout=300)

    first = run(5, "SIGINT", False)  # Ctrl-C during step 5: checkpoint step 5, exit cleanly
    assert first.returncode == 130, first.stderr[-2000:]
    assert '"interrupted": true' in first.stdout and "Ctrl-C" in first.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000004", "step-000005"]
    assert not (out / "adapter_model.safetensors").exists()

    second = run(2, "SIGKILL", True)  # resumes at 5, checkpoints at 6, killed inside step 7
    assert second.returncode == -9, second.stderr[-2000:]
    assert "resuming from" in second.stdout and "step 5/12" in second.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000005", "step-000006"]

    third = run(0, "SIGKILL", True)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "step 6/12" in third.stdout and '"steps": 12' in third.stdout

    want = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and len(want) == 16
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert any(v.abs().max() > 1e-3 for k, v in want.items() if "lora_B" in k)
    ref_rows = [json.loads(l) for l in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))  # each step exactly once
    for a, b in zip(ref_rows, rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
