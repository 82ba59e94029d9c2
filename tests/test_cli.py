"""The lorakit command: subcommands, option precedence, the train/eval contract, merge, inspect, chat."""

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.cli import build_parser, main
from lorakit.cli.evaluate import eval_options_from_args
from lorakit.cli.options import CliError, config_keys
from lorakit.cli.train import add_train_options, train_config_from_args

SUBCOMMANDS = ["train", "eval", "generate", "chat", "merge", "inspect", "export", "serve", "demo"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_data") / "pairs.jsonl"
    rows = [{"question": f"What is the code for room {i}?", "answer": f"Room {i} uses code {1000 + 37 * i}."}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_base, data_file, tmp_path_factory):
    """`lorakit train` with the documented contract flags; returns (out dir, captured stdout)."""
    out = tmp_path_factory.mktemp("cli_run") / "adapter"
    args = ["train", "--base", tiny_base, "--data", data_file, "--eval-data", data_file, "--out", str(out),
            "--r", "4", "--alpha", "8", "--targets", "q_proj,v_proj", "--dropout", "0", "--epochs", "2",
            "--lr", "0.02", "--batch-size", "4", "--seed", "3", "--query-field", "question",
            "--response-field", "answer", "--no-progress"]
    return out, _run_main(args)


def _run_main(args, capsys=None):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(args)
    assert code == 0, buf.getvalue()
    return buf.getvalue()


def test_help_lists_every_subcommand_and_each_has_help(capsys):
    result = subprocess.run([sys.executable, "-m", "lorakit.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert f"\n    {name}" in result.stdout
    for name in SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert f"usage: lorakit {name}" in capsys.readouterr().out


def test_config_file_values_are_overridden_by_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("data: from_file.jsonl\nr: 4\nlr: 0.01\ntargets: [q_proj, v_proj]\nmax-steps: 7\nbf16: true\n")
    parser = build_parser()
    config = train_config_from_args(parser.parse_args(["train", "--config", str(yaml_file), "--r", "8"]))
    assert (config.data, config.lora.r, config.lr, config.lora.target_modules, config.max_steps, config.bf16) == \
        ("from_file.jsonl", 8, 0.01, ["q_proj", "v_proj"], 7, True)
    assert config.lora.lora_alpha == 32 and config.epochs == 3  # untouched: the dataclass defaults
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"data": "a.jsonl", "lr": 0.5, "targets": "k_proj,o_proj"}))
    config = train_config_from_args(parser.parse_args(["train", "--config", str(json_file), "--lr", "0.25",
                                                       "--data", "b.jsonl"]))
    assert (config.data, config.lr, config.lora.target_modules) == ("b.jsonl", 0.25, ["k_proj", "o_proj"])
    config = train_config_from_args(parser.parse_args(["train", "--data", "a.jsonl", "--dora", "--rslora"]))
    assert config.lora.use_dora and config.lora.use_rslora and not train_config_from_args(
        parser.parse_args(["train", "--data", "a.jsonl"])).lora.use_dora
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: x\nlearning_rate: 0.1\n")
    with pytest.raises(CliError, match="unknown option.*learning_rate.*valid options:.*lr"):
        train_config_from_args(parser.parse_args(["train", "--config", str(bad)]))
    with pytest.raises(CliError, match="no training data"):
        train_config_from_args(parser.parse_args(["train"]))


def test_train_contract_writes_adapter_and_prints_one_line_summary(trained):
    out, stdout = trained
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("trained 6 steps (2.00 epochs)") and f"saved to {out}" in last
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    info = json.loads((out / "lorakit_train.json").read_text())
    assert info["config"]["seed"] == 3 and info["config"]["query_field"] == "question"


def test_eval_contract_prints_table_summary_and_writes_json(trained, tiny_base, data_file, tmp_path):
    out, _ = trained
    report = tmp_path / "scores.json"
    # field names come from the adapter's lorakit_train.json; no --query-field needed
    stdout = _run_main(["eval", "--base", tiny_base, "--adapter", str(out), "--data", data_file,
                        "--json", str(report), "--max-new-tokens", "6", "--limit", "4"])
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith(f"eval on 4 rows of {data_file}: accuracy base ")
    assert "response perplexity" in stdout and "answer accuracy (key facts)" in stdout
    saved = json.loads(report.read_text())
    assert saved["n"] == 4 and saved["rows"][1]["facts"] == ["1", "1037"]
    assert saved["tuned"]["perplexity"] < saved["base"]["perplexity"]  # it learned the training rows


def test_inspect_reports_rank_targets_params_and_size(trained, capsys):
    out, _ = trained
    main(["inspect", str(out), "--json"])
    info = json.loads(capsys.readouterr().out)
    # q_proj: A 4x32 + B 32x4; v_proj: A 4x32 + B 16x4; two layers
    assert info["parameters"] == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4) == 896
    assert info["r"] == 4 and info["adapted_modules"] == 4 and info["tensors"] == 8
    assert info["training"]["steps"] == 6
    # the weights file alone; the directory also holds metrics.jsonl, loss_curve.png and lorakit_train.json
    weights_bytes = (out / "adapter_model.safetensors").stat().st_size
    assert info["weights_bytes"] == weights_bytes and info["weights_file"] == "adapter_model.safetensors"
    assert info["directory_bytes"] > weights_bytes + (out / "loss_curve.png").stat().st_size
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "rank r" in text and "q_proj, v_proj" in text and "896 in 8 tensors" in text
    assert f"weights size    {weights_bytes / 1024:.1f} KiB (adapter_model.safetensors)" in text
    assert "directory size" in text and "trained         6 steps on" in text
    assert "variants" not in text


def test_inspect_names_dora_and_rslora(tmp_path, capsys):
    from lorakit import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, use_rslora=True))
    model.save_pretrained(tmp_path)
    main(["inspect", str(tmp_path)])
    assert "variants        DoRA, rsLoRA (alpha / sqrt(r))" in capsys.readouterr().out


def test_merge_writes_a_model_plain_transformers_loads(trained, tiny_base, tmp_path):
    out, _ = trained
    merged_dir = tmp_path / "merged"
    stdout = _run_main(["merge", "--base", tiny_base, "--adapter", str(out), "--out", str(merged_dir)])
    assert str(merged_dir) in stdout
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(out))
    x = torch.randint(0, 49152, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, lora(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file()
    assert main(["merge", "--base", tiny_base, "--adapter", str(out), "--out", str(merged_dir)]) == 2  # not empty


def test_generate_and_chat_switch_between_adapter_and_base(trained, tiny_base, monkeypatch, capsys):
    out, _ = trained
    assert main(["generate", "--base", tiny_base, "--adapter", str(out), "--max-new-tokens", "5",
                 "What is the code for room 3?"]) == 0
    with_adapter = capsys.readouterr().out.strip()
    assert main(["generate", "--base", tiny_base, "--max-new-tokens", "5", "What is the code for room 3?"]) == 0
    base_only = capsys.readouterr().out.strip()
    assert with_adapter != base_only
    assert main(["generate", "--base", tiny_base, "--max-new-tokens", "5", "--device", "cpu",
                 "What is the code for room 3?"]) == 0
    assert capsys.readouterr().out.strip() == base_only

    lines = iter(["/adapters", "What is the code for room 3?", "word " * 600, "/base", "What is the code for room 3?",
                  "/adapter nope", "/adapter default", "/reset", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--base", tiny_base, "--adapter", f"default={out}", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    replies = [l.split("assistant> ", 1)[1] for l in text.splitlines() if "assistant> " in l]
    # a multi-turn chat: the second answer sees the first, so compare with the one-shot answers loosely
    assert len(replies) == 2 and replies[0] == with_adapter
    assert "using the base model" in text and "no adapter 'nope'" in text and "using adapter default" in text
    # a turn past the model's context (512 here) is refused with what to do, and the chat goes on
    assert "reads at most 511: /reset to start over" in text


def test_errors_are_one_line_with_exit_status_2(tiny_base, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "response": "b"}\n{"query": "c", "reply": "d"}\n')
    assert main(["train", "--base", tiny_base, "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"lorakit train: error: {bad}:2: missing field 'response'" in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "has no adapter_config.json" in capsys.readouterr().err
    assert main(["eval", "--base", tiny_base, "--adapter", str(tmp_path / "missing"), "--data", str(bad)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["generate", "--base", tiny_base, "--device", "gpu0", "hi"]) == 2
    assert "lorakit generate: error: unknown device 'gpu0': use auto, cpu, cuda or cuda:N" in capsys.readouterr().err


@pytest.mark.parametrize("bf16_speedup", [1.7, 0.15])  # a CPU with bf16 units; an AVX2-only one
def test_demo_command_on_a_tiny_base(tiny_base, tmp_path, monkeypatch, bf16_speedup):
    """The demo's wiring (train on the shipped data, score, report); the real run is `make demo`."""
    import lorakit.precision

    monkeypatch.setattr(lorakit.precision, "bf16_matmul_speedup", lambda device: bf16_speedup)
    out = tmp_path / "demo"
    (out / "checkpoints" / "step-000005").mkdir(parents=True)  # what an earlier demo run left
    (out / "checkpoints" / "step-000005" / "trainable.safetensors").write_text("stale")
    (out / "lorakit_train.json").write_text("{}")
    (out / "metrics.jsonl").write_text("stale\n")
    stdout = _run_main(["demo", "--base", tiny_base, "--out", str(out), "--max-steps", "2", "--eval-limit", "3"])
    assert "fine-tune" in stdout and "r=16 on q_proj,k_proj,v_proj,o_proj" in stdout
    assert "trained 2 steps" in stdout and "3 held-out questions" in stdout
    assert f"adapter saved to {out.resolve()}" in stdout
    assert stdout.strip().splitlines()[-1].startswith("eval on 3 rows")
    assert not (out / "checkpoints").exists() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "lorakit_train.json").read_text())["result"]["steps"] == 2
    assert json.loads((out / "eval.json").read_text())["n"] == 3
    assert f"the run on one page (open it in a browser): {out / 'report.html'}" in stdout  # with the eval's answers
    assert (out / "report.html").read_text().count('<article class="q"') == 3
    bf16 = bf16_speedup > 1
    assert f"precision: {'bf16 autocast' if bf16 else 'float32'} (bf16 matmuls run {bf16_speedup:.2f}x" in stdout
    recorded = json.loads((out / "lorakit_train.json").read_text())["config"]
    assert recorded["bf16"] is bf16 and recorded["attention"] == ("eager" if bf16 else "sdpa")


def _exit_code_and_error(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_demo_refuses_an_out_dir_it_did_not_write(tiny_base, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    (out / "lorakit_train.json").write_text("{}")  # a lorakit marker does not make the other files ours
    code, err = _exit_code_and_error(["demo", "--base", tiny_base, "--out", str(out), "--max-steps", "1",
                                      "--eval-limit", "1"], capsys)
    assert code == 2 and "is not empty and is not the output of an earlier lorakit demo" in err
    assert "choose another --out or empty it" in err and (out / "notes.txt").read_text() == "the user's own file"
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _exit_code_and_error(["demo", "--base", tiny_base, "--out", str(afile), "--max-steps", "1"], capsys)
    assert code == 2 and "is a file" in err and afile.read_text() == "x"


def test_merge_refuses_to_replace_its_adapter_a_file_or_an_unwritable_place(trained, tiny_base, tmp_path, capsys,
                                                                            monkeypatch):
    adapter = tmp_path / "work" / "adapter"
    shutil.copytree(trained[0], adapter)
    files = sorted(p.name for p in adapter.iterdir())
    merge = ["merge", "--base", tiny_base, "--adapter", str(adapter), "--force", "--out"]
    for out, where in ((adapter, "is"), (adapter / "merged", "is inside"), (tmp_path / "work", "contains")):
        code, err = _exit_code_and_error(merge + [str(out)], capsys)
        assert code == 2 and f"{where} the adapter directory" in err and "Choose an --out outside it" in err
    assert sorted(p.name for p in adapter.iterdir()) == files
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _exit_code_and_error(merge + [str(afile)], capsys)
    assert code == 2 and "is a file; merge writes a model directory there" in err
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    code, err = _exit_code_and_error(merge + [str(notes)], capsys)  # --force replaces an earlier merge only
    assert code == 2 and "holds no model (no config.json)" in err and (notes / "todo.txt").is_file()
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # the tests may run as root, whom chmod does not stop
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    code, err = _exit_code_and_error(merge + [str(locked / "sub" / "merged")], capsys)
    assert code == 2 and f"{locked} is not writable" in err


def test_config_file_values_are_checked_and_converted_to_the_option_types(tmp_path):
    parser = build_parser()

    def train_config(text):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return train_config_from_args(parser.parse_args(["train", "--config", str(path)]))

    # PyYAML reads 1e-3 as a string; flag spellings from --help work as keys
    config = train_config("data: a.jsonl\nlr: 1e-3\nlora-r: 8\nno-progress: true\nbf16: 'no'\n"
                          "targets: q_proj, v_proj\nmax_steps: '5'\nalpha: 16\n")
    assert (config.lr, config.lora.r, config.progress, config.bf16, config.lora.target_modules, config.max_steps,
            config.lora.lora_alpha) == \
        (0.001, 8, False, False, ["q_proj", "v_proj"], 5, 16.0)
    assert train_config("data: a.jsonl\nprogress: false\ndora: yes\n").progress is False
    for line, message in (("r: four", "r: expected a positive integer, got 'four'"),
                          ("targets: 5", "targets: expected a list of names or a comma-separated string, got 5"),
                          ("bf16: maybe", "bf16: expected true or false, got 'maybe'"),
                          ("batch_size: 0", "batch_size: expected a positive integer, got 0"),
                          ("lr: fast", "lr: expected a number > 0, got 'fast'"),
                          ("epochs: 2.5", "epochs: expected a positive integer, got 2.5"),
                          ("too_long: cut", "too_long: expected one of truncate, skip, got 'cut'"),
                          ("base: 5", "base: expected a string, got 5"),
                          ("lr:", "lr has no value"),
                          ("r: 4\nlora-r: 8", "r and lora_r set the same option")):
        with pytest.raises(CliError, match=re.escape(message)):
            train_config("data: a.jsonl\n" + line + "\n")

    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text(f"data: d.jsonl\nadapter: runs/a\njson: {tmp_path / 'e.json'}\nno-base: true\n"
                         "batch-size: '4'\nmax_new_tokens: 12\n")
    opts = eval_options_from_args(parser.parse_args(["eval", "--config", str(eval_file)]))
    assert (opts["json_out"], opts["include_base"], opts["batch_size"], opts["max_new_tokens"]) == \
        (str(tmp_path / "e.json"), False, 4, 12)
    eval_file.write_text("data: d.jsonl\nlimit: 0\n")
    with pytest.raises(CliError, match="limit: expected a positive integer, got 0"):
        eval_options_from_args(parser.parse_args(["eval", "--config", str(eval_file)]))


@pytest.mark.parametrize("args", [
    ["eval", "--data", "d.jsonl", "--batch-size", "0"],
    ["eval", "--data", "d.jsonl", "--max-new-tokens", "0"],
    ["eval", "--data", "d.jsonl", "--limit", "0"],
    ["eval", "--data", "d.jsonl", "--limit", "-1"],
    ["generate", "--max-new-tokens", "0", "hello"],
    ["chat", "--max-new-tokens", "0"],
    ["demo", "--eval-batch-size", "0"],
    ["train", "--data", "d.jsonl", "--log-every", "0"],
])
def test_sizes_and_counts_below_one_are_refused_when_parsed(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "expected a positive integer" in capsys.readouterr().err


def test_eval_refuses_an_unwritable_json_path_and_nothing_to_score(tiny_base, data_file, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = _exit_code_and_error(["eval", "--base", tiny_base, "--data", data_file, "--json", str(afile / "e.json"),
                                      "--limit", "1", "--max-new-tokens", "2", "--query-field", "question",
                                      "--response-field", "answer"], capsys)
    assert code == 2 and f"{afile} is a file, not a directory" in err
    code, err = _exit_code_and_error(["eval", "--base", tiny_base, "--data", data_file, "--no-base"], capsys)
    assert code == 2 and "--no-base without --adapter leaves nothing to score" in err


def test_a_full_model_directory_as_adapter_points_to_base(tiny_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", lambda prompt="": "/quit")
    for args in (["generate", "--base", tiny_base, "--adapter", tiny_base, "hello"],
                 ["chat", "--base", tiny_base, "--adapter", f"full={tiny_base}"],
                 ["merge", "--base", tiny_base, "--adapter", tiny_base, "--out", str(tmp_path / "merged")]):
        code, err = _exit_code_and_error(args, capsys)
        assert code == 2 and f"--adapter {tiny_base} is a full model directory" in err
        assert f"pass it as --base {tiny_base} instead" in err


def test_chat_refuses_two_adapters_with_one_name(trained, tiny_base, tmp_path, monkeypatch, capsys):
    for folder in ("other", "runs"):
        shutil.copytree(trained[0], tmp_path / folder / "a")
    monkeypatch.setattr("builtins.input", lambda prompt="": "/quit")
    first, second = tmp_path / "other" / "a", tmp_path / "runs" / "a"
    for adapters in ([f"a={first}", str(second)], [str(trained[0]), str(first), str(second)]):
        code, err = _exit_code_and_error(["chat", "--base", tiny_base] +
                                         [arg for a in adapters for arg in ("--adapter", a)], capsys)
        assert code == 2 and f"two adapters are named 'a' ({first} and {second})" in err
        assert "name them with --adapter NAME=PATH" in err
    # a name the engine does not take (its rule, checked before the model loads)
    code, err = _exit_code_and_error(["chat", "--base", tiny_base, "--adapter", f"a b={first}"], capsys)
    assert code == 2 and "Invalid adapter name 'a b'" in err and f"Name it with --adapter NAME={first}" in err


def test_inspect_names_a_damaged_file(trained, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(trained[0], adapter)
    config_text = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text(config_text[: len(config_text) // 2])
    code, err = _exit_code_and_error(["inspect", str(adapter)], capsys)
    assert code == 2 and f"{adapter / 'adapter_config.json'} is not valid JSON" in err
    (adapter / "adapter_config.json").write_text(config_text)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _exit_code_and_error(["inspect", str(adapter)], capsys)
    assert code == 2 and f"{weights} cannot be read" in err and "truncated or corrupt" in err


def test_inspect_counts_one_step_in_the_singular(tmp_path, capsys):
    from lorakit import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    (tmp_path / "lorakit_train.json").write_text(json.dumps(
        {"config": {"data": "d.jsonl"}, "result": {"steps": 1, "first_loss": 2.0, "final_loss": 1.5}}))
    main(["inspect", str(tmp_path)])
    assert "trained         1 step on d.jsonl, loss 2.000 -> 1.500" in capsys.readouterr().out


def test_generate_drops_the_newline_that_ends_a_piped_prompt(tiny_base, monkeypatch, capsys):
    from lorakit.serve.engine import Engine

    seen = []

    def fake_generate(engine, prompt_ids, adapter=None, params=None, timeout=600.0):
        seen.append(engine.tokenizer.decode(prompt_ids))
        return "ok", [], "stop"

    monkeypatch.setattr(Engine, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the code for room 3?\n"))
    assert main(["generate", "--base", tiny_base]) == 0
    assert main(["generate", "--base", tiny_base, "What is the code for room 3?"]) == 0
    assert len(seen) == 2 and seen[0] == seen[1] and "What is the code for room 3?<" in seen[0]
    assert capsys.readouterr().out == "ok\nok\n"


def test_help_states_the_defaults(capsys):
    from lorakit.train import TrainConfig

    options = config_keys(add_train_options)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for dest in ("warmup_ratio", "weight_decay", "max_grad_norm", "eval_every", "save_every", "log_every",
                 "keep_checkpoints"):
        stated = re.search(r"\(default ([0-9.]+)", options[dest].help)
        assert stated and float(stated.group(1)) == defaults[dest], dest
    for command, phrases in (("serve", ["(default 8000)", "(default float32)", "(default info)"]),
                             ("demo", ["generation batch size (default 32)"])):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for phrase in phrases:
            assert phrase in text, (command, phrase)


def test_a_qlora_adapter_runs_and_merges_on_the_nf4_base_it_was_trained_on(trained, tiny_base, data_file, tmp_path,
                                                                           capsys):
    from lorakit.models import load_base_for_adapters

    qlora = tmp_path / "qlora"
    _run_main(["train", "--base", tiny_base, "--data", data_file, "--out", str(qlora), "--quantize", "nf4",
               "--targets", "q_proj,v_proj", "--query-field", "question", "--response-field", "answer",
               "--max-steps", "2", "--lr", "0.02", "--no-progress"])
    assert "QLoRA" in _run_main(["inspect", str(qlora)])
    stdout = _run_main(["merge", "--base", tiny_base, "--adapter", str(qlora), "--out", str(tmp_path / "merged")])
    assert "trained on a nf4 base (QLoRA): using the nf4-rounded base weights" in stdout
    nf4_base = load_base_for_adapters(tiny_base, quantize="nf4")[0]
    expected = PeftModel.from_pretrained(nf4_base, str(qlora))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = torch.randint(0, 49152, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, expected(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    assert main(["generate", "--base", tiny_base, "--adapter", str(qlora), "--max-new-tokens", "3", "Hi"]) == 0
    assert "nf4-rounded base" in capsys.readouterr().out
    code, err = _exit_code_and_error(["chat", "--base", tiny_base, "--adapter", f"q={qlora}",
                                      "--adapter", f"plain={trained[0]}"], capsys)
    assert code == 2 and "on the full-precision base; load them in separate sessions" in err


def test_without_base_the_adapter_runs_on_the_base_it_records(trained, tiny_base, capsys):
    out, _ = trained
    assert main(["generate", "--adapter", str(out), "--max-new-tokens", "5", "What is the code for room 3?"]) == 0
    recorded = capsys.readouterr().out
    assert main(["generate", "--base", tiny_base, "--adapter", str(out), "--max-new-tokens", "5",
                 "What is the code for room 3?"]) == 0
    assert recorded == capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "0", "argument --lr: expected a number > 0, got 0"),
    ("--lr", "nan", "argument --lr: expected a number > 0, got nan"),
    ("--alpha", "0", "argument --alpha: expected a number > 0, got 0"),
    ("--dropout", "1", r"argument --dropout: expected a number in \[0, 1\), got 1"),
    ("--epochs", "0", "argument --epochs: expected a positive integer, got 0"),
    ("--warmup-ratio", "1.5", r"argument --warmup-ratio: expected a number in \[0, 1\), got 1.5"),
    ("--warmup-steps", "-1", "argument --warmup-steps: expected an integer >= 0, got -1"),
    ("--weight-decay", "-0.1", "argument --weight-decay: expected a number >= 0, got -0.1"),
    ("--max-grad-norm", "-1", "argument --max-grad-norm: expected a number >= 0, got -1"),
    ("--loraplus-lr-ratio", "0", "argument --loraplus-lr-ratio: expected a number > 0, got 0"),
    ("--neftune-alpha", "-5", "argument --neftune-alpha: expected a number >= 0, got -5"),
    ("--seed", "-3", "argument --seed: expected an integer >= 0, got -3"),
    ("--lr-scheduler", "step", "argument --lr-scheduler: invalid choice: 'step'"),
])
def test_train_flags_refuse_meaningless_numbers(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--data", "d.jsonl", flag, value])
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_keep_best_schedule_warmup_and_grouping_flags(tmp_path, capsys):
    parser = build_parser()
    config = train_config_from_args(parser.parse_args(
        ["train", "--data", "d.jsonl", "--eval-data", "e.jsonl", "--keep-best", "--lr-scheduler", "linear",
         "--warmup-ratio", "0", "--warmup-steps", "12", "--group-by-length", "--max-grad-norm", "0.5",
         "--length-tolerance", "0.25"]))
    assert (config.keep_best, config.lr_scheduler, config.warmup_steps, config.group_by_length,
            config.max_grad_norm, config.length_tolerance) == (True, "linear", 12, True, 0.5, 0.25)
    assert train_config_from_args(parser.parse_args(["train", "--data", "d", "--no-group-by-length"])) \
        .group_by_length is False
    path = tmp_path / "run.yaml"
    path.write_text("data: d.jsonl\ngroup-by-length: true\nlr-scheduler: cosine\nwarmup-steps: 5\nwarmup-ratio: 0\n")
    config = train_config_from_args(parser.parse_args(["train", "--config", str(path)]))
    assert (config.group_by_length, config.lr_scheduler, config.warmup_steps) == (True, "cosine", 5)
    path.write_text("data: d.jsonl\nno-group-by-length: true\n")
    assert train_config_from_args(parser.parse_args(["train", "--config", str(path)])).group_by_length is False
    # --keep-best without held-out data is refused before anything loads
    code, err = _exit_code_and_error(["train", "--data", "d.jsonl", "--keep-best", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "keep_best picks the adapter by its eval loss: give held-out data" in err
