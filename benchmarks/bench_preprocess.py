"""Benchmark of `e2e-wsi preprocess`: pipeline patches/s vs a raw read+encode ceiling, and cache reads.

Usage: python benchmarks/bench_preprocess.py [--size 8192] [--copies 8] [--workdir DIR]

On one synthetic 40x slide (listed ``--copies`` times under different ids), it measures:
1. the ceiling: a bare loop, in this process, of OpenSlide ``read_region`` (same level and size as the
   pipeline) + the resize the pipeline needs + JPEG encoding, for the same patches (imagecodecs and PIL);
2. the pipeline (tissue detection, tiling, encoding, staging, LMDB commits, QC) with 1 and 2 workers;
3. random-access reads of the cache: single ``get`` and batched ``get_many`` (decoded patches/s).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from e2e_wsi.cache.preprocess import preprocess
from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cache.worker import PreprocessConfig, SlideJob
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.tiling import encode_jpeg, grid_spec, pil_encode_jpeg, read_patch, tissue_grid
from e2e_wsi.slides.tissue import segment_tissue, segmentation_downsample
from e2e_wsi.synth.cohort import synthesize_cohort

MAGS = (20.0, 10.0)


def ceiling(path: Path, copies: int, config: PreprocessConfig, encoder) -> tuple[int, float]:  # noqa: ANN001
    """Patches and seconds of the bare read(+resize)+encode loop over the pipeline's patches."""
    with Slide(path) as slide:  # grids computed outside the timed loop
        ds = segmentation_downsample(slide.dimensions, config.tissue)
        mask = segment_tissue(slide.read_downsampled(ds), ds, slide.resolution.mpp, config.tissue)
        plans = [(grid_spec(slide, m, 256), None) for m in MAGS]
        plans = [
            (spec, tissue_grid(slide.dimensions, spec, mask, config.tissue_threshold)[0]) for spec, _ in plans
        ]
    n, start = 0, time.perf_counter()
    for _ in range(copies):
        with Slide(path) as slide:  # fresh handle per copy, as the pipeline opens each slide
            for spec, coords in plans:
                for xy in coords:
                    encoder(read_patch(slide, spec, xy, 256), config.jpeg_quality)
                    n += 1
    return n, time.perf_counter() - start


def pipeline(jobs: list[SlideJob], out: Path, config: PreprocessConfig, workers: int) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)  # a fresh cache: nothing skipped as already done
    start = time.perf_counter()
    rows = preprocess(jobs, out, config, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    assert all(r["status"] == "ok" and not r["cached"] for r in rows)
    return sum(sum(r["patches"].values()) for r in rows), seconds


def reads(cache_dir: Path, n: int = 3000, batch: int = 64) -> tuple[float, float]:
    cache = PatchCache(cache_dir)
    rng = np.random.default_rng(0)
    ids = cache.slide_ids()
    picks = [(ids[rng.integers(len(ids))], MAGS[rng.integers(len(MAGS))]) for _ in range(n)]
    start = time.perf_counter()
    for slide_id, mag in picks:
        cache.get(slide_id, mag, int(rng.integers(cache.count(slide_id, mag))))
    single = n / (time.perf_counter() - start)
    start, done = time.perf_counter(), 0
    for slide_id, mag in picks[: n // batch]:
        idx = rng.integers(cache.count(slide_id, mag), size=batch)
        done += len(cache.get_many(slide_id, mag, idx))
    return single, done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    manifest = synthesize_cohort(root / "cohort", num_slides=1, size=args.size, workers=1, overwrite=True)
    slide = next((manifest.parent / "slides").glob("*.svs"))
    jobs = [SlideJob(f"copy{k}", slide) for k in range(args.copies)]
    config = PreprocessConfig(MAGS)
    print(f"slide {slide.name}: {args.size}px, 40x; magnifications {MAGS}; {args.copies} copies")

    n, t = ceiling(slide, args.copies, config, encode_jpeg)
    ceil = n / t
    print(f"ceiling read+encode (imagecodecs): {n} patches in {t:.2f}s = {ceil:.0f} patches/s")
    n_pil, t_pil = ceiling(slide, args.copies, config, pil_encode_jpeg)
    print(
        f"ceiling read+encode (PIL):         {n_pil} patches in {t_pil:.2f}s = {n_pil / t_pil:.0f} patches/s"
    )
    for workers in (1, 2):
        n_p, t_p = pipeline(jobs, root / f"cache-w{workers}", config, workers)
        rate = n_p / t_p
        print(
            f"pipeline --workers {workers}: {n_p} patches in {t_p:.2f}s = {rate:.0f} patches/s "
            f"= {rate / workers / ceil:.2f}x ceiling per worker"
        )
    single, batched = reads(root / "cache-w1")
    print(f"cache random reads: get() {single:.0f} patches/s; get_many(64) {batched:.0f} patches/s (decoded)")


if __name__ == "__main__":
    main()
