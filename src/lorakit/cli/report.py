"""`lorakit report`: a run folder on one self-contained HTML page (opens from disk, no server, no network)."""

from __future__ import annotations

import argparse

from lorakit.cli.options import check_output_file


def run(args: argparse.Namespace) -> int:
    from lorakit.report import write_report

    if args.out:
        check_output_file(args.out, "--out")
    path = write_report(args.run_dir, args.out, args.eval)
    print(f"report written to {path} (open it in a browser: file://{path.resolve()})")
    return 0


def register(sub) -> None:
    p = sub.add_parser("report", help="the run's settings, curves, scores and every answer on one HTML page",
                       description="Write one self-contained HTML file about a run folder: its settings, the train "
                                   "and eval loss curves, throughput, the base-vs-adapter scores and every held-out "
                                   "question with both answers and their key facts marked found or missing "
                                   "(filterable to the failures). It opens from disk, with no server and no network.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of `lorakit train` or `lorakit demo`")
    p.add_argument("--out", default=None, help="the HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--eval", default=None, metavar="FILE",
                   help="scores to show: a `lorakit eval --json` file (default RUN_DIR/eval.json when there is one)")
    p.set_defaults(func=run)
