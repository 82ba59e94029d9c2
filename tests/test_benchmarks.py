"""benchmarks/: the training-step and decoding benchmarks run end to end on a tiny model and check what they claim."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import single_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import inference  # noqa: E402
import serve  # noqa: E402
import train_step  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


TINY = ["--model", "tiny", "--seq-len", "32"]


def test_train_step_benchmark_reports_every_variant_and_equal_losses(capsys):
    result = train_step.main(TINY + ["--steps", "2", "--warmup", "1", "--memory-steps", "0",
                                     "--variants", "lorakit,peft,forward,full,lorakit_plain"])
    names = {"lorakit", "peft", "forward", "full", "lorakit_plain"}
    assert set(result["tokens_per_s"]) == names
    assert set(result["page_faults_median"]) == set(result["system_s_median"]) == names
    assert all(len(times) == 2 for times in result["step_s_all"].values())
    assert set(result["ratios"]["tokens_per_s_over_peft"]) == names - {"peft"}
    assert set(result["ratios"]["step_over_forward"]) == names - {"forward"}
    # lorakit's fast path and its plain composition both follow PEFT's losses step by step
    assert result["loss"]["max_abs_diff_lorakit_vs_peft"] < 1e-5
    assert result["loss"]["max_abs_diff_lorakit_plain_vs_peft"] < 1e-5
    assert result["loss"]["lorakit"][0] > result["loss"]["lorakit"][-1]  # the steps train
    assert len(set(result["loss"]["forward"])) == 1  # the frozen forward does not
    assert '"tokens_per_s"' in capsys.readouterr().out  # the JSON is printed


def test_train_step_benchmark_measures_peak_memory_in_child_processes():
    result = train_step.main(TINY + ["--steps", "1", "--warmup", "0", "--memory-steps", "1",
                                     "--variants", "lorakit,peft"])
    for name in ("lorakit", "peft"):
        memory = result["peak_memory"][name]
        assert memory["peak_rss_mb"] >= memory["peak_rss_before_steps_mb"] > 0
    expected = result["peak_memory"]["lorakit"]["peak_rss_mb"] / result["peak_memory"]["peft"]["peak_rss_mb"]
    assert result["ratios"]["peak_memory_over_peft"] == {"lorakit": round(expected, 3)}


def test_inference_benchmark_checks_outputs_and_times_the_ablation():
    result = inference.main(["--model", "tiny", "--tokens", "4", "--rounds", "1", "--prompt-len", "8", "--ablation"])
    assert set(result["ratio_to_base"]) == {"lorakit", "lorakit_merged", "peft", "lorakit_wrapper_only"}
    checks = result["checks"]
    assert checks["max_abs_logit_diff_lorakit_vs_peft"] < 1e-5
    assert checks["max_abs_logit_diff_merged_vs_unmerged"] < 1e-4
    assert checks["max_abs_logit_diff_adapter_vs_base"] > 1e-3  # the adapter changes the output
    assert checks["same_greedy_tokens_lorakit_peft"] and checks["same_greedy_tokens_wrapper_only_base"]
    assert checks["merged_model_type"] == "LlamaForCausalLM"


def config_only(base: str, folder: Path) -> str:
    """A copy of the model directory `base` without its weights: what travels to a lent GPU."""
    folder.mkdir()
    for file in Path(base).iterdir():
        if not file.name.endswith(".safetensors"):
            (folder / file.name).write_bytes(file.read_bytes())
    return str(folder)


def test_random_base_builds_the_architecture_from_the_config_alone(tiny_base, tmp_path):
    from lorakit.models import load_base_model

    real, _ = load_base_model(tiny_base)
    built = train_step.random_base(config_only(tiny_base, tmp_path / "config"), torch.bfloat16, "cpu")
    assert {name: (tuple(p.shape), torch.bfloat16) for name, p in real.named_parameters()} \
        == {name: (tuple(p.shape), p.dtype) for name, p in built.named_parameters()}
    again = train_step.random_base(tiny_base, torch.bfloat16, "cpu")  # the weights file beside it is not read
    assert all(torch.equal(a, b) for a, b in zip(built.parameters(), again.parameters()))  # seeded


def test_serve_benchmark_runs_every_scenario_on_a_config_alone(tiny_base, tmp_path):
    """What a lent GPU runs (there with --device cuda)."""
    result = serve.main(["--base", config_only(tiny_base, tmp_path / "config"), "--random-weights", "--runs", "1",
                         "--requests", "6", "--max-tokens", "3", "--adapters", "3", "--clients", "3",
                         "--max-model-len", "256", "--device", "cpu", "--out", str(tmp_path / "serve.json")])
    assert json.loads((tmp_path / "serve.json").read_text())["ratios"] == result["ratios"]
    assert result["setup"]["random_weights"] and result["setup"]["adapters"] == 3
    for scenario in ("mixed", "per_adapter", "single"):
        run = result["runs"][scenario][0]
        assert run["tokens"] == 6 * 3  # every request decoded its fixed length
        assert 1 <= run["mean_batch_size"] <= 3
    assert result["runs"]["single"][0]["distinct_adapters"] == 1
    assert result["runs"]["mixed"][0]["distinct_adapters"] == result["runs"]["per_adapter"][0]["distinct_adapters"]
    assert result["ratios"]["mixed_vs_per_adapter_throughput"] > 0


import quality  # noqa: E402


def test_quality_datasets_keep_validation_apart_from_the_held_out_sets():
    demo_train, demo_eval, epochs = quality.dataset_rows("demo", "test")
    assert (len(demo_train), len(demo_eval), epochs) == (910, 130, None)
    small, scored, epochs = quality.dataset_rows("demo100", "test")
    assert len(small) == 100 and scored == demo_eval and epochs == 5
    assert small == quality.dataset_rows("demo100", "test")[0]  # a seeded subsample
    for name in ("demo", "demo100", "multiturn"):
        train, validation, _ = quality.dataset_rows(name, "validation")
        held_out = quality.dataset_rows(name, "test")[1]
        keys = {json.dumps(r, sort_keys=True) for r in train}
        assert not keys & {json.dumps(r, sort_keys=True) for r in validation}  # carved out of the training rows
        assert not {json.dumps(r, sort_keys=True) for r in held_out} & (keys | {json.dumps(r, sort_keys=True)
                                                                                for r in validation})
    assert len(quality.dataset_rows("demo", "validation")[1]) == 130
    assert len(quality.dataset_rows("multiturn", "validation")[0]) == 260


def test_quality_recipes_parse_and_pick_the_best_complete_one():
    assert quality.split_recipes("lorakit[lr=1e-3,max_grad_norm=0],plain, before") == \
        ["lorakit[lr=1e-3,max_grad_norm=0]", "plain", "before"]
    assert quality.parse_recipe("lorakit[lr=1e-3,max_grad_norm=0,group_by_length=false]") == \
        ("lorakit", {"lr": 1e-3, "max_grad_norm": 0.0, "group_by_length": False})
    assert quality.parse_recipe("lorakit_nf4[lr_scheduler=linear]")[1] == {"quantize": "nf4", "lr_scheduler": "linear"}
    assert quality.parse_recipe("before")[1]["length_tolerance"] == 0.0
    # `demo` is `lorakit demo`'s run: a TrainConfig built from it trains as the demo does, changes on top
    from lorakit.demo import demo_config
    from lorakit.train_config import TrainConfig

    name, changes = quality.parse_recipe("demo[max_grad_norm=0]")
    demo, rebuilt = demo_config(), TrainConfig(data="x", **changes)
    assert name == "demo" and rebuilt.max_grad_norm == 0.0 and demo.max_grad_norm > 0
    assert dataclasses.replace(rebuilt, max_grad_norm=demo.max_grad_norm, data=demo.data, out=demo.out, bf16=demo.bf16,
                               attention=demo.attention) == demo
    with pytest.raises(SystemExit, match="not a TrainConfig field"):
        quality.parse_recipe("lorakit[learning_rate=1]")
    with pytest.raises(SystemExit, match="unknown recipe"):
        quality.parse_recipe("hf")

    def row(dataset, recipe, seed, accuracy):
        return {"dataset": dataset, "recipe": recipe, "seed": seed, "accuracy": accuracy, "tokens_per_s": 1.0,
                "padding_share": 0.1, "final_loss": 0.1, "perplexity": 1.5, "settings": {}}

    rows = [row(d, r, s, acc) for d in ("a", "b") for s in (0, 1)
            for r, acc in (("lorakit[lr=1]", 0.5 + 0.1 * s), ("lorakit[lr=2]", 0.55), ("plain", 0.9))]
    rows.append(row("a", "lorakit[lr=3]", 0, 1.0))  # one seed on one dataset: not a complete candidate
    summary = quality.summarize(rows)
    assert summary["a"]["lorakit[lr=1]"]["accuracy_mean"] == pytest.approx(0.55)
    assert summary["a"]["lorakit[lr=1]"]["accuracy_sd"] == pytest.approx(0.0707, abs=1e-4)
    best, scores = quality.pick(summary)
    assert best == "lorakit[lr=1]" and set(scores) == {"lorakit[lr=1]", "lorakit[lr=2]"}  # plain is not a candidate


def test_quality_trains_and_scores_lorakit_and_the_plain_peft_loop(tiny_base, tmp_path):
    pytest.importorskip("peft")
    common = dict(split="test", base=tiny_base, device="cpu", bf16=False, shared={"max_steps": 3},
                  workdir=str(tmp_path), eval_limit=2, eval_batch_size=2)
    rows = [quality.run_job(quality.Job("demo100", recipe, 0, **common))
            for recipe in ("plain", "lorakit", "before")]
    for row in rows:
        assert row["n"] == 2 and 0 <= row["accuracy"] <= 1 and row["steps"] == 3 and row["perplexity"] > 1
        assert row["tokens_per_s"] > 0 and 0 <= row["padding_share"] < 1 and row["settings"]["epochs"] == 5
    plain, lorakit, before = rows
    assert lorakit["settings"]["lr"] == plain["settings"]["lr"] == 2e-3 and before["settings"]["lr"] == 2e-4
    assert before["settings"]["length_tolerance"] == 0.0 and before["padding_share"] < plain["padding_share"]
    assert list(tmp_path.iterdir()) == []  # each run's files are removed


def test_quality_comparison_is_paired_and_the_defaults_are_the_plain_loops_recipe(tiny_base, tmp_path):
    """Same seed: the same initial LoRA weights, the same batches, so the two loops differ only by their recipes;
    and lorakit's defaults (constant lr, no warmup, no clipping, shuffled batches) are the plain loop's recipe, so in
    float32 the two train to the same loss."""
    pytest.importorskip("peft")
    common = dict(split="test", base=tiny_base, device="cpu", bf16=False, shared={"max_steps": 6},
                  workdir=str(tmp_path), eval_limit=2, eval_batch_size=2)
    plain, lorakit = (quality.run_job(quality.Job("demo100", recipe, 1, **common))
                      for recipe in ("plain", "lorakit"))
    assert lorakit["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-4)
    assert lorakit["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-4)
    assert lorakit["padding_share"] == plain["padding_share"]  # the same batches


import grad_precision  # noqa: E402


def test_grad_precision_lorakit_bf16_gradients_are_as_close_to_float32_as_peft(tiny_base, tmp_path, capsys):
    """Under bf16 autocast lorakit's kernels and fused loss move the LoRA gradients from float32's no further than
    PEFT's modules do; on a float32 base they are PEFT's up to summation order. From a saved adapter's weights."""
    pytest.importorskip("peft")
    from lorakit import get_peft_model
    from lorakit.models import load_base_model
    from lorakit.train_config import lora_recipe

    torch.manual_seed(0)
    saved = get_peft_model(load_base_model(tiny_base)[0], lora_recipe(init_lora_weights=False))  # B not zero
    saved.save_pretrained(tmp_path / "adapter")
    data = Path(quality.DEMO_DIR) / "train.jsonl"
    report = grad_precision.main(["--base", tiny_base, "--data", str(data), "--batches", "2", "--batch-size", "4",
                                  "--adapter", str(tmp_path / "adapter")])
    assert report["setup"]["adapter"] == str(tmp_path / "adapter")
    variants = report["variants"]
    assert set(variants) == set(grad_precision.VARIANTS)
    assert max(variants["lorakit_fp32"]["grad_rel_error"]) < 1e-5
    for name in ("peft_bf16", "lorakit_bf16", "lorakit_bf16_unfused_loss"):
        errors = variants[name]["grad_rel_error"]
        assert len(errors) == 2 and all(1e-4 < e < 0.2 for e in errors), (name, errors)  # bf16 did run, and roughly
    assert report["lorakit_vs_peft_bf16_error"] < 1.25
    assert json.loads(capsys.readouterr().out)["variants"].keys() == variants.keys()
