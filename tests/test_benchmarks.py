"""benchmarks/: the training-step and decoding benchmarks run end to end on a tiny model and check what they claim."""

import sys
from pathlib import Path

import pytest
from tiny_models import single_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import inference  # noqa: E402
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
