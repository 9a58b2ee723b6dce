"""Small real LMDB patch caches written with :class:`CacheWriter` directly.

Flat-colour JPEG patches whose colour encodes (slide, magnification, index), so a test can check which
patch a dataset returned and in which channel order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np

from e2e_wsi.cache.store import CacheWriter, mag_key

PATCH = 32


def patch_colour(slide: int, scale: int, index: int) -> tuple[int, int, int]:
    """RGB of a coded patch: R = 200 (always red-dominant), G = index code, B = slide/scale code."""
    return 200, 4 * (index % 40), 20 + 40 * scale + 8 * (slide % 5)


@dataclass
class CodedCache:
    """A written coded cache: its folder, slide id -> {magnification: count}, magnifications (high first)."""

    path: Path
    slides: dict[str, dict[float, int]]  # slide id -> {magnification: count}
    mags: tuple[float, ...]


def write_coded_cache(path: Path, slides: dict[str, dict[float, int]]) -> CodedCache:
    """Write one coded LMDB (``path/patches.lmdb``) holding ``slides``."""
    writer = CacheWriter(path / "patches.lmdb", map_size=1 << 24)
    mags = tuple(sorted({m for counts in slides.values() for m in counts}, reverse=True))
    for s, (slide_id, counts) in enumerate(slides.items()):
        meta = {
            "format_version": 1,
            "slide_id": slide_id,
            "source_path": f"{slide_id}.svs",
            "mpp": 0.5,
            "objective_power": 20,
            "dimensions": [4096, 4096],
            "patch_size": PATCH,
            "tissue_fraction": 0.5,
            "params": {},
            "magnifications": {},
        }
        for m, n in counts.items():
            step = int(PATCH * 20 / m)
            coords = [[(i % 64) * step, (i // 64) * step + 1] for i in range(n)]
            meta["magnifications"][mag_key(m)] = {"count": n, "size_level0": step, "coords": coords}

        def patches(s: int = s, counts: dict[float, int] = counts):
            for m, n in counts.items():
                j = mags.index(m)
                for i in range(n):
                    tile = np.empty((PATCH, PATCH, 3), dtype=np.uint8)
                    tile[:] = patch_colour(s, j, i)
                    yield m, i, bytes(imagecodecs.jpeg8_encode(tile, level=95))

        writer.commit_slide(meta, patches)
    writer.close()
    return CodedCache(path, slides, mags)
