"""Session fixtures shared across test packages: a real synthetic cohort and its real LMDB cache, a tiny
trained run, and test slides. Builders live in the importable :mod:`tests.helpers` package.

Built once per test process with the project's own APIs (``synthesize_cohort`` writes pyramidal TIFFs
that OpenSlide reads; ``preprocess`` cuts and caches patches), so every test that trains or evaluates
runs the same path a user does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from e2e_wsi.cache.preprocess import jobs_from_manifest, preprocess
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.cli import main
from e2e_wsi.synth.cohort import synthesize_cohort
from tests.helpers.cli import tiny_fit_args
from tests.helpers.slides import CMU, TestSlide, make_tissue_slide


@pytest.fixture(scope="session")
def tiny_args() -> Callable[..., list[str]]:
    """The :func:`tiny_fit_args` builder, for tests that run `fit` with their own overrides."""
    return tiny_fit_args


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


@pytest.fixture(scope="session")
def tiny_run(synth_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (config.yaml, splits.csv, checkpoints/) from two epochs of `e2e-wsi fit` on ``synth_cache``."""
    manifest, cache = synth_cache
    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(tiny_fit_args(manifest, cache, run)) == 0
    return run


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """The real 20x Aperio slide (CC0, OpenSlide test data)."""
    assert CMU.is_file(), "tests/data/CMU-1-Small-Region.svs is part of the repository"
    return CMU


@pytest.fixture(scope="session")
def tissue_slide(tmp_path_factory: pytest.TempPathFactory) -> TestSlide:
    """A 4096 px, 20x (0.5 um/px) slide with an ellipse of tissue holding a hole, plus its truth mask."""
    return make_tissue_slide(tmp_path_factory.mktemp("slides") / "tissue.svs")
