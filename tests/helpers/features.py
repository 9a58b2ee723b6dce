"""Builders of the two-stage tests: tiny feature folders and fit arguments for configs/two_stage_abmilx.yaml."""

from __future__ import annotations

from pathlib import Path

import torch

from e2e_wsi.features.extract import ExtractConfig, extract_features
from e2e_wsi.models.encoders import ResNetEncoder

TWO_STAGE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "two_stage_abmilx.yaml"
# One epoch of real training on the tiny synthetic cohort.
TINY_FEATURE_FIT = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                    "--trainer.log_every_n_steps", "1", "--data.num_workers", "0",
                    "--data.split_ratios", "[0.5, 0.25, 0.25]", "--bootstrap", "50"]  # fmt: skip


def extract_random_resnet(cache_dir: Path, out: Path, seed: int) -> Path:
    """Features at 5x of every cached slide from a ResNet-18 with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    extract_features(
        cache_dir, out, ResNetEncoder(), ExtractConfig(magnification=5, input_size=32, progress=False)
    )
    return out
