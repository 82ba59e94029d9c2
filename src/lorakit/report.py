"""A run's report: one self-contained HTML file (settings, loss and throughput curves, base-vs-adapter scores,
every held-out answer with its key facts marked found or missing) that opens from disk with no network.

Everything is inline: the styles, a small script for the question filters, the data, and the charts, which
are drawn here as SVG so the page needs no chart library. `lorakit train` writes it when a run finishes,
`lorakit demo` again after scoring, and `lorakit report RUN_DIR` on demand.
"""

from __future__ import annotations

import datetime
import html
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Optional

from lorakit.adapter_folder import (EVAL_NAME, METRICS_NAME, REPORT_NAME, TRAIN_RECORD_NAME, human_bytes,
                                    inspect_adapter, is_adapter_dir, read_json, read_train_record)
from lorakit.errors import LoraKitError
from lorakit.io_utils import atomic_write
from lorakit.plotting import read_metrics
from lorakit.report_page import PAGE, Series, svg_chart
from lorakit.train_config import format_duration

__all__ = ["write_report", "build_report", "ReportError"]


class ReportError(LoraKitError, ValueError):
    """A folder (or eval file) that a report cannot be made from."""


def write_report(run_dir: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                 eval_file: Optional[str | os.PathLike] = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report.html) atomically; returns its path.

    `eval_file`: the scores to show (default RUN_DIR/eval.json, when there is one).
    """
    page = build_report(run_dir, eval_file)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    with atomic_write(path, "w") as f:
        f.write(page)
    return path


def build_report(run_dir: str | os.PathLike, eval_file: Optional[str | os.PathLike] = None) -> str:
    """The report's HTML."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ReportError(f"{run} is not a directory; pass the --out directory of `lorakit train` or `lorakit demo`")
    record = read_train_record(run) or {}
    metrics = read_metrics(run / METRICS_NAME)
    scores = _read_eval(run, eval_file)
    adapter = _adapter_info(run)
    if not record and not metrics and scores is None:
        raise ReportError(f"{run} has nothing to report: no {TRAIN_RECORD_NAME}, {METRICS_NAME} or {EVAL_NAME}. Pass "
                          "the --out directory of `lorakit train` or `lorakit demo` (or give --eval FILE, the --json "
                          "output of `lorakit eval`)")
    settings, result = record.get("config", {}), record.get("result", {})
    title = f"lorakit report: {run.resolve().name}"
    sections = [_header(run, settings, result, adapter, scores), _curves(metrics),
                _scores_section(scores, run), _settings_section(settings, result, adapter)]
    return (PAGE.replace("%TITLE%", _e(title))
                .replace("%BODY%", "\n".join(s for s in sections if s)))


# -- reading ------------------------------------------------------------------------------------------------

def _read_eval(run: Path, eval_file: Optional[str | os.PathLike]) -> Optional[dict[str, Any]]:
    path = Path(eval_file) if eval_file is not None else run / EVAL_NAME
    if not path.is_file():
        if eval_file is not None:
            raise ReportError(f"--eval {path} does not exist; pass the JSON file `lorakit eval --json` wrote")
        return None
    data = read_json(path, ReportError)
    rows, sides = data.get("rows"), [data.get(key) for key in ("base", "tuned")]
    scored = [s for s in sides if s is not None]
    if (not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or not scored
            or not all(isinstance(s, dict) and {"accuracy", "correct", "n"} <= set(s) for s in scored)):
        raise ReportError(f"{path} is not a `lorakit eval --json` file (it needs 'rows' and the 'base' and/or 'tuned' "
                          "scores); write it with `lorakit eval --json FILE`")
    data["file"] = str(path)
    return data


def _adapter_info(run: Path) -> Optional[dict[str, Any]]:
    if not is_adapter_dir(run):
        return None
    try:
        return inspect_adapter(run)
    except (LoraKitError, OSError) as exc:  # a damaged adapter still gets a report that says so
        return {"error": str(exc)}


# -- formatting -------------------------------------------------------------------------------------------

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:,.{digits}f}"


def _time(seconds: Optional[float]) -> str:
    return "–" if seconds is None else format_duration(seconds)


def _stat(label: str, value: str, note: str = "") -> str:
    note_html = f'<div class="note">{_e(note)}</div>' if note else ""
    return f'<div class="stat"><div class="label">{_e(label)}</div><div class="value">{_e(value)}</div>{note_html}</div>'


def _method(settings: dict, adapter: Optional[dict]) -> str:
    if settings.get("full"):
        return "full fine-tuning"
    lora = settings.get("lora") or {}
    dora = lora.get("use_dora") or (adapter or {}).get("use_dora")
    name = ("QDoRA" if dora else "QLoRA") if settings.get("quantize") else ("DoRA" if dora else "LoRA")
    rank = lora.get("r", (adapter or {}).get("r"))
    targets = lora.get("target_modules", (adapter or {}).get("target_modules"))
    if isinstance(targets, list):
        targets = ", ".join(targets)
    return name + (f" r={rank}" if rank is not None else "") + (f" on {targets}" if targets else "")


# -- sections ---------------------------------------------------------------------------------------------

def _header(run: Path, settings: dict, result: dict, adapter: Optional[dict], scores: Optional[dict]) -> str:
    base = settings.get("base") or (adapter or {}).get("base_model_name_or_path") or "?"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    facts = [f"base {base}", _method(settings, adapter)]
    if settings.get("data"):
        facts.append(f"data {settings['data']}")
    stats = []
    if result:
        stats += [_stat("steps", _num(result.get("steps")), f"{_num(result.get('epochs'), 2)} epochs"),
                  _stat("training time", _time(result.get("train_seconds"))),
                  _stat("throughput", f"{_num(result.get('tokens_per_s'), 0)} tok/s",
                        f"{_num(result.get('tokens'))} tokens"),
                  _stat("train loss", f"{_num(result.get('first_loss'))} → {_num(result.get('final_loss'))}")]
        if result.get("eval_loss") is not None:
            stats.append(_stat("eval loss", _num(result.get("eval_loss"))))
    if scores is not None:
        base_s, tuned_s = scores.get("base"), scores.get("tuned")
        parts = [f"{s['accuracy']:.1%}" for s in (base_s, tuned_s) if s]
        stats.append(_stat("answer accuracy", " → ".join(parts),
                           ("base → adapter, " if base_s and tuned_s else "") + f"{scores.get('n')} held-out questions"))
    if result.get("interrupted"):
        facts.append("interrupted before the end")
    return (f'<header class="top"><h1>{_e("lorakit run report")}</h1>'
            f'<div class="sub">{_e(str(run.resolve()))} · written {_e(when)}</div>'
            f'<div class="sub">{" · ".join(_e(f) for f in facts)}</div></header>'
            f'<section class="stats">{"".join(stats)}</section>')


def _smoothed(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A trailing mean over ~4% of the run: the trend under the step-to-step noise of small batches."""
    window = max(1, round(len(points) / 25))
    out, total = [], 0.0
    for i, (x, y) in enumerate(points):
        total += y
        if i >= window:
            total -= points[i - window][1]
        out.append((x, total / min(i + 1, window)))
    return out


def _curves(metrics: list[dict]) -> str:
    def column(name: str) -> list[tuple[float, float]]:  # a NaN loss (a diverged step) cannot be drawn
        return [(r["step"], r[name]) for r in metrics if _finite(r.get("step")) and _finite(r.get(name))]

    train, evals, speed, lr = column("loss"), column("eval_loss"), column("tokens_per_s"), column("lr")
    if not train and not evals:
        return ('<section><h2>Training curves</h2><p class="empty">No loss rows in metrics.jsonl: this folder holds '
                'no training log.</p></section>')
    series = [Series("train loss", train, "raw")]
    if len(train) >= 20:
        series.append(Series("train loss, moving average", _smoothed(train), "trend"))
    if evals:
        series.append(Series("eval loss", evals, "eval", markers=True))
    values = [y for s in series for _, y in s.points]
    log = min(values) > 0 and max(values) / min(values) > 20
    y_title = "loss (response tokens)" + (", log scale" if log else "")
    charts = [("loss", svg_chart(series, "step", y_title, log_y=log, width=1120, height=300), series)]
    if speed:
        median = statistics.median(y for _, y in speed)
        tput = [Series(f"tokens/s per step (median {median:,.0f})", speed, "speed")]
        charts.append(("throughput", svg_chart(tput, "step", "tokens per second"), tput))
    if lr:
        rate = [Series("learning rate", lr, "lr")]
        charts.append(("learning-rate", svg_chart(rate, "step", "learning rate"), rate))
    blocks = []
    for name, svg, drawn in charts:
        legend = "".join(f'<span class="key {s.css}">{_e(s.name)}</span>' for s in drawn)
        blocks.append(f'<figure class="chart" data-chart="{name}">{svg}<figcaption>{legend}</figcaption></figure>')
    return f'<section><h2>Training curves</h2><div class="charts">{"".join(blocks)}</div></section>'


def _scores_section(scores: Optional[dict], run: Path) -> str:
    if scores is None:
        return ('<section><h2>Base vs adapter</h2><p class="empty">No eval.json here yet. Score the adapter on held-out '
                f'questions with <code>lorakit eval --adapter {_e(run)} --data HELD_OUT.jsonl --json '
                f'{_e(run / EVAL_NAME)}</code>, then run <code>lorakit report {_e(run)}</code> again.</p></section>')
    base_name = f"{scores['quantize']} base" if scores.get("quantize") else "base"
    cols = [(base_name, scores.get("base")), ("adapter", scores.get("tuned"))]
    cols = [(name, s) for name, s in cols if s]
    both = len(cols) == 2
    head = "".join(f"<th>{_e(name)}</th>" for name, _ in cols) + ("<th>change</th>" if both else "")

    def row(label: str, cells: list[str], change: str = "") -> str:
        tail = f"<td>{_e(change)}</td>" if both else ""
        return f"<tr><th>{_e(label)}</th>{''.join(f'<td>{_e(c)}</td>' for c in cells)}{tail}</tr>"

    acc = [s["accuracy"] for _, s in cols]
    ppl = [s.get("perplexity") for _, s in cols]
    table = (f'<table class="scores"><thead><tr><th></th>{head}</tr></thead><tbody>'
             + row(f"answer accuracy ({scores.get('metric', 'key facts')})", [f"{a:.1%}" for a in acc],
                   f"{(acc[-1] - acc[0]) * 100:+.1f} points" if both else "")
             + row("correct / questions", [f"{s['correct']}/{s['n']}" for _, s in cols])
             + row("response perplexity", [_num(p) for p in ppl],
                   f"× {ppl[-1] / ppl[0]:.2f}" if both and ppl[0] and ppl[-1] else "")
             + "</tbody></table>")
    note = (f'<p class="note">{_e(scores.get("n"))} questions from {_e(scores.get("data", "?"))}; answers of up to '
            f'{_e(scores.get("max_new_tokens"))} tokens, greedy; scored in {_time(scores.get("seconds"))}; '
            f'file {_e(scores["file"])}</p>')
    return f'<section><h2>Base vs adapter</h2>{table}{note}</section>' + _questions(scores["rows"], cols)


def _questions(rows: list[dict], cols: list[tuple[str, dict]]) -> str:
    from lorakit.evaluate import fact_found  # torch comes with it: only when there are answers to mark

    keys = [key for key in ("base", "tuned") if any(f"{key}_answer" in r for r in rows)]
    last = keys[-1] if keys else "tuned"
    counts = {"all": len(rows), "failures": sum(not r.get(f"{last}_correct") for r in rows)}
    if keys == ["base", "tuned"]:
        counts["fixed"] = sum(bool(r.get("tuned_correct")) and not r.get("base_correct") for r in rows)
        counts["broken"] = sum(bool(r.get("base_correct")) and not r.get("tuned_correct") for r in rows)
    labels = {"all": "all", "failures": "adapter wrong" if last == "tuned" else "wrong",
              "fixed": "fixed by the adapter", "broken": "broken by the adapter"}
    buttons = "".join(f'<button type="button" data-filter="{k}" aria-pressed="{str(k == "all").lower()}">'
                      f'{_e(labels[k])} <span class="count">{n}</span></button>' for k, n in counts.items())
    names = {"base": cols[0][0] if cols else "base", "tuned": "adapter"}
    items = []
    for i, r in enumerate(rows):
        facts = [str(f) for f in r.get("facts") or []]
        answers = []
        for key in keys:
            answer = str(r.get(f"{key}_answer", ""))
            ok = bool(r.get(f"{key}_correct"))
            marks = "".join(f'<li class="{"found" if fact_found(answer, f) else "missing"}">{_e(f)}</li>'
                            for f in facts)
            answers.append(f'<div class="answer {key}"><h4>{_e(names[key])} <span class="verdict '
                           f'{"ok" if ok else "bad"}">{"correct" if ok else "wrong"}</span></h4>'
                           f'<p>{_e(answer)}</p>' + (f'<ul class="facts">{marks}</ul>' if facts else "") + "</div>")
        data = " ".join(f'data-{key}="{int(bool(r.get(f"{key}_correct")))}"' for key in keys)
        where = f' <span class="where">{_e(r["where"])}</span>' if r.get("where") else ""
        items.append(f'<article class="q" {data} data-failed="{int(not r.get(f"{last}_correct"))}">'
                     f'<h3><span class="num">{i + 1}</span> {_e(r.get("query", ""))}{where}</h3>'
                     f'<div class="answers n{len(keys)}">{"".join(answers)}</div>'
                     f'<details><summary>reference answer</summary><p>{_e(r.get("reference", ""))}</p></details>'
                     "</article>")
    return (f'<section id="questions"><h2>Every held-out question</h2>'
            f'<p class="note">Key facts in <span class="found-key">green</span> occur in that answer, in '
            f'<span class="missing-key">red</span> they are missing; an answer is correct when it has them all.</p>'
            f'<div class="filters" role="group" aria-label="show">{buttons}'
            f'<input id="search" type="search" placeholder="search questions and answers">'
            f'<span id="shown" class="note"></span></div>{"".join(items)}</section>')


def _flatten(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((prefix + key, value))
    return out


def _table(pairs: list[tuple[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, (list, dict)):
            return json.dumps(value)
        if isinstance(value, bool) or value is None:
            return json.dumps(value)
        return f"{value:.6g}" if isinstance(value, float) else str(value)

    return ('<table class="kv"><tbody>' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(cell(v))}</td></tr>" for k, v in pairs)
            + "</tbody></table>")


def _settings_section(settings: dict, result: dict, adapter: Optional[dict]) -> str:
    blocks = []
    if settings:
        blocks.append(f"<div><h3>Training settings ({_e(TRAIN_RECORD_NAME)})</h3>{_table(_flatten(settings))}</div>")
    if result:
        blocks.append(f"<div><h3>Result</h3>{_table(_flatten(result))}</div>")
    if adapter:
        if "error" in adapter:
            pairs = [("error", adapter["error"])]
        else:
            pairs = [(k, adapter.get(k)) for k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora",
                                                   "adapted_modules", "parameters", "weights_file")]
            pairs += [("weights size", human_bytes(adapter["weights_bytes"])),
                      ("folder size", human_bytes(adapter["directory_bytes"]))]
        blocks.append(f"<div><h3>Adapter files</h3>{_table(pairs)}</div>")
    if not blocks:
        return ""
    return f'<section><h2>Settings</h2><div class="settings">{"".join(blocks)}</div></section>'


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
