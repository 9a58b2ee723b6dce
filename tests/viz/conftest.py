"""A tiny run trained once per session through the real CLI, shared by the heatmap and notebook tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_wsi.cli import main

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_subtype.yaml"

# Tiny but real: 8 patches of 32 px per bag, two bags per step, one epoch.
TINY = [
    "--trainer.max_epochs",
    "1",
    "--trainer.log_every_n_steps",
    "1",
    "--data.sample_size",
    "8",
    "--data.train_patch_size",
    "32",
    "--data.eval_patch_size",
    "32",
    "--data.batch_size",
    "2",
    "--data.num_workers",
    "0",
    "--data.persistent_workers",
    "false",
    "--data.split_ratios",
    "[0.5, 0.25, 0.25]",
    "--model.eval_chunk_size",
    "64",
]


@pytest.fixture(scope="session")
def tiny_run(synth_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder (checkpoints/last.ckpt, config.yaml, splits.csv) from one epoch of `e2e-wsi fit`.

    Returns:
        The run folder.
    """
    manifest, cache = synth_cache
    run = tmp_path_factory.mktemp("viz") / "run"
    args = [
        "fit",
        "--config",
        str(DEMO_CONFIG),
        "--run_dir",
        str(run),
        "--data.manifest",
        str(manifest),
        "--data.cache_dir",
        str(cache),
        *TINY,
    ]
    assert main(args) == 0
    assert (run / "checkpoints" / "last.ckpt").is_file()
    return run
