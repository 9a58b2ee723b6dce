"""Peak memory and time of ``e2e-wsi preprocess`` at extreme magnifications (issue 21, bounded tiling).

Writes a 4096 x 4096 synthetic slide at 20x (levels 1, 4, 16), then runs ``e2e-wsi preprocess`` on it
once per magnification in a fresh process and prints its exit status, wall time and peak RSS (the
child's ``ru_maxrss``). ``--src DIR`` runs the package found in DIR instead (e.g. an older checkout
exported with ``git archive``), to compare before/after on one machine.

Run: ``nice -n 10 python benchmarks/bench_limits.py [--mags 0.01 0.2 5] [--src DIR]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _slide(folder: Path, size: int = 4096) -> Path:
    """Write the test slide (run in a child process: a parent's pages would count in the children's peak)."""
    import numpy as np

    from e2e_wsi.slides.writer import write_pyramidal_tiff

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    tissue = ((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1.0
    image = np.full((size, size, 3), 240, np.uint8)
    image[tissue] = (200, 110, 170)
    return write_pyramidal_tiff(folder / "s.svs", image, mpp=0.5, objective_power=20, downsamples=(1, 4, 16))


def _run(src: str, slides: Path, out: Path, mag: str) -> tuple[int, float, float]:
    """(exit status, seconds, peak RSS in MB) of one preprocess in a child process."""
    env = {**os.environ, "PYTHONPATH": src}
    args = [sys.executable, "-m", "e2e_wsi", "preprocess", "--slides-dir", str(slides), "--out", str(out),
            "--magnifications", mag, "--workers", "0", "--quiet", "--no-qc"]  # fmt: skip
    start = time.perf_counter()
    # cwd outside any checkout: `python -m` puts the working directory first on the import path.
    proc = subprocess.Popen(
        args, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(f"  exit {code}: {err.strip().splitlines()[-1] if err.strip() else ''}"[:200])
    return code, time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mags", nargs="+", default=["0.01", "0.2", "5"])
    parser.add_argument("--write-slide", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1]), help="package root to run")
    args = parser.parse_args()
    if args.write_slide:
        _slide(Path(args.write_slide))
        return
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with tempfile.TemporaryDirectory() as tmp:
        slides = Path(tmp) / "slides"
        slides.mkdir()
        subprocess.run([sys.executable, __file__, "--write-slide", str(slides)], check=True)
        print(f"{'magnification':>13} {'exit':>4} {'seconds':>8} {'peak RSS MB':>12}")
        for mag in args.mags:
            code, seconds, rss = _run(args.src, slides, Path(tmp) / f"cache-{mag}", mag)
            print(f"{mag:>13} {code:>4} {seconds:>8.1f} {rss:>12.0f}")


if __name__ == "__main__":
    main()
