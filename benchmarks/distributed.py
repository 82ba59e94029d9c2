"""`lorakit train` on one process vs on N processes under torchrun (DDP, FSDP), same settings. Prints JSON.

    python benchmarks/distributed.py                       # the demo's settings, 30 steps, 1 vs 2 processes
    python benchmarks/distributed.py --jobs single,ddp,fsdp --steps 20 --rounds 3 -- --batch-size 8

Each round runs every job once (the order rotates between rounds), each from scratch in its own output
directory; tokens/s is the run's own figure (training steps only, model loading excluded). On a CPU the
single process uses all --threads, and each of the N processes --threads / N of them, so all jobs use
the same cores. Peak memory is the largest resident set of any one process of the job (wait4's
ru_maxrss), loading included. The JSON gives the median tokens/s of each job and its ratio to the single
process, and how far the final losses are apart (the same batches in the same order: equal in fp32 up
to summation order; bf16 rounding differs with the batch shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from train_step import emit  # noqa: E402  (benchmarks/ is the script's directory)

DEMO_DATA = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "demo_data" / "train.jsonl"
# lorakit demo's training settings (cli.demo_train_config), minus the number of steps.
DEMO_ARGS = ["--lora-r", "16", "--alpha", "32", "--dropout", "0", "--lr", "3e-3", "--batch-size", "4",
             "--max-length", "256", "--bf16", "--attention", "eager"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2")
    p.add_argument("--data", default=str(DEMO_DATA))
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--jobs", default="single,ddp", help="comma-separated: single, ddp, fsdp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads in all (per job)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("train_args", nargs="*", help="after --: lorakit train options (default: the demo's)")
    return p.parse_args(argv)


def run_job(args, job: str, out: Path) -> dict:
    train = ["train", "--base", args.base, "--data", args.data, "--max-steps", str(args.steps), "--out", str(out),
             "--no-progress", *(args.train_args or DEMO_ARGS), *(["--fsdp"] if job == "fsdp" else [])]
    processes = 1 if job == "single" else args.processes
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // processes))}
    if processes == 1:
        command = [sys.executable, "-m", "lorakit", *train]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(processes), "-m", "lorakit", *train]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        # wait4's ru_maxrss: the largest resident set of the process or of any descendant it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{log.read()[-3000:]}")
    result = json.loads((out / "lorakit_train.json").read_text())["result"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    return {"tokens_per_s": result["tokens_per_s"], "losses": losses, "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv=None) -> dict:
    args = parse_args(argv)
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if args.processes < 2 or "single" not in jobs or not set(jobs) <= {"single", "ddp", "fsdp"}:
        raise SystemExit("--processes must be at least 2, and --jobs name 'single' and some of ddp, fsdp")
    runs = {name: [] for name in jobs}
    with tempfile.TemporaryDirectory(prefix="lorakit-ddp-bench-") as tmp:
        for round_ in range(args.rounds):
            shift = round_ % len(jobs)
            for name in jobs[shift:] + jobs[:shift]:
                runs[name].append(run_job(args, name, Path(tmp) / f"{name}-{round_}"))
    speed = {name: statistics.median(r["tokens_per_s"] for r in found) for name, found in runs.items()}
    last = {name: found[-1]["losses"] for name, found in runs.items()}
    result = {
        "config": {"base": args.base, "data": args.data, "steps": args.steps, "rounds": args.rounds,
                   "processes": args.processes, "threads": args.threads,
                   "train_args": args.train_args or DEMO_ARGS},
        "tokens_per_s_median": {k: round(v, 1) for k, v in speed.items()},
        "tokens_per_s_runs": {k: [round(r["tokens_per_s"], 1) for r in found] for k, found in runs.items()},
        "ratio_to_single": {k: round(v / speed["single"], 3) for k, v in speed.items() if k != "single"},
        "peak_rss_mb_per_process_median": {k: round(statistics.median(r["peak_rss_mb"] for r in found))
                                           for k, found in runs.items()},
        "final_loss": {k: v[-1] for k, v in last.items()},
        "max_abs_step_loss_diff_to_single": {k: max(abs(a - b) for a, b in zip(last["single"], v))
                                             for k, v in last.items() if k != "single"},
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
