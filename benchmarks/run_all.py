"""`make bench`: run every benchmark script in turn and print its figures.

Each script prints its own table; the recorded results, with the machine and load they were measured
under, are in docs/benchmarks.md. The replication study (benchmarks/replicate_mil.py) takes about an
hour and is not part of this run: see docs/results.md for its command.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ["bench_synth.py"],
    ["bench_preprocess.py"],
    ["bench_tiling_coverage.py"],
    ["bench_loading.py"],
    ["bench_models.py", "--sizes", "1000", "10000", "--naive-max", "10000"],
    ["bench_training.py"],
    ["bench_bootstrap.py"],
    ["bench_heatmap_overlap.py"],
]


def main() -> int:
    failed = []
    for script, *args in SCRIPTS:
        print(f"\n##### {script} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        status = subprocess.call([sys.executable, str(HERE / script), *args])
        print(f"##### {script}: exit {status} after {time.perf_counter() - start:.0f} s", flush=True)
        if status != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
