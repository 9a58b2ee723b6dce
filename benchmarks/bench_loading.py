"""Training-data loading: decoded, augmented patches/s from the LMDB cache vs OpenSlide.

Both paths produce the same thing for the same MRIS draws: uint8 [s, 3, 224, 224] augmented patches.

* cache: :class:`TrainBagDataset` (LMDB read + JPEG decode + RandomResizedCrop/flips).
* openslide: the same (magnification, index) draws, each patch read with OpenSlide ``read_region``
  at the cached coordinates (best level + BOX resize, as preprocessing does), then the same transform.

OpenSlide keeps decoded tiles in a cache (32 MiB by default), which on a small slide soon holds the
whole image; on a real 50k x 50k slide random patches rarely hit it. The benchmark therefore reports
OpenSlide both with the tile cache off (the realistic case) and with the default cache.

Usage::

    python benchmarks/bench_loading.py --slide /work/shared/data/CMU-1-Small-Region.svs \\
        --magnifications 20 10 --mag-ratios 0.75 0.25 --sample-size 64 --epochs 3 --workers 0 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader

from e2e_wsi.cache.preprocess import jobs_from_dir, preprocess
from e2e_wsi.cache.store import PatchCache
from e2e_wsi.data.datasets import Bag, TrainBagDataset, collate_bags
from e2e_wsi.data.transforms import TrainTransform
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.tiling import grid_spec, read_patch


class OpenSlideBagDataset(TrainBagDataset):
    """Same draws as the cache dataset, patches read from the slide files instead."""

    def __init__(self, *args: Any, slide_paths: dict[str, Path], tile_cache: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slide_paths = slide_paths
        self.tile_cache = tile_cache
        self._slides: dict[str, Slide] = {}
        self._pid = -1

    def _slide(self, slide_id: str) -> Slide:
        if self._pid != os.getpid():  # OpenSlide handles must not cross fork
            self._slides, self._pid = {}, os.getpid()
        if slide_id not in self._slides:
            slide = Slide(self.slide_paths[slide_id])
            if not self.tile_cache:
                slide._osr.set_cache(openslide.OpenSlideCache(0))
            self._slides[slide_id] = slide
        return self._slides[slide_id]

    def __getitem__(self, position: int) -> dict[str, Any]:
        bag, scale, index, valid, tseed = self.draw(position)
        cache = self.reader.cache
        slide_id = bag.slide_ids[0]
        slide = self._slide(slide_id)
        size = int(cache.meta(slide_id)["patch_size"])
        # Like the cache reader: each distinct patch is read once, padding repeats reuse it.
        pairs, inverse = np.unique(np.stack([scale, index], axis=1), axis=0, return_inverse=True)
        patches = []
        for j, i in pairs:
            mag = self.reader.magnifications[j]
            spec = grid_spec(slide, mag, size)
            xy = cache.coords(slide_id, mag)[i]
            patches.append(np.asarray(read_patch(slide, spec, (int(xy[0]), int(xy[1])), size)))
        images = torch.from_numpy(np.stack(patches)[inverse.ravel()]).permute(0, 3, 1, 2)
        return {
            "bag_id": bag.bag_id,
            "slide_ids": [slide_id],
            "images": self.transform(images, seed=tseed),
            "mask": torch.from_numpy(valid),
            "coords": torch.zeros(len(scale), 2, dtype=torch.int64),
            "magnification": torch.zeros(len(scale)),
            "patch_slide": torch.zeros(len(scale), dtype=torch.int64),
            "target": torch.tensor(0),
        }


def _rate(dataset: TrainBagDataset, workers: int, epochs: int) -> float:
    """Patches/s over ``epochs`` passes, excluding the first batch (worker start-up)."""
    loader = DataLoader(
        dataset,
        batch_size=1,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_bags,
        persistent_workers=workers > 0,
    )
    patches, start = 0, None
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            if start is None:
                start = time.perf_counter()
                continue
            patches += int(batch["mask"].sum())  # distinct patches only, padding is not counted
    assert start is not None
    return patches / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--slide", type=Path, help="one slide file")
    src.add_argument("--slides", type=Path, help="folder of slides")
    parser.add_argument(
        "--cache", type=Path, help="existing cache of these slides (default: build one in /tmp)"
    )
    parser.add_argument("--magnifications", type=float, nargs="+", default=[20.0, 10.0])
    parser.add_argument("--mag-ratios", type=float, nargs="+", default=None)
    parser.add_argument("--sample-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--patch-size", type=int, default=256)
    args = parser.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench_loading_")
    if args.slide is not None:
        slides_dir = Path(tmp.name) / "slides"
        slides_dir.mkdir()
        (slides_dir / args.slide.name).symlink_to(args.slide.resolve())
    else:
        slides_dir = args.slides
    jobs = jobs_from_dir(slides_dir)
    cache_dir = args.cache
    if cache_dir is None:
        from e2e_wsi.cache.worker import PreprocessConfig

        cache_dir = Path(tmp.name) / "cache"
        config = PreprocessConfig(magnifications=tuple(args.magnifications), patch_size=args.patch_size)
        t0 = time.perf_counter()
        preprocess(jobs, cache_dir, config, workers=0, qc=False, progress=False)
        print(f"preprocess: {time.perf_counter() - t0:.1f} s for {len(jobs)} slide(s)")
    cache = PatchCache(cache_dir)
    ids = [j.slide_id for j in jobs if j.slide_id in cache]
    bags = [Bag(s, (s,), {"target": 0}) for s in ids]
    counts = {s: {m: cache.count(s, m) for m in args.magnifications} for s in ids}
    print(f"slides: {len(ids)}, patches per magnification: {counts}")
    common = dict(
        sample_size=args.sample_size,
        magnifications=args.magnifications,
        mag_ratios=args.mag_ratios,
        transform=TrainTransform(224),
        seed=0,
    )
    paths = {j.slide_id: j.path for j in jobs}
    torch.set_num_threads(1)  # one thread per loader process, as in training with workers
    print(f"{'source':<28} {'workers':>7} {'patches/s':>10}")
    results: dict[tuple[str, int], float] = {}
    for workers in args.workers:
        sources = {
            "cache (LMDB + JPEG)": TrainBagDataset(cache, bags, **common),
            "openslide (tile cache off)": OpenSlideBagDataset(
                cache, bags, slide_paths=paths, tile_cache=False, **common
            ),
            "openslide (default cache)": OpenSlideBagDataset(
                cache, bags, slide_paths=paths, tile_cache=True, **common
            ),
        }
        for name, dataset in sources.items():
            results[(name, workers)] = rate = _rate(dataset, workers, args.epochs)
            print(f"{name:<28} {workers:>7} {rate:>10.1f}")
    for workers in args.workers:
        base = results[("cache (LMDB + JPEG)", workers)]
        off = results[("openslide (tile cache off)", workers)]
        on = results[("openslide (default cache)", workers)]
        print(
            f"speed-up with {workers} workers: {base / off:.1f}x vs tile cache off, {base / on:.1f}x vs default cache"
        )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
