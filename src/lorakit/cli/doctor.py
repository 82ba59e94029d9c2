"""`lorakit doctor`: the common LoRA mistakes, before training (settings and data) or after (a run folder)."""

from __future__ import annotations

import argparse

from lorakit.cli.options import CliError
from lorakit.cli.train import add_train_options, train_config_from_args


def run(args: argparse.Namespace) -> int:
    from lorakit.doctor import render_json
    from lorakit.doctor_data import doctor_before
    from lorakit.doctor_run import doctor_run_dir

    if args.run_dir:
        given = getattr(args, "data", None) or getattr(args, "config", None)
        report = doctor_run_dir(args.run_dir, train_config_from_args(args) if given else None)
    else:
        if not getattr(args, "data", None) and not getattr(args, "config", None):
            raise CliError("give a finished run's folder (lorakit doctor RUN_DIR), or the training data to check "
                           "before training (--data FILE, with the training flags or --config)")
        report = doctor_before(train_config_from_args(args))
    print(render_json(report) if args.json else report.render())
    return report.exit_code


def register(sub) -> None:
    p = sub.add_parser("doctor", help="find common LoRA mistakes before training (settings, data) or after (a run)",
                       description="Before training: lorakit doctor --data train.jsonl [--eval-data held_out.jsonl] "
                                   "[training flags or --config]. After: lorakit doctor RUN_DIR. Exit status 1 when a "
                                   "finding is an error, 0 otherwise.")
    p.add_argument("run_dir", nargs="?", help="a finished run's folder (the --out of lorakit train)")
    p.add_argument("--json", action="store_true", help="the findings as JSON")
    add_train_options(p)
    p.set_defaults(func=run)
