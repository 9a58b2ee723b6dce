"""WSIDataModule over a real LMDB cache, alone and inside a real Lightning fit."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import torch

from e2e_wsi.data.datamodule import WSIDataModule
from e2e_wsi.data.sampling import OversampleMap
from e2e_wsi.data.splits import load_splits
from e2e_wsi.data.transforms import normalize_images
from tests.helpers.coded_cache import CodedCache


def _dm(cache: CodedCache, manifest: Path, **kwargs) -> WSIDataModule:
    args = dict(
        cache_dir=str(cache.path),
        manifest=str(manifest),
        task="classification",
        num_classes=2,
        magnifications=[10.0, 5.0],
        mag_ratios=[0.75, 0.25],
        sample_size=16,
        train_patch_size=24,
        eval_patch_size=16,
        split_ratios=(0.5, 0.25, 0.25),
        seed=0,
    )
    args.update(kwargs)
    return WSIDataModule(**args)


def test_setup_writes_split_and_reload_is_identical(
    coded_cache: CodedCache, coded_manifest: Path, tmp_path: Path
) -> None:
    dm = _dm(coded_cache, coded_manifest, run_dir=str(tmp_path / "run1"))
    dm.setup("fit")
    written = load_splits(tmp_path / "run1" / "splits.csv")
    assert (written.groupby("case_id")["split"].nunique() == 1).all()
    assert set(written["split"]) == {"train", "val", "test"}
    again = _dm(
        coded_cache,
        coded_manifest,
        split_file=str(tmp_path / "run1" / "splits.csv"),
        split_seed=99,
        run_dir=str(tmp_path / "run2"),
    )
    again.setup("fit")
    assert load_splits(tmp_path / "run2" / "splits.csv").equals(written)
    assert dm.train_targets.dtype == torch.int64 and sum(dm.class_counts) == len(dm.train_targets)


def test_train_batches_shapes_masks_and_rgb(coded_cache: CodedCache, coded_manifest: Path) -> None:
    dm = _dm(coded_cache, coded_manifest, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (2, 16, 3, 24, 24) and batch["images"].dtype == torch.uint8
    assert batch["mask"].shape == (2, 16) and batch["target"].shape == (2,)
    out = {**batch, "images": normalize_images(batch["images"])}  # what SlideModule does per chunk
    means = out["images"].float().mean(dim=(0, 1, 3, 4))
    assert out["images"].dtype == torch.float32
    assert means[0] > means[1] and means[0] > means[2]  # coded patches are red-dominant: channel 0 is R


def test_eval_loaders_give_all_patches_batch_one(coded_cache: CodedCache, coded_manifest: Path) -> None:
    dm = _dm(coded_cache, coded_manifest)
    dm.setup("test")
    for batch in dm.test_dataloader():
        slide = batch["bag_id"][0]
        assert batch["images"].shape == (1, coded_cache.slides[slide][10.0], 3, 16, 16)
        assert batch["mask"].all() and (batch["magnification"] == 10.0).all()
    predicted = {b["bag_id"][0] for b in dm.predict_dataloader()}
    assert predicted == set(coded_cache.slides)


def test_no_val_split(
    coded_cache: CodedCache, coded_manifest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = _dm(coded_cache, coded_manifest, split_ratios=(0.7, 0.0, 0.3))
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.has_val is False and dm.val_dataloader() == []
    assert "validation split is empty" in caplog.text


def test_missing_magnification_is_reported(coded_cache: CodedCache, coded_manifest: Path) -> None:
    with pytest.raises(ValueError, match=r"lack magnification.*20"):
        _dm(coded_cache, coded_manifest, magnifications=[10.0, 20.0], mag_ratios=[0.5, 0.5]).setup("fit")


def test_oversampling_reaches_the_target_ratio() -> None:
    labels = torch.tensor([0] * 40 + [1] * 7).numpy()
    mapping = OversampleMap(labels, {0: 2, 1: 1}, seed=0)
    for epoch in (0, 1):
        drawn = [int(labels[mapping(p, epoch)]) for p in range(len(mapping))]
        assert drawn.count(0) == 40 and drawn.count(1) == 20  # 2:1, no class-0 slide dropped
        ones = [mapping(p, epoch) for p in range(len(mapping)) if labels[mapping(p, epoch)] == 1]
        assert set(ones) == set(range(40, 47))  # every minority slide appears (2 or 3 times)
    # 20 = 2 x 7 + 6: one minority slide gets only 2 copies, and which one is re-drawn per epoch.
    left_out = set()
    for epoch in range(6):
        counts = pd.Series([mapping(p, epoch) for p in range(40, 60)]).value_counts()
        left_out.add(int(counts.idxmin()))
    assert len(left_out) > 1


def test_oversampling_in_datamodule(coded_cache: CodedCache, coded_manifest: Path) -> None:
    dm = _dm(coded_cache, coded_manifest, oversample={0: 1, 1: 3}, split_ratios=(1.0, 0.0, 0.0))
    dm.setup("fit")
    loader = dm.train_dataloader()
    labels = [int(t) for b in loader for t in b["target"]]
    n0 = dm.class_counts[0]
    assert labels.count(1) == 3 * n0 and labels.count(0) == n0


def test_survival_bags_and_bins(coded_cache: CodedCache, tmp_path: Path) -> None:
    rows = ["case_id,slide_id,time,event"]
    for sid in coded_cache.slides:
        case = int(sid[1])
        rows.append(f"case{case},{sid},{10 + 7 * case},{int(case % 3 != 0)}")
    (tmp_path / "surv.csv").write_text("\n".join(rows) + "\n")
    dm = _dm(
        coded_cache, tmp_path / "surv.csv", task="survival", num_classes=None, split_ratios=(0.5, 0.0, 0.5)
    )
    dm.setup("fit")
    edges = dm.survival_bin_edges
    assert edges is not None and len(edges) == 5 and edges[0] == 0 and edges[-1] == float("inf")
    item = dm.train_dataset()[0]
    assert item["images"].shape[0] == 16 and len(item["slide_ids"]) >= 2  # a case's slides form one bag
    assert 0 <= int(item["target"]) < 4 and item["event"].dtype == torch.float32
    assert dm.train_targets.shape[1] == 2


def test_cohort_survival_bins_use_every_case_train_bins_the_training_cases(
    coded_cache: CodedCache, tmp_path: Path
) -> None:
    rows = ["case_id,slide_id,time,event"]
    for sid in coded_cache.slides:
        case = int(sid[1])
        rows.append(f"case{case},{sid},{10 + 7 * case},1")
    (tmp_path / "surv.csv").write_text("\n".join(rows) + "\n")
    edges = {}
    for rule in ("train", "cohort"):
        dm = _dm(coded_cache, tmp_path / "surv.csv", task="survival", num_classes=None,
                 split_ratios=(0.5, 0.0, 0.5), survival_bins=rule)  # fmt: skip
        dm.setup("fit")
        edges[rule] = dm.survival_bin_edges
        times = [
            b.targets["time"]
            for b in (dm.bags["train"] if rule == "train" else dm.bags["train"] + dm.bags["test"])
        ]
        expected = np.quantile(times, [0.25, 0.5, 0.75])  # official: pd.qcut quartiles, linear interpolation
        np.testing.assert_allclose(edges[rule][1:-1], expected)
    assert edges["train"] != edges["cohort"]


def test_drop_last_drops_the_incomplete_batch(coded_cache: CodedCache, coded_manifest: Path) -> None:
    dm = _dm(coded_cache, coded_manifest, split_ratios=(1.0, 0.0, 0.0), batch_size=4)
    dm.setup("fit")
    n = len(dm.train_dataset())
    assert n % 4 != 0, "the fixture must leave an incomplete batch"
    assert len(dm.train_dataloader()) == -(-n // 4)
    dropped = _dm(coded_cache, coded_manifest, split_ratios=(1.0, 0.0, 0.0), batch_size=4, drop_last=True)
    dropped.setup("fit")
    assert len(dropped.train_dataloader()) == n // 4
    too_big = _dm(coded_cache, coded_manifest, split_ratios=(1.0, 0.0, 0.0), batch_size=n + 1, drop_last=True)
    too_big.setup("fit")
    with pytest.raises(ValueError, match="drop_last"):
        too_big.train_dataloader()


class _TinyModule(pl.LightningModule):
    """A real (tiny) model trained on the bags: mean-pooled pixels -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, 2)
        self.seen: list[tuple[int, str, float]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        mask = batch["mask"].float()[..., None]
        pooled = (normalize_images(batch["images"]).mean(dim=(-1, -2)) * mask).sum(1) / mask.sum(1)
        self.seen.append((self.current_epoch, batch["bag_id"][0], float(batch["images"].sum())))
        return torch.nn.functional.cross_entropy(self.head(pooled), batch["target"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_fit_redraws_each_epoch(
    coded_cache: CodedCache, coded_manifest: Path, tmp_path: Path, workers: int
) -> None:
    dm = _dm(coded_cache, coded_manifest, num_workers=workers, persistent_workers=workers > 0)
    module = _TinyModule()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=dm)
    assert dm.train_dataset().epoch == 1
    by_epoch = pd.DataFrame(module.seen, columns=["epoch", "bag", "checksum"])
    assert by_epoch["epoch"].tolist().count(0) == by_epoch["epoch"].tolist().count(1) > 0
    merged = by_epoch[by_epoch.epoch == 0].merge(by_epoch[by_epoch.epoch == 1], on="bag")
    assert (merged["checksum_x"] != merged["checksum_y"]).all()  # MRIS + augmentation re-drawn
    assert (tmp_path / "splits.csv").is_file()  # no run_dir: the trainer's folder


class _TinyModuleWithVal(_TinyModule):
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        raise AssertionError("no validation bags exist, so this must not run")


def test_lightning_fit_without_val_split(
    coded_cache: CodedCache, coded_manifest: Path, tmp_path: Path
) -> None:
    dm = _dm(coded_cache, coded_manifest, split_ratios=(0.7, 0.0, 0.3))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    module = _TinyModuleWithVal()
    trainer.fit(module, datamodule=dm)
    assert not dm.has_val and len(module.seen) == len(dm.train_targets)


def test_synthetic_cohort_end_to_end(synth_cache: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, cache_dir = synth_cache
    dm = WSIDataModule(
        cache_dir=str(cache_dir),
        manifest=str(manifest),
        num_classes=2,
        magnifications=[10, 5],
        mag_ratios=[0.75, 0.25],
        sample_size=20,
        train_patch_size=48,
        eval_patch_size=48,
        split_ratios=(0.5, 0.25, 0.25),
        batch_size=2,
        run_dir=str(tmp_path),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch["images"] = normalize_images(batch["images"])
    assert batch["images"].shape == (2, 20, 3, 48, 48) and batch["images"].dtype == torch.float32
    assert torch.isfinite(batch["images"]).all() and batch["mask"].shape == (2, 20)
    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape[0] == 1 and val["images"].shape[1] == val["coords"].shape[1]
    assert (tmp_path / "splits.csv").is_file()
