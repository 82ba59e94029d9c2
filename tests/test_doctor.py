"""lorakit doctor: one crafted case per finding, and a clean run that gives none."""

import json
import math

import pytest
import torch
from tiny_models import single_thread, tiny_llama, tiny_train_config, save_tiny_chat_base, write_code_pairs

from lorakit import get_peft_model
from lorakit.cli import main
from lorakit.doctor import check_settings
from lorakit.doctor_data import doctor_before
from lorakit.doctor_run import doctor_run_dir
from lorakit.train import train
from lorakit.train_config import TrainConfig, lora_recipe

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
QUESTIONS = ["How do I reset my password on the web app", "What is the price of the team plan per month",
             "Where is your head office located in the city", "Can I export my invoices as a CSV file",
             "Which browsers does the dashboard support today", "How long do refunds take to arrive back"]


def rows(n: int = 6, **override) -> list[dict]:
    out = [{"query": f"{QUESTIONS[i % 6]} (case {i})", "response": f"Answer number {i}."} for i in range(n)]
    for i, row in override.items():
        out[int(i[1:])] = row
    return out


def write(path, items) -> str:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return str(path)


def config(data: str, lora: dict | None = None, **changes) -> TrainConfig:
    settings = dict(base="smollm2", data=data, epochs=3, batch_size=2, max_length=256)
    return TrainConfig(lora=lora_recipe(**{"lora_dropout": 0.0, **(lora or {})}), **{**settings, **changes})


def codes(report_or_findings) -> list[str]:
    findings = getattr(report_or_findings, "findings", report_or_findings)
    return sorted(f.code for f in findings)


def test_clean_settings_and_data_give_no_findings(tmp_path):
    train_file = write(tmp_path / "train.jsonl", rows())
    eval_file = write(tmp_path / "eval.jsonl", [{"query": "Do you offer an on-premise installation option",
                                                 "response": "Yes."}])
    report = doctor_before(config(train_file, eval_data=eval_file))
    assert report.findings == [] and report.exit_code == 0


@pytest.mark.parametrize("lora,changes,code,fix", [
    ({"r": 2, "lora_alpha": 4}, {}, "rank-too-low", "--r 16"),
    ({"target_modules": ["q_proj", "v_proj"]}, {}, "q-v-only", "--targets q_proj,k_proj,v_proj,o_proj"),
    ({"r": 8, "lora_alpha": 128}, {}, "alpha-off-scale", "--alpha 16"),
    ({}, {"lr": 0.5}, "lr-out-of-range", "--lr 0.002"),
    ({}, {"lr": 1e-7}, "lr-out-of-range", "--lr 0.002"),
    ({"lora_dropout": 0.1}, {}, "dropout-tiny-dataset", "--dropout 0"),
])
def test_each_settings_finding(tmp_path, lora, changes, code, fix):
    findings = check_settings(config("x.jsonl", lora, **changes), n_examples=6)
    assert codes(findings) == [code]
    assert findings[0].severity == "warning" if code != "dropout-tiny-dataset" else "info"
    assert fix in findings[0].fix


def test_q_v_only_states_the_parameter_cost():
    finding = check_settings(config("x.jsonl", {"target_modules": ["q_proj", "v_proj"], "r": 8}))[0]
    # SmolLM2: 30 layers, q 576->576, k/v 576->192, o 576->576; r=8
    assert "(460,800 -> 921,600 trainable parameters" in finding.fix


def test_rslora_accepts_any_alpha_and_full_fine_tuning_has_its_own_lr_range():
    assert check_settings(config("x.jsonl", {"r": 8, "lora_alpha": 128, "use_rslora": True})) == []
    assert codes(check_settings(config("x.jsonl", full=True))) == ["lr-out-of-range"]  # 2e-3 is far too high
    assert check_settings(config("x.jsonl", full=True, lr=2e-5)) == []


def test_malformed_rows_listed_with_file_and_line(tmp_path):
    data = write(tmp_path / "train.jsonl", rows(6, r1={"question": "x", "response": "y"}, r3=["not", "an object"]))
    report = doctor_before(config(data))
    assert codes(report) == ["malformed-rows"] and report.exit_code == 1
    assert f"{data}:2, {data}:4" in report.findings[0].what


def test_unreadable_json_line(tmp_path):
    data = write(tmp_path / "train.jsonl", rows(3) + ['{"query": "cut off'])
    report = doctor_before(config(data))
    assert codes(report) == ["unreadable-data"] and f"{data}:4" in report.findings[0].what


def test_empty_responses(tmp_path):
    data = write(tmp_path / "train.jsonl", rows(6, r2={"query": "Anything?", "response": "  "}))
    report = doctor_before(config(data))
    assert codes(report) == ["empty-responses"] and f"{data}:3" in report.findings[0].what
    assert report.exit_code == 1


def test_duplicate_pairs(tmp_path):
    items = rows(6)
    items[4] = {"query": items[1]["query"].upper() + "  ", "response": items[1]["response"]}  # same after normalising
    report = doctor_before(config(write(tmp_path / "train.jsonl", items)))
    assert codes(report) == ["duplicate-pairs"] and "train.jsonl:5 (= 2)" in report.findings[0].what


def test_held_out_questions_in_training_exact_and_reworded(tmp_path):
    train_file = write(tmp_path / "train.jsonl", rows())
    eval_file = write(tmp_path / "eval.jsonl", [
        {"query": rows()[0]["query"].lower(), "response": "a"},  # the same question
        {"query": "How do I reset my password on the web app (case 2)", "response": "b"},  # one word changed
        {"query": "Something else entirely, about shipping times", "response": "c"}])
    report = doctor_before(config(train_file, eval_data=eval_file))
    assert codes(report) == ["eval-in-train", "eval-near-train"]
    exact, near = sorted(report.findings, key=lambda f: f.code)
    assert exact.severity == "error" and f"{eval_file}:1" in exact.what
    assert near.severity == "warning" and f"{eval_file}:2" in near.what and f"{eval_file}:3" not in near.what


def test_rows_truncated_with_the_length_that_keeps_99_percent(tmp_path):
    items = rows(6)
    items[0]["response"] = "word " * 300
    report = doctor_before(config(write(tmp_path / "train.jsonl", items), max_length=64))
    assert codes(report) == ["rows-truncated"]
    assert "1 of 6 rows are longer than --max-length 64" in report.findings[0].what
    assert "--max-length 3" in report.findings[0].fix  # the longest row, the 99th percentile of 6


def test_dataset_too_small_for_the_steps(tmp_path):
    report = doctor_before(config(write(tmp_path / "train.jsonl", rows()), max_steps=100))
    assert codes(report) == ["too-small-for-steps"]
    assert "33 passes" in report.findings[0].what and "--max-steps 9" in report.findings[0].fix


# -- finished runs -------------------------------------------------------------------------------------------------

def saved_adapter(path, rank_of_update: int | None = None, fill=None, r: int = 8) -> str:
    """A tiny Llama's adapter (r=8 on q,k,v,o) with B·A of the given rank (random when None), saved to `path`."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), lora_recipe(r=r, lora_alpha=2 * r, lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
                if rank_of_update is not None:
                    param[:, rank_of_update:] = 0  # only the first ranks carry an update
            if fill is not None and "lora_" in name:
                param.fill_(fill)
    model.save_pretrained(path)
    return str(path)


def metrics(path, losses, evals=None):
    lines = []
    for step, loss in enumerate(losses, 1):
        row = {"step": step, "loss": loss}
        if evals and step in evals:
            row["eval_loss"] = evals[step]
        lines.append(json.dumps(row))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_finished_run_findings(tmp_path):
    run = tmp_path / "run"
    saved_adapter(run, rank_of_update=2)
    report = doctor_run_dir(str(run))
    assert codes(report) == ["compressible", "unmerged"] and report.exit_code == 0
    compressible = next(f for f in report.findings if f.code == "compressible")
    assert "median 2 of their 8 ranks" in compressible.what and "--rank 2" in compressible.fix
    assert all(layer["effective_rank"] == 2 for layer in compressible.data["layers"])
    assert all(math.isclose(layer["top4_energy"], 1.0) for layer in compressible.data["layers"])
    assert f"lorakit merge --adapter {run}" in next(f for f in report.findings if f.code == "unmerged").fix


def test_full_rank_adapter_is_not_called_compressible(tmp_path):
    report = doctor_run_dir(saved_adapter(tmp_path / "run"))
    assert codes(report) == ["rank-usage", "unmerged"]


def test_never_trained_and_non_finite_weights(tmp_path):
    untrained = tmp_path / "untrained"
    torch.manual_seed(0)
    get_peft_model(tiny_llama(), lora_recipe(r=4)).save_pretrained(untrained)  # B is still zero
    report = doctor_run_dir(str(untrained))
    assert "never-trained" in codes(report) and report.exit_code == 1
    report = doctor_run_dir(saved_adapter(tmp_path / "nan", fill=float("nan")))
    assert "weights-not-finite" in codes(report) and report.exit_code == 1


def test_over_fitting_and_nan_loss_in_the_curves(tmp_path):
    run = tmp_path / "run"
    saved_adapter(run)
    metrics(run, [2.0 - 0.1 * i for i in range(12)], evals={3: 1.5, 6: 1.2, 9: 1.4, 12: 1.6})
    report = doctor_run_dir(str(run))
    finding = next(f for f in report.findings if f.code == "over-fitting")
    assert "1.2000 at step 6" in finding.what and "--max-steps 6" in finding.fix
    metrics(run, [2.0, 1.5, float("nan"), float("nan")])
    report = doctor_run_dir(str(run))
    assert "loss-not-finite" in codes(report) and "from step 3" in report.findings[0].what
    assert report.exit_code == 1


def test_a_real_tiny_run_reads_its_recorded_settings_and_data(tmp_path):
    base = save_tiny_chat_base(tmp_path / "base")
    data = write_code_pairs(tmp_path / "train.jsonl", 8)
    with single_thread():
        train(tiny_train_config(base, data, tmp_path / "run", lora={"r": 2, "lora_alpha": 4}))
    report = doctor_run_dir(str(tmp_path / "run"))
    assert report.checked[:2] == ["settings", f"run {tmp_path / 'run'}"] and data in report.checked
    assert "rank-too-low" in codes(report) and report.exit_code == 0


def test_cli_exit_codes_and_json(tmp_path, capsys):
    good = write(tmp_path / "good.jsonl", rows())
    assert main(["doctor", "--data", good, "--r", "16", "--lr", "2e-3", "--dropout", "0"]) == 0
    assert "no findings" in capsys.readouterr().out
    bad = write(tmp_path / "bad.jsonl", rows(6, r0={"query": "q", "response": ""}))
    assert main(["doctor", "--data", bad, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["exit_code"] == 1 and "empty-responses" in {f["code"] for f in out["findings"]}
    assert main(["doctor", saved_adapter(tmp_path / "run"), "--json"]) == 0
    assert {f["code"] for f in json.loads(capsys.readouterr().out)["findings"]} == {"rank-usage", "unmerged"}
    assert main(["doctor"]) == 2
