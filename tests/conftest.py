"""Session fixtures shared across test packages: a real synthetic cohort and its real LMDB cache.

Built once per test process with the project's own APIs (``synthesize_cohort`` writes pyramidal TIFFs
that OpenSlide reads; ``preprocess`` cuts and caches patches), so every test that trains or evaluates
runs the same path a user does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_wsi.cache._worker import PreprocessConfig
from e2e_wsi.cache.preprocess import jobs_from_manifest, preprocess
from e2e_wsi.slides.synth import synthesize_cohort


def _cohort_and_cache(root: Path, task: str, num_slides: int, **synth) -> tuple[Path, Path]:
    manifest = synthesize_cohort(
        root / "cohort", task=task, num_slides=num_slides, seed=0, size=2048, workers=1, **synth
    )
    config = PreprocessConfig(magnifications=(10.0, 5.0), patch_size=64)
    preprocess(jobs_from_manifest(manifest), root / "cache", config, workers=0, qc=False, progress=False)
    return manifest, root / "cache"


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """8 synthetic subtyping slides (2048 px, 2 classes) cached at 10x and 5x with 64-px patches.

    Returns:
        (manifest.csv, cache dir).
    """
    return _cohort_and_cache(tmp_path_factory.mktemp("synth"), "subtype", 8)


@pytest.fixture(scope="session")
def survival_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """10 synthetic survival cases (one slide each) cached like ``synth_cache``."""
    return _cohort_and_cache(tmp_path_factory.mktemp("survival"), "survival", 10)
