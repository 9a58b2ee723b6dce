"""Fixtures for the data tests: small real LMDB patch caches.

``coded_cache`` writes a cache with :class:`CacheWriter` directly: flat-colour JPEG patches whose colour
encodes (slide, magnification, index), so a test can check which patch a dataset returned and in which
channel order.
``synth_cache`` (the real pipeline: synthetic cohort -> ``preprocess``) lives in ``tests/conftest.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import pytest

from e2e_wsi.cache.store import CacheWriter, mag_key

PATCH = 32


def patch_colour(slide: int, scale: int, index: int) -> tuple[int, int, int]:
    """RGB of a coded patch: R = 200 (always red-dominant), G = index code, B = slide/scale code."""
    return 200, 4 * (index % 40), 20 + 40 * scale + 8 * (slide % 5)


@dataclass
class CodedCache:
    path: Path
    slides: dict[str, dict[float, int]]  # slide id -> {magnification: count}
    mags: tuple[float, ...]


def write_coded_cache(path: Path, slides: dict[str, dict[float, int]]) -> CodedCache:
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


@pytest.fixture(scope="session")
def coded_cache(tmp_path_factory: pytest.TempPathFactory) -> CodedCache:
    """12 slides (6 cases x 2 slides), 2 magnifications; slide s13 is tiny (3 + 2 patches)."""
    slides: dict[str, dict[float, int]] = {}
    for c in range(6):
        for k in range(2):
            slides[f"s{c}{k}"] = {10.0: 30 + 5 * c + k, 5.0: 10 + c}
    slides["s13"] = {10.0: 3, 5.0: 2}
    return write_coded_cache(tmp_path_factory.mktemp("coded"), slides)


@pytest.fixture
def coded_manifest(tmp_path: Path, coded_cache: CodedCache) -> Path:
    """Classification manifest over the coded cache: case c has label c % 2 (cases 0..5)."""
    lines = ["case_id,slide_id,label"]
    lines += [f"case{sid[1]},{sid},{int(sid[1]) % 2}" for sid in coded_cache.slides]
    path = tmp_path / "manifest.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
