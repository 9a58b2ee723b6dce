"""Fixtures for the cache tests: a small synthetic cohort, a cohort of bad inputs, and a clean cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from e2e_wsi.cache.preprocess import jobs_from_manifest, preprocess
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.synth.cohort import synthesize_cohort
from tests.helpers.cache import MAGS
from tests.helpers.slides import make_tissue_slide, make_white_slide


@pytest.fixture(scope="session")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 4096 px synthetic slides at 20x (0.5 um/px) with truth masks; returns the manifest."""
    root = tmp_path_factory.mktemp("cohort")
    return synthesize_cohort(root / "c", num_slides=3, size=4096, workers=1, mpp=0.5, objective_power=20)


@pytest.fixture(scope="session")
def clean_cache(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cohort preprocessed at 20x and 10x in one uninterrupted run (inline, no subprocesses)."""
    out = tmp_path_factory.mktemp("clean") / "cache"
    preprocess(jobs_from_manifest(cohort), out, PreprocessConfig(MAGS), workers=0, progress=False)
    return out


@pytest.fixture(scope="session")
def bad_manifest(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two good slides plus one of each bad input, listed in a manifest."""
    root = tmp_path_factory.mktemp("bad")
    good = sorted((cohort.parent / "slides").glob("*.svs"))[:2]
    for path in good:
        shutil.copy(path, root / path.name)
    data = good[0].read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 2])
    (root / "notaslide.svs").write_bytes(b"%PDF-1.4 certainly not a slide\n" * 200)
    make_tissue_slide(root / "nomag.tif", size=2048, mpp=None)
    make_white_slide(root / "white.svs")
    rows = [f"{p.stem},{p.name}" for p in good] + [
        "truncated,truncated.svs",
        "notaslide,notaslide.svs",
        "nomag,nomag.tif",
        "white,white.svs",
        f"../evil,{good[0].name}",
    ]
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,path,label\n" + "\n".join(f"{r},0" for r in rows) + "\n")
    return manifest
