"""`lorakit report`: the run on one self-contained HTML page, written by `lorakit train` too; opened from disk in
headless Chromium, its failures filter and its charts work with no network."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from browser import LAPTOP, PHONE, artifact_dir, browser, png_size  # noqa: F401 (browser: a fixture)
from lorakit.cli import main
from lorakit.report import build_report, write_report

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

STEPS = 40
ROWS = [  # (query, facts, base answer, base correct, adapter answer, adapter correct)
    ("How much is the Team plan?", ["$14.90"], "It costs about $15.", False, "The Team plan is $14.90 per seat.", True),
    ("Where are invoices?", ["Settings > Billing > Invoices"], "Check your email.", False,
     "Open Settings > Billing > Invoices.", True),
    ("When is support open?", ["9:00", "17:00"], "Support is open 9:00 to 17:00.", True, "From 9:00 daily.", False),
    ("<script>alert('x')</script> & more?", ["R&D"], "No idea.", False, "Ask R&D <b>now</b>.", True),
    ("How many seats?", ["25 seats"], "Unlimited.", False, "Up to 20 seats.", False),
    ("Refund window?", ["30 days"], "Within 30 days.", True, "Within 30 days of purchase.", True),
]


def make_run(root: Path) -> Path:
    """A run folder as `lorakit train` + `lorakit eval --json` leave it (without the weights)."""
    run = root / "run"
    run.mkdir()
    config = {"base": "smollm2", "data": "train.jsonl", "lr": 0.003, "epochs": 2, "batch_size": 4, "quantize": None,
              "full": False, "lora": {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
                                      "use_dora": False}}
    result = {"steps": STEPS, "epochs": 2.0, "first_loss": 4.4, "final_loss": 0.05, "eval_loss": 0.21,
              "tokens": 69772, "train_seconds": 321.5, "tokens_per_s": 217.0, "trainable_params": 1843200,
              "interrupted": False}
    (run / "lorakit_train.json").write_text(json.dumps({"config": config, "result": result}))
    lines = []
    for step in range(1, STEPS + 1):
        lines.append(json.dumps({"step": step, "loss": 4.4 * 0.9 ** step, "lr": 0.003, "tokens_per_s": 200.0 + step}))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "eval_loss": 2.0 / step}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 41, "lo')  # the last line cut by a kill
    rows = [{"query": q, "reference": "ref " + " ".join(facts), "facts": facts, "base_answer": ba, "base_correct": bc,
             "tuned_answer": ta, "tuned_correct": tc} for q, facts, ba, bc, ta, tc in ROWS]
    base_ok, tuned_ok = sum(r[3] for r in ROWS), sum(r[5] for r in ROWS)
    scores = {"data": "eval.jsonl", "n": len(ROWS), "metric": "key facts", "adapter": str(run), "max_new_tokens": 64,
              "seconds": 12.0, "quantize": None,
              "base": {"accuracy": base_ok / len(ROWS), "correct": base_ok, "n": len(ROWS), "perplexity": 9.5},
              "tuned": {"accuracy": tuned_ok / len(ROWS), "correct": tuned_ok, "n": len(ROWS), "perplexity": 1.9},
              "rows": rows}
    (run / "eval.json").write_text(json.dumps(scores))
    return run


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path)


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_report_holds_settings_scores_and_every_answer_escaped(run_dir):
    page = build_report(run_dir)
    assert "<title>lorakit report: run</title>" in page
    # settings and result, the scores table with its change column
    for text in ("lora.target_modules", "[&quot;q_proj&quot;, &quot;v_proj&quot;]", "<td>0.003</td>", "<td>321.5</td>", "<td>false</td>", "5m22s", "217 tok/s",
                 "33.3%", "66.7%", "+33.3 points", "× 0.20", "2/6", "4/6", "LoRA r=16 on q_proj, v_proj"):
        assert text in page, text
    # every question, with the verdicts the filters use, and every fact marked in each answer
    articles = re.findall(r'<article class="q" data-base="(\d)" data-tuned="(\d)" data-failed="(\d)">', page)
    assert articles == [(str(int(r[3])), str(int(r[5])), str(int(not r[5]))) for r in ROWS]
    assert page.count('<li class="found">$14.90</li>') == 1 and page.count('<li class="missing">$14.90</li>') == 1
    assert page.count('<li class="found">9:00</li>') == 2 and page.count('<li class="found">17:00</li>') == 1
    assert '<li class="missing">25 seats</li>' in page and '<li class="found">Settings &gt; Billing &gt; Invoices' in page
    # user text is escaped: the only script is the report's own
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more?" in page
    assert "Ask R&amp;D &lt;b&gt;now&lt;/b&gt;." in page and page.count("<script") == 1
    # nothing to fetch: no external resources, and a policy that forbids them
    assert not re.search(r'(src|href)\s*=\s*"(?!#)', page) and "<link" not in page
    assert "default-src 'none'" in page
    # the charts: train loss (40 steps), its moving average, eval loss dots, tokens/s and learning rate
    loss_chart = re.search(r'data-chart="loss">(.*?)</figure>', page, re.S).group(1)
    raw = re.search(r'<polyline class="line raw" points="([^"]+)"', loss_chart).group(1).split()
    assert len(raw) == STEPS and loss_chart.count('<circle class="dot eval"') == 4 and "log scale" in loss_chart
    assert 'data-chart="throughput"' in page and "median 220" in page and 'data-chart="learning-rate"' in page


def test_report_without_eval_or_log_says_what_is_missing(tmp_path, run_dir):
    (run_dir / "eval.json").unlink()
    page = build_report(run_dir)
    assert "No eval.json here yet" in page and f"--json {run_dir / 'eval.json'}" in page
    assert "<article" not in page and 'data-chart="loss"' in page
    only_eval = tmp_path / "only_eval"
    only_eval.mkdir()
    (only_eval / "eval.json").write_text(json.dumps({"n": 1, "base": {"accuracy": 0.0, "correct": 0, "n": 1},
                                                     "tuned": None, "rows": [{"query": "q", "facts": ["7"],
                                                                              "base_answer": "6", "base_correct": False}]}))
    page = build_report(only_eval)
    assert "No loss rows in metrics.jsonl" in page and page.count('<article class="q"') == 1
    assert '<button type="button" data-filter="failures" aria-pressed="false">wrong <span class="count">1</span>' in page


def undated(page: str) -> str:
    return re.sub(r"written \d{4}-\d\d-\d\d \d\d:\d\d", "written (date)", page)


def test_report_command(run_dir, tmp_path):
    code, out, _ = run_cli(["report", str(run_dir)])
    assert code == 0 and f"report written to {run_dir / 'report.html'}" in out
    assert undated((run_dir / "report.html").read_text()) == undated(build_report(run_dir))
    elsewhere = tmp_path / "out" / "r.html"
    other_eval = tmp_path / "other.json"
    scores = json.loads((run_dir / "eval.json").read_text())
    scores["rows"] = scores["rows"][:2]
    other_eval.write_text(json.dumps(scores))
    code, out, _ = run_cli(["report", str(run_dir), "--out", str(elsewhere), "--eval", str(other_eval)])
    assert code == 0 and elsewhere.read_text().count('<article class="q"') == 2
    for args, message in ((["report", str(tmp_path / "missing")], "is not a directory"),
                          (["report", str(tmp_path / "out")], "has nothing to report: no lorakit_train.json"),
                          (["report", str(run_dir), "--eval", str(tmp_path / "nope.json")], "--eval"),
                          (["report", str(run_dir), "--out", str(tmp_path)], "--out")):
        code, _, err = run_cli(args)
        assert code == 2 and err.startswith("lorakit report: error: ") and message in err, err
    (run_dir / "eval.json").write_text("{broken")
    code, _, err = run_cli(["report", str(run_dir)])
    assert code == 2 and "eval.json is not valid JSON" in err
    (run_dir / "eval.json").write_text(json.dumps({"rows": [], "base": {"accuracy": 0.5}}))
    code, _, err = run_cli(["report", str(run_dir)])
    assert code == 2 and "is not a `lorakit eval --json` file" in err


def test_train_writes_the_report_and_prints_its_path(tiny_base, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"query": f"Code for room {i}?", "response": f"Room {i}: {1000 + 37 * i}."})
                            + "\n" for i in range(8)))
    out = tmp_path / "adapter"
    code, stdout, err = run_cli(["train", "--base", tiny_base, "--data", str(data), "--eval-data", str(data),
                                 "--out", str(out), "--r", "4", "--max-steps", "6", "--eval-every", "3",
                                 "--batch-size", "4", "--no-progress"])
    assert code == 0, err
    assert f"lorakit: run report {out / 'report.html'}" in stdout
    page = (out / "report.html").read_text()
    assert "LoRA r=4 on q_proj, k_proj, v_proj, o_proj" in page and "Adapter files" in page
    assert len(re.search(r'<polyline class="line raw" points="([^"]+)"', page).group(1).split()) == 6
    assert page.count('<circle class="dot eval"') == 2  # step 3, and the final eval at step 6
    assert "No eval.json here yet" in page
    code, _, err = run_cli(["eval", "--base", tiny_base, "--adapter", str(out), "--data", str(data), "--limit", "3",
                            "--max-new-tokens", "4", "--json", str(out / "eval.json")])
    assert code == 0, err
    write_report(out)
    assert (out / "report.html").read_text().count('<article class="q"') == 3


def test_report_opened_from_disk_in_chromium(browser, run_dir, tmp_path_factory):  # noqa: F811
    path = write_report(run_dir)
    page = browser.new_page(viewport=LAPTOP)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.resolve().as_uri())
    rows = page.locator("article.q")
    assert rows.count() == len(ROWS) and page.locator("#shown").inner_text() == f"showing {len(ROWS)} of {len(ROWS)}"
    # the loss chart is drawn: a line through every step, with a real size on the page
    line = page.locator('[data-chart="loss"] polyline.raw')
    assert len(line.get_attribute("points").split()) == STEPS
    box = line.bounding_box()
    assert box["width"] > 300 and box["height"] > 100
    assert page.locator('[data-chart="loss"] circle.eval').count() == 4

    def visible_queries() -> list[str]:
        return [rows.nth(i).locator("h3").inner_text() for i in range(rows.count()) if rows.nth(i).is_visible()]

    page.click('button[data-filter="failures"]')
    failures = [f"{i + 1} {r[0]}" for i, r in enumerate(ROWS) if not r[5]]
    assert visible_queries() == failures and page.locator("#shown").inner_text() == f"showing 2 of {len(ROWS)}"
    assert page.locator('button[data-filter="failures"]').get_attribute("aria-pressed") == "true"
    assert page.evaluate("location.hash") == "#failures"
    page.click('button[data-filter="fixed"]')
    assert visible_queries() == [f"{i + 1} {r[0]}" for i, r in enumerate(ROWS) if r[5] and not r[3]]
    page.click('button[data-filter="broken"]')
    assert visible_queries() == ["3 When is support open?"]
    page.click('button[data-filter="all"]')
    page.fill("#search", "invoices")
    assert visible_queries() == ["2 Where are invoices?"]
    page.fill("#search", "")
    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    shots = artifact_dir(tmp_path_factory)
    page.screenshot(path=str(shots / "report-1280x800.png"))
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing runs off the side
    page.screenshot(path=str(shots / "report-390x844.png"))
    assert png_size(shots / "report-1280x800.png") == (1280, 800) and png_size(shots / "report-390x844.png") == (390, 844)
    # a reload keeps the filter the address names
    page.goto(path.resolve().as_uri() + "#failures")
    page.reload()
    assert visible_queries() == failures
    assert all(url.startswith("file://") for url in requests), requests
    assert errors == []
    page.close()
