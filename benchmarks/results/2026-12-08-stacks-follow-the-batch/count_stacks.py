"""benchmarks/serve.py with the decode step's stack builds counted (one-off; benchmarks/README.md, 2026-12-08).

    python benchmarks/results/2026-12-08-stacks-follow-the-batch/count_stacks.py [--adapters 32]

Runs serve.py's main with --runs 1 (warm-up included) and prints, to stderr, how many stacks were built, of how
many adapters, and the seconds spent building them.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
import serve  # noqa: E402

from lorakit.serve import decode_step  # noqa: E402

build = decode_step.DecodeStep._tables_for
stats = {"builds": 0, "build_s": 0.0, "steps": 0, "builds_by_size": {}}


def counted(self, names):
    stats["steps"] += 1
    if names in self._tables:
        return build(self, names)
    start = time.perf_counter()
    tables = build(self, names)
    stats["build_s"] += time.perf_counter() - start
    stats["builds"] += 1
    stats["builds_by_size"][len(names)] = stats["builds_by_size"].get(len(names), 0) + 1
    return tables


decode_step.DecodeStep._tables_for = counted
sys.argv = ["serve.py", "--runs", "1"] + sys.argv[1:]
serve.main()
print(stats, file=sys.stderr)
