"""Fixtures for the data tests: small real LMDB patch caches (builders in :mod:`tests.helpers.coded_cache`).

``coded_cache`` writes flat-colour JPEG patches whose colour encodes (slide, magnification, index), so a
test can check which patch a dataset returned and in which channel order.
``synth_cache`` (the real pipeline: synthetic cohort -> ``preprocess``) lives in ``tests/helpers/fixtures.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.coded_cache import CodedCache, write_coded_cache


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
