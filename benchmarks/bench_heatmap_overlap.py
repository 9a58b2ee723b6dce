"""Benchmark of an overlapping heatmap (`e2e-wsi heatmap --overlap`) on a slide of about 10k patches.

Writes a synthetic slide whose tissue covers it edge to edge (a 10x pyramidal TIFF, 1 um/px, so a
256-px patch at 10x is read straight from level 0 like a 40x scan's level 1), then runs the library
call behind the CLI (:func:`e2e_wsi.inference.heatmaps.make_overlap_heatmap`): tissue detection, reading the
overlapping patches with OpenSlide, chunked encoding, ABMILX attention, blending, the PNG figure and
the pyramidal-TIFF overlay. The model is ResNet-18 to layer3 + ABMILX (8 heads) with random weights.

The slide is written in a child process so the reported peak RSS (``ru_maxrss``) is the heatmap's.

Usage::

    .venv/bin/python benchmarks/bench_heatmap_overlap.py                          # 100 x 100 = 10k patches, 96 px
    .venv/bin/python benchmarks/bench_heatmap_overlap.py --grid 32 --eval-patch-size 224  # 1k patches, 224 px
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from e2e_wsi.inference.heatmaps import make_overlap_heatmap  # noqa: E402
from e2e_wsi.models.aggregators import ABMILX  # noqa: E402
from e2e_wsi.models.encoders import ResNetEncoder  # noqa: E402
from e2e_wsi.models.module import SlideModule  # noqa: E402
from e2e_wsi.models.tasks import ClassificationTask  # noqa: E402
from e2e_wsi.slides.reader import Slide  # noqa: E402
from e2e_wsi.slides.writer import write_levels  # noqa: E402
from e2e_wsi.viz.overlap import overlap_stride  # noqa: E402


def write_tissue_slide(path: Path, side: int, seed: int = 0) -> None:
    """A ``side`` x ``side`` 10x slide of pink, purple-dotted 'tissue' everywhere (painted at 1/4)."""
    rng = np.random.default_rng(seed)
    small = side // 4
    base = np.empty((small, small, 3), dtype=np.float32)
    base[:] = (232, 160, 205)
    base += rng.normal(0, 12, size=(small, small, 1))
    nuclei = rng.random((small, small)) < 0.01
    base[nuclei] = (110, 70, 160)
    image = np.clip(base, 0, 255).astype(np.uint8)
    write_levels(
        path,
        image,
        4,
        (side, side),
        mpp=1.0,
        objective_power=10,
        downsamples=(1, 4, 16),
        tile=256,
        quality=85,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, default=100, help="patches per side (grid x grid patches)")
    p.add_argument("--overlap", type=float, default=0.75)
    p.add_argument("--patch-size", type=int, default=256, help="patch side read at 10x")
    p.add_argument("--eval-patch-size", type=int, default=96, help="side the encoder sees (demo: 96)")
    p.add_argument("--chunk", type=int, default=256, help="patches read and encoded at once")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stride = overlap_stride(args.patch_size, args.overlap)
    side = -(-((args.grid - 1) * stride + args.patch_size) // 16) * 16  # multiple of 16 for the writer
    with tempfile.TemporaryDirectory(prefix="bench_overlap_") as tmp:
        slide_path = Path(tmp) / "big.tif"
        t0 = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(
            target=write_tissue_slide, args=(slide_path, side)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit("writing the synthetic slide failed")
        print(f"slide: {side} x {side} px at 10x, written in {time.perf_counter() - t0:.1f} s", flush=True)
        torch.manual_seed(0)
        model = SlideModule(
            task=ClassificationTask(2),
            encoder=ResNetEncoder("resnet18", weights="none", channels_last=True),
            aggregator=lambda d: ABMILX(d, inner_dim=256, heads=8),
            eval_chunk_size=args.chunk,
        )
        rss0 = psutil.Process().memory_info().rss / 2**20  # torch alone holds ~0.7-1 GB here
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with Slide(slide_path) as slide:
            files = make_overlap_heatmap(
                model,
                slide,
                "big",
                Path(tmp) / "out",
                magnification=10.0,
                patch_size=args.patch_size,
                eval_patch_size=args.eval_patch_size,
                overlap=args.overlap,
            )
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        overlay_mb = files.overlay.stat().st_size / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = files.n_patches
    s = files.seconds
    print(
        f"patches: {n} ({args.patch_size} px at 10x, overlap {args.overlap}, stride {stride} px; "
        f"encoder input {args.eval_patch_size} px, chunk {args.chunk}, {args.threads} threads)"
    )
    print(f"total: {wall:.1f} s wall ({n / wall:.1f} patches/s), {cpu:.1f} s CPU")
    print(
        f"  read {s['read']:.1f} s ({n / s['read']:.0f} patches/s) | model {s['model']:.1f} s "
        f"({n / s['model']:.1f} patches/s) | figure {s['figure']:.1f} s | overlay TIFF {s['overlay']:.1f} s "
        f"({overlay_mb:.1f} MiB)"
    )
    print(
        f"peak RSS: {peak:.0f} MiB (RSS before the heatmap: {rss0:.0f} MiB; increase {peak - rss0:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
