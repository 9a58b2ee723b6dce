"""Benchmark `e2e-wsi synth`: the default 24-slide cohort of 8192 x 8192 slides, 1 and 2 workers.

Run: .venv/bin/python benchmarks/bench_synth.py [--num-slides 24] [--size 8192] [--workers 1 2]

Prints wall time per run, slides per second, the cohort's size on disk, the 1-minute load average
before each run (other processes share the CPU) and a single-slide breakdown (paint vs. TIFF write).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _single_slide(size: int) -> tuple[float, float]:
    from e2e_wsi.slides.writer import write_levels
    from e2e_wsi.synth.render import paint_slide

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    small, _ = paint_slide(rng, (size, size), "subtype", 0, 0.03, scale=4)
    painted = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_levels(
            Path(tmp, "s.svs"),
            small,
            4,
            (size, size),
            mpp=0.25,
            objective_power=40,
            downsamples=(1, 4, 16),
            tile=256,
            quality=90,
        )
    return painted - start, time.perf_counter() - painted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-slides", type=int, default=24)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from e2e_wsi.synth.cohort import synthesize_cohort

    print(f"cpus: {os.cpu_count()}  slides: {args.num_slides} x {args.size}^2 px  task: subtype")
    paint, write = _single_slide(args.size)
    print(f"single slide in-process: paint {paint:.2f} s  write (3-level JPEG TIFF) {write:.2f} s")
    for workers in args.workers:
        root = Path(tempfile.mkdtemp(prefix="bench-synth-"))
        try:
            load = os.getloadavg()[0]
            start, cpu = time.perf_counter(), time.process_time()
            synthesize_cohort(root / "cohort", num_slides=args.num_slides, size=args.size, workers=workers)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            disk = sum(p.stat().st_size for p in (root / "cohort").rglob("*") if p.is_file())
            # with 1 worker everything runs in this process, so its CPU time is the cohort's CPU cost
            cpu_note = f", CPU {cpu:.1f} s" if workers == 1 else ""
            print(
                f"workers={workers}: {wall:.1f} s wall{cpu_note}  ({args.num_slides / wall:.2f} slides/s, "
                f"{disk / 2**20:.0f} MiB on disk, load avg before {load:.2f})"
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
