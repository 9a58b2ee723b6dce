"""Session fixtures shared across test packages: a real synthetic cohort and its real LMDB cache.

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

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo_subtype.yaml"

# Tiny but real training: 8 patches of 32 px per bag, two bags per step, two epochs.
TINY = [
    "--trainer.max_epochs", "2",
    "--trainer.log_every_n_steps", "1",
    "--data.sample_size", "8",
    "--data.train_patch_size", "32",
    "--data.eval_patch_size", "32",
    "--data.batch_size", "2",
    "--data.num_workers", "0",
    "--data.persistent_workers", "false",
    "--data.split_ratios", "[0.5, 0.25, 0.25]",
    "--model.eval_chunk_size", "16",
]  # fmt: skip


def tiny_fit_args(manifest: Path, cache: Path, run: Path, *extra: str) -> list[str]:
    """`e2e-wsi fit` arguments for the demo config shrunk to seconds; later ``extra`` flags win."""
    return ["fit", "--config", str(DEMO_CONFIG), "--run_dir", str(run), "--data.manifest", str(manifest),
            "--data.cache_dir", str(cache), *TINY, *extra]  # fmt: skip


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
