"""Tissue coverage and background share of tiling rules, per slide and magnification.

For the real CMU-1-Small-Region slide in ``tests/data``, a small synthetic cohort (``e2e_wsi.synth``) and
two synthetic needle cores (thin strips of tissue, the PANDA case), print for each tiling rule the
number of kept patches, the share of the detected tissue inside them (coverage) and the share of their
area that is not tissue (background). The defaults of ``e2e-wsi preprocess`` were chosen from this table
(docs/tiling.md).

Run: ``nice -n 5 python benchmarks/bench_tiling_coverage.py [--mags 20 10 5] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.tiling import coverage_stats, grid_spec, tissue_grid
from e2e_wsi.slides.tissue import segment_tissue, segmentation_downsample
from e2e_wsi.slides.writer import write_pyramidal_tiff
from e2e_wsi.synth.cohort import synthesize_cohort

ROOT = Path(__file__).resolve().parents[1]
CMU = ROOT / "tests" / "data" / "CMU-1-Small-Region.svs"

# (name, anchor, threshold, min_coverage)
RULES: list[tuple[str, str, float, float]] = [
    ("origin t>0.5 (old default)", "origin", 0.5, 0.0),
    ("origin t>0.25", "origin", 0.25, 0.0),
    ("tissue-anchored t>0.5", "tissue", 0.5, 0.0),
    ("tissue-anchored t>0.25", "tissue", 0.25, 0.0),
    ("tissue-anchored t>0.1", "tissue", 0.1, 0.0),
    ("tissue-anchored t>0", "tissue", 0.0, 0.0),
    ("tissue-anchored t>0.5 + cover 95% (default)", "tissue", 0.5, 0.95),
    ("origin t>0.5 + cover 95%", "origin", 0.5, 0.95),
]


def needle_core(path: Path, width_um: float, seed: int) -> Path:
    """A 20x slide (0.5 um/px) with two thin, slightly curved strips of textured tissue (needle cores)."""
    rng = np.random.default_rng(seed)
    h, w = 4096, 8192
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    image = np.full((h, w, 3), 242, np.uint8)
    half = width_um / 0.5 / 2
    tissue = np.zeros((h, w), bool)
    for centre, phase in ((0.3 * h, 0.0), (0.7 * h, 1.3)):
        axis = centre + 300 * np.sin(xx / w * 3.0 + phase)
        tissue |= (np.abs(yy - axis) < half) & (xx > 300) & (xx < w - 400)
    texture = (np.sin(xx * 0.07) * np.cos(yy * 0.06) * 40).astype(np.int16)
    pink = np.array([205, 120, 170], np.int16) + texture[..., None]
    image[tissue] = np.clip(pink[tissue], 0, 255).astype(np.uint8)
    image = np.clip(image.astype(np.int16) + rng.integers(-4, 5, image.shape, dtype=np.int16), 0, 255)
    return write_pyramidal_tiff(
        path, image.astype(np.uint8), mpp=0.5, objective_power=20, downsamples=(1, 4, 16)
    )


def slides(workdir: Path) -> dict[str, list[Path]]:
    """The measured slides by group: the real one, synthetic cohorts at 20x and 40x, two needle cores."""
    at20 = synthesize_cohort(workdir / "c20", num_slides=3, size=4096, workers=1, mpp=0.5, objective_power=20)
    # The demo's cohort settings (scripts/demo.py): 6144 px at 40x.
    at40 = synthesize_cohort(workdir / "c40", num_slides=3, size=6144, workers=1, seed=1)
    cores = [needle_core(workdir / f"core{w}.svs", w, i) for i, w in enumerate((300, 600))]
    return {
        "CMU-1-Small-Region (real, 20x)": [CMU],
        "synthetic 20x (3)": sorted((at20.parent / "slides").glob("*.svs")),
        "synthetic 40x, demo size (3)": sorted((at40.parent / "slides").glob("*.svs")),
        "needle cores 300/600 um (2)": cores,
    }


def measure(
    path: Path, mags: list[float], patch_size: int
) -> dict[tuple[str, float], tuple[int, float, float]]:
    """(rule, magnification) -> (patches, coverage, background share) for one slide."""
    config = PreprocessConfig(magnifications=tuple(mags), patch_size=patch_size)
    out: dict[tuple[str, float], tuple[int, float, float]] = {}
    with Slide(path) as slide:
        ds = segmentation_downsample(slide.dimensions, config.tissue)
        mask = segment_tissue(slide.read_downsampled(ds), ds, slide.resolution.mpp, config.tissue)
        for mag in mags:
            spec = grid_spec(slide, mag, patch_size)
            for name, anchor, threshold, cover in RULES:
                coords, _ = tissue_grid(
                    slide.dimensions,
                    spec,
                    mask,
                    threshold,
                    min_coverage=cover,
                    anchor=anchor,  # type: ignore[arg-type]
                )
                coverage, background = coverage_stats(mask, coords, spec.size_level0)
                out[(name, mag)] = (len(coords), coverage, background)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mags", type=float, nargs="+", default=[20.0, 10.0, 5.0])
    parser.add_argument("--patch-size", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        groups = slides(Path(tmp))
        results = {g: [measure(p, args.mags, args.patch_size) for p in paths] for g, paths in groups.items()}
    for mag in args.mags:
        print(f"\n### {mag:g}x, {args.patch_size} px patches")
        print("patches (summed over the group) / lowest tissue coverage / mean background share\n")
        print("| rule | " + " | ".join(results) + " | lowest coverage |")
        print("|---" * (len(results) + 2) + "|")
        for rule, *_ in RULES:
            cells, lowest = [], 1.0
            for per_slide in results.values():
                figures = [r[(rule, mag)] for r in per_slide]
                low = min(c for _, c, _ in figures)
                lowest = min(lowest, low)
                mean_bg = float(np.mean([b for _, _, b in figures]))
                cells.append(f"{sum(n for n, _, _ in figures)} / {low:.1%} / {mean_bg:.0%}")
            print(f"| {rule} | " + " | ".join(cells) + f" | {lowest:.1%} |")


if __name__ == "__main__":
    main()
