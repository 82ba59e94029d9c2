"""The lorakit command: subcommands, option precedence, the train/eval contract, merge, inspect, chat."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.cli import CliError, build_parser, main, train_config_from_args

SUBCOMMANDS = ["train", "eval", "generate", "chat", "merge", "inspect", "serve", "demo"]


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
    assert (config.data, config.r, config.lr, config.targets, config.max_steps, config.bf16) == \
        ("from_file.jsonl", 8, 0.01, ["q_proj", "v_proj"], 7, True)
    assert config.alpha == 32 and config.epochs == 3  # untouched: the dataclass defaults
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"data": "a.jsonl", "lr": 0.5, "targets": "k_proj,o_proj"}))
    config = train_config_from_args(parser.parse_args(["train", "--config", str(json_file), "--lr", "0.25",
                                                       "--data", "b.jsonl"]))
    assert (config.data, config.lr, config.targets) == ("b.jsonl", 0.25, ["k_proj", "o_proj"])
    config = train_config_from_args(parser.parse_args(["train", "--data", "a.jsonl", "--dora", "--rslora"]))
    assert config.dora and config.rslora and not train_config_from_args(
        parser.parse_args(["train", "--data", "a.jsonl"])).dora
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
    assert info["size_bytes"] > 896 * 4 and info["training"]["steps"] == 6
    main(["inspect", str(out)])
    text = capsys.readouterr().out
    assert "rank r" in text and "q_proj, v_proj" in text and "896 in 8 tensors" in text
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

    lines = iter(["/adapters", "What is the code for room 3?", "/base", "What is the code for room 3?",
                  "/adapter nope", "/adapter default", "/reset", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--base", tiny_base, "--adapter", f"default={out}", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    replies = [l.split("assistant> ", 1)[1] for l in text.splitlines() if "assistant> " in l]
    # a multi-turn chat: the second answer sees the first, so compare with the one-shot answers loosely
    assert len(replies) == 2 and replies[0] == with_adapter
    assert "using the base model" in text and "no adapter 'nope'" in text and "using adapter default" in text


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


def test_demo_command_on_a_tiny_base(tiny_base, tmp_path):
    """The demo's wiring (train on the shipped data, score, report); the real run is `make demo`."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    stdout = _run_main(["demo", "--base", tiny_base, "--out", str(out), "--max-steps", "2", "--eval-limit", "3"])
    assert "fine-tune" in stdout and "r=16 on q_proj,k_proj,v_proj,o_proj" in stdout
    assert "trained 2 steps" in stdout and "3 held-out questions" in stdout
    assert f"adapter saved to {out.resolve()}" in stdout
    assert stdout.strip().splitlines()[-1].startswith("eval on 3 rows")
    assert not (out / "stale.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "eval.json").read_text())["n"] == 3
