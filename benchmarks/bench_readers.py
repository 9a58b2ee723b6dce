"""Benchmark of the slide reader backends: patches/s through each, on copies of one slide.

Usage: python benchmarks/bench_readers.py [--size 8192] [--rounds 5] [--workdir DIR] [--only_openslide]

One synthetic 40x slide (``synth``'s painter) is written as Aperio SVS, OME-TIFF and DICOM (same JPEG
tiles) and, from its level 0, as an uncompressed CZI (pylibCZIrw writes no pyramid) and a PNG (plain image
backend, read whole). The patch grid is planned once (tissue at 20x, 10x and 5x, 256-px patches, as
``preprocess`` cuts them); the timed loop only reads patches (``read_patch``: region + resize), so the
figures compare readers, not JPEG encoding or LMDB.

1. OpenSlide before vs after the backend seam: "before" is the read path of ``Slide`` as it was (commit
   8c87431: ``openslide.OpenSlide.read_region``, alpha check, composite, RGB conversion, reproduced below
   as ``_BeforeSlide``); "after" is ``open_slide(path, "openslide")``. Rounds alternate the two so load
   drifts hit both; the ratio of medians is reported.
2. Every backend on its copy of the slide, in the same alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from e2e_wsi.slides import open_slide
from e2e_wsi.slides.reader import Resolution
from e2e_wsi.slides.tiling import GridSpec, grid_spec, read_patch, tissue_grid
from e2e_wsi.slides.tissue import TissueParams, segment_tissue, segmentation_downsample
from e2e_wsi.slides.writer import write_slide_levels
from e2e_wsi.synth.render import paint_slide

MAGS = (20.0, 10.0, 5.0)
PATCH = 256


class _BeforeSlide:
    """The OpenSlide read path of ``Slide`` before the backends (8c87431 e2e_wsi/slides/reader.py:245-258)."""

    def __init__(self, path: Path, resolution: Resolution) -> None:
        self._osr = openslide.OpenSlide(str(path))
        self.path, self.resolution = path, resolution
        self.level_downsamples, self.dimensions = self._osr.level_downsamples, self._osr.dimensions

    def best_level(self, downsample: float) -> int:
        return max(i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01)

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        rgba = self._osr.read_region(location, level, size)
        if rgba.getchannel("A").getextrema()[0] < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgba = Image.alpha_composite(white, rgba)
        return rgba.convert("RGB")

    def close(self) -> None:
        self._osr.close()


def write_copies(root: Path, size: int) -> dict[str, Path]:
    """The slide in every format (kept from an earlier run in the same ``--workdir`` of that size)."""
    from tests.helpers.slides import write_czi

    done = {
        "svs": root / "s.svs",
        "ome-tiff": root / "s.ome.tif",
        "dicom": root / "s_dicom",
        "czi": root / "s.czi",
    }
    done["png"] = root / "s.png"
    if all(p.exists() for p in done.values()):
        with open_slide(done["svs"]) as slide:
            if slide.dimensions == (size, size):
                return done

    rng = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(1,)))
    small, _ = paint_slide(
        rng, (size, size), "subtype", 1.0, 0.05, num_classes=2, num_grades=6, pen_marks=False, scale=4
    )
    common = {"mpp": 0.25, "objective_power": 40, "downsamples": (1, 4, 16), "tile": 256, "quality": 90}
    paths = {
        fmt: write_slide_levels(root / name, small, 4, (size, size), fmt=fmt, key="bench", **common)
        for fmt, name in (("svs", "s.svs"), ("ome-tiff", "s.ome.tif"), ("dicom", "s_dicom"))
    }
    with open_slide(paths["svs"]) as slide:  # level 0 as the readers decode it, for the CZI and PNG copies
        level0 = np.asarray(slide.read_rgb((0, 0), 0, slide.dimensions))
    paths["czi"] = write_czi(root / "s.czi", level0, mpp=0.25)
    Image.fromarray(level0).save(root / "s.png", compress_level=1)
    paths["png"] = root / "s.png"
    return paths


def plan(path: Path) -> list[tuple[GridSpec, np.ndarray]]:
    """The kept patches of each magnification (OpenSlide on the SVS, as preprocess plans them)."""
    params = TissueParams()
    with open_slide(path, "openslide") as slide:
        ds = segmentation_downsample(slide.dimensions, params)
        mask = segment_tissue(slide.read_downsampled(ds), ds, slide.resolution.mpp, params)
        specs = [grid_spec(slide, m, PATCH) for m in MAGS]
        return [(spec, tissue_grid(slide.dimensions, spec, mask, 0.5)[0]) for spec in specs]


def time_reads(opener: Callable[[], object], plans: list[tuple[GridSpec, np.ndarray]]) -> tuple[int, float]:
    """Patches read and seconds, opening the slide inside the timed span (as each worker does)."""
    n, start = 0, time.perf_counter()
    slide = opener()
    try:
        for spec, coords in plans:
            for xy in coords:
                read_patch(slide, spec, xy, PATCH)  # type: ignore[arg-type]
                n += 1
    finally:
        slide.close()  # type: ignore[attr-defined]
    return n, time.perf_counter() - start


def respec(
    plans: list[tuple[GridSpec, np.ndarray]], path: Path, backend: str
) -> list[tuple[GridSpec, np.ndarray]]:
    """The same patches planned against another copy's levels (a CZI or PNG has other level downsamples)."""
    with open_slide(path, backend, global_mpp=0.25) as slide:
        return [(grid_spec(slide, spec.magnification, PATCH), coords) for spec, coords in plans]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192, help="level-0 side of the slide (default 8192)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the copies go (default a temp dir)")
    parser.add_argument(
        "--only_openslide",
        action="store_true",
        help="time only OpenSlide before vs after (more rounds for less)",
    )
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_readers_"))
    root.mkdir(parents=True, exist_ok=True)
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in model.splitlines() if ln.startswith("Model name")), "?"
    )
    print(f"machine: {model}, {os.cpu_count()} CPUs; load average before: {os.getloadavg()}")
    start = time.perf_counter()
    paths = write_copies(root, args.size)
    print(
        f"copies written in {time.perf_counter() - start:.0f} s: "
        + ", ".join(f"{k}={v.name}" for k, v in paths.items())
    )
    plans = plan(paths["svs"])
    print(
        "patches per magnification: "
        + ", ".join(f"{s.magnification:g}x={len(c)} (level {s.level})" for s, c in plans)
    )
    with open_slide(paths["svs"]) as slide:
        resolution = slide.resolution
    cases: dict[str, tuple[Callable[[], object], list]] = {
        "openslide BEFORE (svs)": (lambda: _BeforeSlide(paths["svs"], resolution), plans),
        "openslide after (svs)": (lambda: open_slide(paths["svs"], "openslide"), plans),
        "tiffslide (svs)": (lambda: open_slide(paths["svs"], "tiffslide"), plans),
        "tiffslide (ome-tiff)": (lambda: open_slide(paths["ome-tiff"], "tiffslide"), plans),
        "dicom (wsidicom)": (lambda: open_slide(paths["dicom"], "dicom"), plans),
        "czi (pylibCZIrw, no pyramid)": (
            lambda: open_slide(paths["czi"], "czi"),
            respec(plans, paths["czi"], "czi"),
        ),
        "image (png, read whole)": (
            lambda: open_slide(paths["png"], "image", global_mpp=0.25),
            respec(plans, paths["png"], "image"),
        ),
    }
    if args.only_openslide:
        cases = {k: v for k, v in cases.items() if k.startswith("openslide")}
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # alternate: drifts hit every case
        for name in order:
            opener, case_plans = cases[name]
            n, seconds = time_reads(opener, case_plans)
            rates[name].append(n / seconds)
    print(f"load average after: {os.getloadavg()}; {args.rounds} rounds, median patches/s (min-max)")
    ref = statistics.median(rates["openslide after (svs)"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:32s} {med:8.0f} ({min(values):.0f}-{max(values):.0f})  x{med / ref:.2f} of openslide")
    before = statistics.median(rates["openslide BEFORE (svs)"])
    # Paired: the two runs of a round are adjacent in time, so their ratio cancels slow load drifts.
    paired = [
        a / b for a, b in zip(rates["openslide after (svs)"], rates["openslide BEFORE (svs)"], strict=True)
    ]
    quartiles = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
    print(
        f"openslide after / before: ratio of medians {ref / before:.3f}; median of paired per-round ratios "
        f"{statistics.median(paired):.3f} (quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f})"
    )


if __name__ == "__main__":
    main()
