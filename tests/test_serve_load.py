"""benchmarks/load.py end to end, small: a `lorakit serve` child process on the tiny base under concurrent clients
with bad requests and cut streams answers no 5xx, keeps its memory and its greedy answer; and benchmarks/churn.py's
command line."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import churn  # noqa: E402
import load  # noqa: E402


def test_load_benchmark_reports_every_figure_and_passes(tiny_base, capsys):
    result = load.main(["--base", tiny_base, "--clients", "2,6", "--requests-per-client", "5", "--adapters", "3",
                        "--max-adapters", "2", "--max-tokens", "6", "--bad", "0.3", "--hangup", "0.5",
                        "--max-seconds", "120", "--timeout", "120", "--seed", "3"])
    assert result["ok"], result
    first, second = result["phases"]
    assert (first["clients"], second["clients"]) == (2, 6)
    assert first["requests"] == 10 and second["requests"] == 30  # bounded in count, none lost
    for phase in result["phases"]:
        assert phase["status"]["5xx"] == 0 and phase["status"]["2xx"] > 0
        assert phase["status"]["4xx"] == phase["bad_sent"] > 0  # every bad request, and only those, a 4xx
        assert phase["latency_s"]["p50"] <= phase["latency_s"]["p99"] and phase["ttft_s"]["streams"] > 0
        assert phase["tokens_per_s"] > 0 and phase["adapter_loads"] >= 1
    assert sum(phase["hangups"] for phase in result["phases"]) > 0
    assert result["probe"]["same"] and result["probe"]["before"]
    assert result["rss_mb"]["after_warm_up"] >= result["rss_mb"]["started"] > 100
    assert '"benchmark": "load"' in capsys.readouterr().out


def test_churn_benchmark_command_line(tiny_base):
    result = churn.main(["--base", tiny_base, "--adapters", "12", "--distinct", "3", "--max-adapters", "2",
                         "--every", "4"])
    assert sorted(result["rss_mb_by_adapters"]) == [4, 8, 12]
    assert (result["adapter_loads"], result["adapter_evictions"], result["resident_at_end"]) == (12, 10, 2)
    assert result["ok"] == (result["growth"] < churn.GOAL)
