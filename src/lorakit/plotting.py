"""Loss curve PNG from a run's metrics.jsonl."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl ([] when there is none); a last line cut short by a kill is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return [row for row in rows if isinstance(row, dict)]


def plot_loss_curve(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """Draw train loss (and eval loss if present) against step; returns the PNG path, or None if no data.

    With keep_best, the metrics mark each new lowest eval loss ("best"); the last of them, the adapter kept at the
    top of the run's directory, gets a star.
    """
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    from lorakit.io_utils import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    kept = [(r["step"], r["eval_loss"]) for r in rows if r.get("best") and "eval_loss" in r][-1:]
    if kept:
        ax.plot(*zip(*kept), "*", markersize=16, color="tab:red", label=f"kept: step {kept[0][0]} (lowest eval loss)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (response tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return png_path
