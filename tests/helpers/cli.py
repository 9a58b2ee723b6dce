"""In-process ``e2e-wsi fit`` on the demo config, shrunk to seconds."""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_subtype.yaml"

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
