"""Multi-process training under torchrun (DDP and FSDP on Gloo): same result as one process, stop and resume."""

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
from tiny_models import tiny_train_config, write_code_pairs

from lorakit.distributed import DistributedError, World, process_device, share, world_from_env
from lorakit.train import TrainConfig, TrainError, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # 25 rows in micro-batches of 4: the last micro-batch of an epoch has one row, so the second
    # process gets none of it and must run a stand-in.
    return write_code_pairs(tmp_path_factory.mktemp("ddp_data") / "train.jsonl", 25)


def settings(tiny_base, data_file, out, **changes) -> dict:
    """tiny_train_config with an eval set, accumulation and 2 epochs (8 steps), as a dict for the CLI too."""
    config = tiny_train_config(tiny_base, data_file, out, eval_data=data_file, grad_accum=2, epochs=2, **changes)
    return dataclasses.asdict(config)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def cli_args(config: dict) -> list[str]:
    flags = {"base": "--base", "data": "--data", "eval_data": "--eval-data", "out": "--out", "r": "--lora-r",
             "alpha": "--alpha", "batch_size": "--batch-size", "grad_accum": "--grad-accum", "epochs": "--epochs",
             "lr": "--lr", "dropout": "--dropout", "save_every": "--save-every", "max_steps": "--max-steps"}
    lora = config["lora"]
    config = {**config, "r": lora["r"], "alpha": lora["lora_alpha"], "dropout": lora["lora_dropout"]}
    args = [part for key, flag in flags.items() if config.get(key) is not None for part in (flag, str(config[key]))]
    switches = [f"--{key}" for key in ("resume", "fsdp") if config.get(key)]
    return args + switches + ["--no-progress"]


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def assert_same_adapter(got_dir, want_dir, atol):
    want = load_file(str(want_dir / "adapter_model.safetensors"))
    got = load_file(str(got_dir / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and len(want) == 16
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=atol)
    assert any(v.abs().max() > 1e-3 for k, v in want.items() if "lora_B" in k)  # it did train


def test_world_from_torchrun_environment():
    assert world_from_env({}) == World() and not World().is_distributed and World().is_main
    world = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank, world.is_distributed, world.is_main) == (3, 4, 1, True, False)
    with pytest.raises(DistributedError, match="RANK=4 does not fit WORLD_SIZE=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(DistributedError, match="must be integers"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_micro_batch_rows_are_dealt_out_and_an_empty_share_gets_a_stand_in():
    batch = [7, 3, 9, 1, 4]
    shares = [share(batch, World(rank, 2)) for rank in range(2)]
    assert shares == [([7, 9, 4], False), ([3, 1], False)]
    assert share([5], World(0, 2)) == ([5], False)
    assert share([5], World(1, 2)) == ([5], True)  # runs the row, its loss counts zero
    assert share(batch, World()) == (batch, False)


def test_one_gpu_per_process():
    world = World(1, 2, local_rank=1)
    assert process_device(world, torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(DistributedError, match="--device cuda:0 would put 2 processes on one GPU"):
        process_device(world, torch.device("cuda", 0))
    assert process_device(World(), torch.device("cuda", 0)) == torch.device("cuda", 0)


@pytest.mark.parametrize("strategy", ["DDP", "FSDP"])
def test_two_processes_train_what_one_process_trains(tiny_base, data_file, tmp_path, strategy):
    config = settings(tiny_base, data_file, tmp_path / "ddp", fsdp=strategy == "FSDP")
    ran = torchrun("-m", "lorakit", "train", *cli_args(config))
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("trained 8 steps") == 1  # one summary, from process 0
    assert f"2 processes (torchrun), {strategy} over cpu" in ran.stdout

    single = train(TrainConfig(**settings(tiny_base, data_file, tmp_path / "single")))
    assert single.steps == 8
    assert_same_adapter(tmp_path / "ddp", tmp_path / "single", atol=1e-5)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), abs=1e-5)
    info = json.loads((tmp_path / "ddp" / "lorakit_train.json").read_text())["result"]
    assert info["eval_loss"] == pytest.approx(single.eval_loss, abs=1e-5)
    assert info["tokens"] == single.tokens  # every process's rows counted once


RUNNER = textwrap.dedent("""
    import json, os, signal, sys
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from lorakit.train import TrainConfig, train
    config, stop_after = json.loads(sys.argv[1]), int(sys.argv[2])
    count = [0]
    def hook(optimizer, args, kwargs):
        count[0] += 1
        if count[0] == stop_after and os.environ["RANK"] == "1":  # only one process is told to stop
            os.kill(os.getpid(), signal.SIGTERM)
    register_optimizer_step_post_hook(hook)
    result = train(TrainConfig(**config))
    # one write per process: two processes' prints to one pipe would interleave word by word
    line = "RESULT " + os.environ["RANK"] + " " + json.dumps({"steps": result.steps, "interrupted": result.interrupted})
    sys.stdout.write(line + "\\n")
    sys.stdout.flush()
""")


@pytest.mark.parametrize("fsdp", [False, True], ids=["DDP", "FSDP"])
def test_sigterm_to_one_process_checkpoints_all_and_resume_matches_an_uninterrupted_run(
        tiny_base, data_file, tmp_path, capsys, fsdp):
    # dropout > 0: each process's RNG must come back from the checkpoint, not just process 0's
    reference = settings(tiny_base, data_file, tmp_path / "ref", lora={"lora_dropout": 0.1}, save_every=2, fsdp=fsdp)
    ran = torchrun("-m", "lorakit", "train", *cli_args(reference))
    assert ran.returncode == 0, ran.stderr[-3000:]

    out = tmp_path / "stopped"
    config = settings(tiny_base, data_file, out, lora={"lora_dropout": 0.1}, save_every=2, fsdp=fsdp)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    first = torchrun(str(runner), json.dumps(config), "3")
    assert 'RESULT 0 {"steps": 3, "interrupted": true}' in first.stdout, first.stderr[-3000:]
    assert 'RESULT 1 {"steps": 3, "interrupted": true}' in first.stdout
    assert "lorakit (process 1): SIGTERM: saving a checkpoint" in first.stdout
    assert sorted(os.listdir(out / "checkpoints")) == ["step-000002", "step-000003"]
    state = torch.load(out / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=False)
    assert len(state["process_rngs"]) == 2
    assert not torch.equal(state["process_rngs"][0]["torch"], state["process_rngs"][1]["torch"])

    # A DDP checkpoint also resumes on one process (same batches; dropout draws differ, as it says). An
    # FSDP one keeps the optimizer state by parameter name: it resumes with --fsdp, and says so.
    shutil.copytree(out, tmp_path / "one")
    alone = TrainConfig(**{**config, "out": str(tmp_path / "one"), "fsdp": False, "resume": True})
    if fsdp:
        with pytest.raises(TrainError, match="written by a run with --fsdp.*resume with --fsdp"):
            train(alone)
    else:
        assert train(alone).steps == 8
        assert "written by 2 process(es), this run has 1" in capsys.readouterr().out

    resumed = torchrun("-m", "lorakit", "train", *cli_args({**config, "resume": True}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 3/8" in resumed.stdout
    assert_same_adapter(out, tmp_path / "ref", atol=1e-6)
    assert losses(out) == pytest.approx(losses(tmp_path / "ref"), abs=1e-6)


def test_fsdp_needs_torchrun_and_a_float_base(tiny_base, data_file, tmp_path):
    with pytest.raises(TrainError, match="single process: start it with torchrun"):
        train(TrainConfig(**settings(tiny_base, data_file, tmp_path / "o", fsdp=True)))
    with pytest.raises(TrainError, match="train QLoRA with DDP"):
        TrainConfig(**settings(tiny_base, data_file, tmp_path / "o", fsdp=True, quantize="nf4"))
