"""``FeatureDataModule``: MIL on precomputed features (the two-stage paradigm's second stage).

Same manifest, splits, survival bins, ``eval_frame`` and run-folder contract as
:class:`~e2e_wsi.data.datamodule.WSIDataModule` (it subclasses it and only swaps where bags come from),
so the same ``SlideModule`` (with ``encoder: PrecomputedFeatures``), test report, ``predict`` and
heatmaps work. Bags hold every feature of the slide (full bags, as in the paper's two-stage setting);
``max_instances`` optionally samples huge training bags.

Batch items: ``features`` float32 [B, N, D], ``mask`` bool [B, N], ``coords`` int64 [B, N, 2],
``magnification`` float32 [B, N], ``patch_slide`` int64 [B, N], targets [B], ``index`` [B], ``bag_id``,
``slide_ids``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from e2e_wsi.data.datamodule import EvalShardSampler, PaddedEvalDataset, WSIDataModule
from e2e_wsi.data.datasets import Bag, _target_tensors, collate_bags
from e2e_wsi.features.store import FeatureFolder


class FeatureBagDataset(Dataset):
    """Bags of features read from a :class:`FeatureFolder` (all slides of a bag concatenated).

    Args:
        folder: The feature folder.
        bags: Bags to serve.
        magnification: Magnification recorded in the provenance (NaN when unknown), for heatmaps.
        max_instances: If set, a random subset of at most this many features per bag (training only).
    """

    def __init__(
        self, folder: FeatureFolder, bags: Sequence[Bag], magnification: float, max_instances: int | None
    ) -> None:
        self.folder = folder
        self.bags = list(bags)
        self.magnification = magnification
        self.max_instances = max_instances

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, position: int) -> dict[str, Any]:
        bag = self.bags[position]
        feats, coords, slide_of = [], [], []
        for k, slide_id in enumerate(bag.slide_ids):
            f, c = self.folder.read(slide_id)
            feats.append(f)
            coords.append(c)
            slide_of.append(np.full(len(f), k, dtype=np.int64))
        features = torch.from_numpy(np.concatenate(feats))
        item = {
            "features": features,
            "coords": torch.from_numpy(np.concatenate(coords)),
            "patch_slide": torch.from_numpy(np.concatenate(slide_of)),
        }
        n = features.shape[0]
        if self.max_instances is not None and n > self.max_instances:
            keep = torch.randperm(n)[: self.max_instances].sort().values
            item = {k: v[keep] for k, v in item.items()}
            n = self.max_instances
        item.update(
            magnification=torch.full((n,), self.magnification, dtype=torch.float32),
            mask=torch.ones(n, dtype=torch.bool),
            index=torch.tensor(position, dtype=torch.int64),
            bag_id=bag.bag_id,
            slide_ids=list(bag.slide_ids),
            **_target_tensors(bag.targets),
        )
        return item


class FeatureDataModule(WSIDataModule):
    """Bags of precomputed features (``e2e-wsi extract``, CLAM or TRIDENT folders) for MIL training.

    Args:
        features_dir: Folder of ``<slide_id>.h5`` files (``features`` [N, D], ``coords`` [N, 2]).
        manifest: Manifest CSV; CLAM's ``case_id,slide_id,label`` works as is (no ``path`` column needed).
        task: ``classification``, ``grading`` or ``survival``.
        num_classes: Classes, or survival time bins (default 4).
        class_names: Optional label names used in the manifest.
        max_instances: Sample at most this many features per training bag (``None``: full bags, the
            paper's setting; the paper sampled 1024 only for GigaPath's slide encoder).
        split_ratios: (train, val, test) case fractions.
        split_seed: Seed of the split.
        fold: Test fold for k-fold cross-validation (with ``num_folds``).
        num_folds: k for cross-validation.
        split_file: Reload this split instead of making one.
        batch_size: Training bags per batch (1 in the paper; more pads with masks). Evaluation uses 1.
        num_workers: DataLoader workers.
        pin_memory: Pin host memory.
        persistent_workers: Keep workers between epochs.
        seed: Seed (feature sampling uses torch's generator, seeded by ``seed_everything``).
        run_dir: Where ``splits.csv`` is written (default: the trainer's log dir).
        predict_split: Which bags ``predict`` runs on.
    """

    _manifest_checks_ids = False  # missing features are listed by FeatureFolder.check, all at once

    def __init__(
        self,
        features_dir: str,
        manifest: str,
        task: str = "classification",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        max_instances: int | None = None,
        split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        fold: int | None = None,
        num_folds: int | None = None,
        split_file: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        run_dir: str | None = None,
        predict_split: str = "all",
    ) -> None:
        pl.LightningDataModule.__init__(self)
        self.save_hyperparameters()
        if max_instances is not None and max_instances < 1:
            raise ValueError(f"max_instances must be >= 1 or null (full bags), got {max_instances}")
        self._init_cohort(task, num_classes, manifest, run_dir, predict_split)
        self.features_dir = features_dir
        self.feature_dim: int | None = None
        self.feature_settings: dict[str, Any] | None = None

    # ------------------------------------------------------------------ source hooks of WSIDataModule
    def _open_source(self) -> FeatureFolder:
        return FeatureFolder(self.features_dir)

    def _check_source(self, df: pd.DataFrame) -> None:
        folder: FeatureFolder = self.cache  # type: ignore[assignment]
        self.feature_settings = folder.check(df["slide_id"].tolist())
        self.feature_dim = folder.info(str(df["slide_id"].iloc[0])).dim

    @property
    def magnification(self) -> float:
        """Magnification of the features from their provenance (NaN when unknown)."""
        return float((self.feature_settings or {}).get("magnification", float("nan")))

    # ---------------------------------------------------------------------------------- loaders
    def _feature_loader(self, dataset: Dataset, batch_size: int, train: bool) -> DataLoader:
        hp = self.hparams
        workers = int(hp.num_workers)
        rank, world = self._rank_world()
        sampler = None
        if not train and world > 1:
            # Disjoint shares, so no slide is counted twice in gathered metrics; a rank left without a
            # slide gets one padding bag that joins the collectives and counts for nothing.
            sampler = EvalShardSampler(dataset, num_replicas=world, rank=rank)
            dataset = PaddedEvalDataset(dataset)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,  # under DDP Lightning swaps in a DistributedSampler
            sampler=sampler,
            num_workers=workers,
            pin_memory=hp.pin_memory,
            collate_fn=collate_bags,
            persistent_workers=bool(hp.persistent_workers and workers > 0),
        )

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        dataset = FeatureBagDataset(self.cache, self._require("train"), self.magnification, hp.max_instances)
        return self._feature_loader(dataset, int(hp.batch_size), train=True)

    def _eval_loader(self, bags: list[Bag]) -> DataLoader:
        return self._feature_loader(FeatureBagDataset(self.cache, bags, self.magnification, None), 1, False)
