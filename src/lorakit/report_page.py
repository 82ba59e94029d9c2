"""The run report's page: its HTML frame (inline styles and script) and line charts drawn as inline SVG."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

LEFT, RIGHT, TOP, BOTTOM = 62, 14, 12, 42  # room for the tick labels and the axis titles
MAX_POINTS = 1200  # a line of a longer run is thinned to this many points (the page stays small)


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    css: str  # the class that colours it (see PAGE's styles)
    markers: bool = False  # a dot per point (with its value on hover) instead of a plain line


def _linear_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    raw = (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9)
    return [i * step for i in range(first, math.floor(hi / step + 1e-9) + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 2, 5), (1,)):
        ticks = [m * 10 ** d for d in decades for m in mantissas if lo <= m * 10 ** d <= hi]
        if len(ticks) <= 8:
            break
    return ticks or [lo, hi]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def svg_chart(series: list[Series], x_title: str, y_title: str, log_y: bool = False, width: int = 560,
              height: int = 230) -> str:
    """A line chart of `series` (x: step) as an <svg> element, with grid, ticks and axis titles. Its size is the one
    it is drawn at on a laptop's screen (text keeps its size there); narrower screens scale it down."""
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if log_y:
        y_lo, y_hi = min(ys) / 1.15, max(ys) * 1.15
        ticks = _log_ticks(y_lo, y_hi)
        scale = lambda y: (math.log10(y) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))  # noqa: E731
    else:
        y_lo = 0.0 if min(ys) >= 0 else min(ys)  # a quantity that cannot go below 0 is drawn from 0
        y_hi = max(ys) * 1.08 if max(ys) > 0 else 1.0
        if y_hi <= y_lo:
            y_hi = y_lo + 1
        ticks = _linear_ticks(y_lo, y_hi)
        scale = lambda y: (y - y_lo) / (y_hi - y_lo)  # noqa: E731
    plot_w, plot_h = width - LEFT - RIGHT, height - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return TOP + (1 - scale(y)) * plot_h

    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{html.escape(y_title)} against {html.escape(x_title)}">',
             f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>']
    for tick in ticks:
        y = py(tick)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_label(tick)}</text>')
    for tick in _linear_ticks(x_lo, x_hi, 6):
        if tick == int(tick) or x_hi - x_lo < 6:  # steps are whole numbers
            x = px(tick)
            parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + plot_h}"/>'
                         f'<text class="tick" x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">'
                         f'{_label(tick)}</text>')
    parts.append(f'<text class="title" x="{LEFT + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle">'
                 f'{html.escape(x_title)}</text>'
                 f'<text class="title" transform="translate(14 {TOP + plot_h / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle">{html.escape(y_title)}</text>')
    for s in series:
        if not s.points:
            continue
        if s.markers or len(s.points) == 1:
            if len(s.points) > 1:
                line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
                parts.append(f'<polyline class="line {s.css}" points="{line}"/>')
            parts += [f'<circle class="dot {s.css}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5">'
                      f'<title>{html.escape(s.name)}: step {_label(x)}, {y:.4g}</title></circle>' for x, y in s.points]
        else:
            line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in _thin(s.points))
            parts.append(f'<polyline class="line {s.css}" points="{line}"><title>{html.escape(s.name)}</title>'
                         "</polyline>")
    parts.append("</svg>")
    return "".join(parts)


# The page. Content-Security-Policy: nothing may be fetched (no fonts, scripts, images or requests); the
# page is whole as it stands on disk.
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%TITLE%</title>
<style>
  :root { --ink: #1d2330; --muted: #5d6678; --line: #dde1e8; --ok: #17803d; --bad: #b00020; --accent: #2f6fed; }
  * { box-sizing: border-box; }
  [hidden] { display: none !important; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f5f6f8;
         color: var(--ink); }
  main { max-width: 1200px; margin: auto; padding: 16px 18px 40px; }
  header.top h1 { font-size: 22px; margin: 4px 0; }
  .sub { color: var(--muted); font-size: 13px; overflow-wrap: anywhere; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin: 14px 0; }
  section.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 10px; }
  .stat .label { font-size: 12px; color: var(--muted); }
  .stat .value { font-size: 20px; font-weight: 600; }
  .stat .note { font-size: 12px; color: var(--muted); }
  h2 { font-size: 17px; margin: 0 0 10px; }
  h3 { font-size: 14px; margin: 0 0 6px; }
  .note, .empty { font-size: 13px; color: var(--muted); }
  code { background: #eef1f6; padding: 1px 4px; border-radius: 4px; overflow-wrap: anywhere; }
  .charts { display: grid; grid-template-columns: 1fr 1fr; gap: 14px 20px; }
  figure.chart { margin: 0; min-width: 0; }
  figure[data-chart=loss] { grid-column: 1 / -1; }
  svg.plot { width: 100%; height: auto; font-size: 12px; }
  svg .frame { fill: none; stroke: #c9ced8; }
  svg .grid { stroke: #eceef2; }
  svg .tick { fill: var(--muted); }
  svg .title { fill: var(--ink); font-size: 12px; }
  svg .line { fill: none; stroke-width: 1.6; stroke-linejoin: round; }
  svg .dot { stroke: #fff; stroke-width: 1; }
  .raw { --c: #9db4e6; } .trend { --c: #1f4fb8; } .eval { --c: #d9480f; } .speed { --c: #2b8a3e; } .lr { --c: #7048e8; }
  svg .line.raw, svg .line.speed, svg .line.lr { stroke: var(--c); }
  svg .line.trend { stroke: var(--c); stroke-width: 2.4; }
  svg .line.eval { stroke: var(--c); stroke-dasharray: 4 3; }
  svg .dot.eval { fill: var(--c); }
  figcaption { font-size: 12px; color: var(--muted); display: flex; flex-wrap: wrap; gap: 4px 14px; }
  figcaption .key::before { content: ""; display: inline-block; width: 14px; height: 3px; margin: 0 5px 3px 0;
                            background: var(--c); vertical-align: middle; }
  table { border-collapse: collapse; font-size: 14px; }
  th, td { text-align: left; padding: 4px 12px 4px 0; border-bottom: 1px solid var(--line); vertical-align: top; }
  table.scores td { font-variant-numeric: tabular-nums; }
  table.kv td { overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: 12.5px; }
  table.kv th { font-weight: 500; color: var(--muted); white-space: nowrap; }
  .settings { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 16px; }
  .filters { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; margin: 10px 0; }
  .filters button { font: inherit; font-size: 13px; border: 1px solid #c9ced8; background: #fff; border-radius: 16px;
                    padding: 4px 12px; cursor: pointer; }
  .filters button[aria-pressed=true] { background: var(--accent); border-color: var(--accent); color: #fff; }
  .filters .count { font-weight: 600; }
  #search { font: inherit; font-size: 13px; padding: 4px 8px; border: 1px solid #c9ced8; border-radius: 6px;
            min-width: 200px; flex: 1 1 200px; max-width: 340px; }
  article.q { border-top: 1px solid var(--line); padding: 12px 0; }
  article.q h3 { font-size: 15px; }
  .num { display: inline-block; min-width: 28px; color: var(--muted); font-weight: 500; }
  .where { color: var(--muted); font-weight: 400; font-size: 12px; }
  .answers { display: grid; gap: 12px; }
  .answers.n2 { grid-template-columns: 1fr 1fr; }
  .answer { background: #f8f9fb; border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; min-width: 0; }
  .answer h4 { margin: 0 0 4px; font-size: 13px; }
  .answer p { margin: 0 0 6px; white-space: pre-wrap; overflow-wrap: anywhere; }
  .verdict { font-size: 11px; border-radius: 10px; padding: 1px 8px; margin-left: 4px; }
  .verdict.ok { background: #dff3e5; color: var(--ok); } .verdict.bad { background: #fde8ec; color: var(--bad); }
  ul.facts { list-style: none; padding: 0; margin: 0; display: flex; flex-wrap: wrap; gap: 4px; }
  ul.facts li { font-size: 12px; border-radius: 4px; padding: 1px 6px; overflow-wrap: anywhere; }
  li.found, .found-key { background: #dff3e5; color: var(--ok); }
  li.missing, .missing-key { background: #fde8ec; color: var(--bad); }
  li.found::before { content: "✓ "; } li.missing::before { content: "✗ "; }
  details { margin-top: 6px; font-size: 13px; } details p { white-space: pre-wrap; margin: 4px 0; }
  summary { cursor: pointer; color: var(--muted); }
  @media (max-width: 700px) { .answers.n2, .charts { grid-template-columns: 1fr; } main { padding: 10px; }
                              section { padding: 10px; }
                              /* the wide loss chart keeps readable labels: it scrolls sideways instead */
                              figure[data-chart=loss] { overflow-x: auto; }
                              figure[data-chart=loss] svg { min-width: 680px; } }
</style>
</head>
<body>
<main>
%BODY%
</main>
<script>
"use strict";
(() => {  // the question filters: which rows show, by verdict and by the words in the search box
  const rows = [...document.querySelectorAll("article.q")];
  const buttons = [...document.querySelectorAll(".filters button")];
  if (!rows.length) return;
  const search = document.getElementById("search"), shown = document.getElementById("shown");
  const tests = {all: () => true, failures: (r) => r.dataset.failed === "1",
                 fixed: (r) => r.dataset.base === "0" && r.dataset.tuned === "1",
                 broken: (r) => r.dataset.base === "1" && r.dataset.tuned === "0"};
  let filter = buttons.some((b) => b.dataset.filter === location.hash.slice(1)) ? location.hash.slice(1) : "all";
  function apply() {
    const words = search.value.trim().toLowerCase();
    let count = 0;
    for (const r of rows) {
      const keep = tests[filter](r) && (!words || r.textContent.toLowerCase().includes(words));
      r.hidden = !keep;
      count += keep;
    }
    for (const b of buttons) b.setAttribute("aria-pressed", String(b.dataset.filter === filter));
    shown.textContent = `showing ${count} of ${rows.length}`;
  }
  for (const b of buttons) {
    b.onclick = () => {
      filter = b.dataset.filter;
      try { history.replaceState(null, "", "#" + filter); } catch (e) { /* some file:// contexts refuse it */ }
      apply();
    };
  }
  search.oninput = apply;
  apply();
})();
</script>
</body>
</html>
"""
