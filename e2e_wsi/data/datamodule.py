"""``WSIDataModule``: manifest + split + MRIS bags + loaders, built by LightningCLI from YAML.

Epoch handling and class oversampling live in :mod:`e2e_wsi.data.sampling` (``EpochSampler``,
``OversampleMap``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sized
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from e2e_wsi.cache.store import OnDamaged, PatchCache
from e2e_wsi.data.datasets import Bag, EvalBagDataset, TrainBagDataset, collate_bags
from e2e_wsi.data.manifest import load_manifest
from e2e_wsi.data.sampling import EpochSampler, OversampleMap, check_ratios
from e2e_wsi.data.splits import apply_splits, load_splits, make_splits, save_splits
from e2e_wsi.data.transforms import OFFICIAL_EVAL_CROP_FRACTION, EvalTransform, TrainTransform
from e2e_wsi.runs.folder import RunFolder
from e2e_wsi.tasks import get_task_spec

log = logging.getLogger(__name__)


PADDING_INDEX = -1


class EvalShardSampler(DistributedSampler):
    """Disjoint, unshuffled evaluation shards (bags ``rank, rank + world, ...``), never empty.

    Lightning's ``UnrepeatedDistributedSampler`` asserts that every rank gets a bag, so a split with
    fewer bags than processes crashed one rank (and closed the other's connection). Here such a rank
    gets :data:`PADDING_INDEX`: :class:`PaddedEvalDataset` serves it as a padding bag that the module
    runs (so the rank joins every collective) but leaves out of losses, metrics and predictions.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), num_replicas)) or [PADDING_INDEX]
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class PaddedEvalDataset(Dataset):
    """An evaluation dataset that serves :data:`PADDING_INDEX` as a copy of bag 0 with ``index`` -1."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> dict[str, Any]:
        if position != PADDING_INDEX:
            return self.dataset[position]
        item = dict(self.dataset[0])
        item["index"] = torch.tensor(PADDING_INDEX, dtype=torch.int64)
        return item


class WSIDataModule(pl.LightningDataModule):
    """Whole-slide bags for training (MRIS) and evaluation (all patches).

    Args:
        cache_dir: Patch cache folder(s) (shards) written by ``e2e-wsi preprocess``.
        manifest: Manifest CSV (see :mod:`e2e_wsi.data.manifest`).
        task: A task kind of :mod:`e2e_wsi.tasks` (``classification``, ``grading``, ``survival``,
            ``regression``). The CLI derives it from ``model.task`` (its ``kind``); a YAML never needs
            to give it.
        num_classes: Classes (classification/grading) or discrete time bins (survival, default 4); unused
            by regression. The CLI derives it from ``model.task`` (``num_classes`` or ``num_bins``).
        class_names: Optional label names used in the manifest.
        magnifications: Training scales; the first is the *main* magnification.
        mag_ratios: MRIS ratios per magnification (sum 1); ``None`` = uniform.
        eval_magnifications: Scales of evaluation bags; ``None`` = the main magnification only.
        sample_size: s, patches per training bag.
        train_patch_size: RandomResizedCrop output side.
        eval_patch_size: Evaluation side after resize + centre crop.
        eval_crop_fraction: Side of the evaluation centre crop relative to the cached patch, then resized
            to ``eval_patch_size``. Default 1.0: the whole patch resized, the official evaluation
            (CLAM/save_patches.py:50-53; datasets/dataloader.py:79,102). 224/256 = central 224 px of a
            256 px patch. A model whose encoder has ``eval_resize`` always gets 1.0.
        crop_scale: RandomResizedCrop area range.
        crop_chunks: ``None`` (default): one RandomResizedCrop box per patch. ``k``: one box per chunk of
            a bag, ``k`` chunks (the official transform draws one box per chunk of 4 of its batch,
            datasets/data_utils.py:142-149, ``img_trans_chunk`` default 4 in options.py:51).
        color_jitter: Opt-in colour augmentation (off by default, as in the paper).
        split_ratios: (train, val, test) case fractions.
        split_seed: Seed of the split.
        fold: Test fold for k-fold cross-validation (with ``num_folds``).
        num_folds: k for cross-validation.
        split_file: Reload this split (``splits.csv``/``.json`` of an earlier run) instead of making one.
        oversample: Per-class target ratio of training bags per epoch, e.g. ``{0: 2, 1: 1}``.
        oversample_mode: ``ratio`` (default): ``oversample`` is a class ratio, the extra copies rotate
            over the slides each epoch. ``repeat``: ``oversample`` gives whole repeat counts per class,
            fixed for the run (``{1: 2}``: each class-1 slide twice per epoch; see
            :class:`~e2e_wsi.data.sampling.OversampleMap`).
        mris_shortfall: ``other_scales`` (default) or ``repeat_scale`` (official): what fills a scale
            with too few patches (:func:`~e2e_wsi.data.sampling.mris_sample`).
        survival_bins: ``train`` (default): time-bin edges are quartiles (``num_classes`` quantiles) of
            the uncensored times of the training cases. ``cohort``: of every case in the manifest, test
            included, as the official ``survival_label`` does (datasets/data_utils.py:714-725).
        batch_size: Training bags per batch (evaluation is always 1).
        drop_last: Drop the last incomplete training batch of an epoch (the official loaders do:
            ``drop_last = not no_drop_last``, options.py:90,218; datasets/dataloader.py:90,94).
        num_workers: DataLoader workers.
        pin_memory: Pin host memory.
        persistent_workers: Keep workers between epochs (only with ``num_workers > 0``).
        seed: Seed of MRIS, augmentation and oversampling.
        run_dir: Where ``splits.csv`` is written; ``None`` = the trainer's log dir when attached. Can be
            set as an attribute before ``setup``.
        predict_split: Which bags ``predict`` runs on.
        on_damaged: A cached patch that fails its checksum: ``error`` stops with the slide and key,
            ``skip`` warns and uses the slide's nearest intact patch instead.
    """

    def __init__(
        self,
        cache_dir: str | list[str],
        manifest: str,
        task: str = "classification",
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        magnifications: list[float] = [10.0],  # noqa: B006 - jsonargparse needs a literal default
        mag_ratios: list[float] | None = None,
        eval_magnifications: list[float] | None = None,
        sample_size: int = 512,
        train_patch_size: int = 224,
        eval_patch_size: int = 224,
        eval_crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_chunks: int | None = None,
        color_jitter: bool = False,
        split_ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        fold: int | None = None,
        num_folds: int | None = None,
        split_file: str | None = None,
        oversample: dict[int, float] | None = None,
        oversample_mode: Literal["ratio", "repeat"] = "ratio",
        mris_shortfall: Literal["other_scales", "repeat_scale"] = "other_scales",
        survival_bins: Literal["train", "cohort"] = "train",
        batch_size: int = 1,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        seed: int = 0,
        run_dir: str | None = None,
        predict_split: str = "all",
        on_damaged: OnDamaged = "error",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not magnifications:
            raise ValueError("magnifications must list at least one magnification, e.g. [10]")
        self.magnifications = [float(m) for m in magnifications]
        if mag_ratios is not None:
            check_ratios(mag_ratios, len(self.magnifications))
        if oversample and not get_task_spec(task).has_classes:
            raise ValueError(f"oversample is for classes (classification/grading), not a {task} task")
        self._init_cohort(task, num_classes, manifest, run_dir, predict_split)
        self.cache_dir = cache_dir
        self._train_dataset: TrainBagDataset | None = None

    def _init_cohort(
        self, task: str, num_classes: int | None, manifest: str, run_dir: str | None, predict_split: str
    ) -> None:
        """State shared with every subclass (e.g. the feature datamodule): task, manifest, split bookkeeping."""
        if predict_split not in ("all", "train", "val", "test"):
            raise ValueError(f"predict_split {predict_split!r} must be all, train, val or test")
        self.task = task
        self.spec = get_task_spec(task)
        self.num_classes = num_classes if num_classes is not None else self.spec.default_num_targets
        self.manifest_path, self.run_dir = manifest, run_dir
        self.table: pd.DataFrame | None = None
        self.target_state: dict[str, Any] | None = None  # fitted on the training bags (spec.fit_targets)
        self.has_val = True

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Read + validate the manifest against the cache, split, write ``splits.csv`` (idempotent)."""
        if self.table is not None:
            return
        hp = self.hparams
        self.cache = self._open_source()
        df = load_manifest(
            self.manifest_path,
            self.task,
            self.num_classes,
            cache=self.cache if self._manifest_checks_ids else None,
            class_names=hp.class_names,
        )
        self._check_source(df)
        if hp.split_file:
            df["split"] = apply_splits(df, load_splits(hp.split_file), source=f"split file {hp.split_file}")
        else:
            df["split"] = make_splits(
                df, hp.split_ratios, hp.split_seed, fold=hp.fold, num_folds=hp.num_folds
            )
        self.num_classes = self.spec.num_classes(df, self.num_classes)
        if hp.get("survival_bins", "train") == "cohort":  # official rule: bins from every case, test included
            self.target_state = self.spec.fit_targets(self.spec.bag_units(df), self.num_classes)
        self.table = df
        self.bags = {name: self._bags(df[df["split"] == name]) for name in ("train", "val", "test")}
        self.has_val = len(self.bags["val"]) > 0
        if not self.has_val:
            log.warning(
                "the validation split is empty: select checkpoints on the training loss or the last epoch"
            )
        self._write_splits(df)

    # Subclasses reading other per-slide data (e2e_wsi.features.datamodule) override these three.
    _manifest_checks_ids = True

    def _open_source(self) -> PatchCache:
        """The per-slide data behind the bags (here the patch cache)."""
        return PatchCache(self.cache_dir, on_damaged=self.hparams.on_damaged)

    def _check_source(self, df: pd.DataFrame) -> None:
        """Check every manifest slide against the source, all at once."""
        self._check_magnifications(df)

    def _check_magnifications(self, df: pd.DataFrame) -> None:
        needed = set(self.magnifications) | set(self.hparams.eval_magnifications or [])
        bad = []
        for slide_id in df["slide_id"]:
            have = {float(m) for m in self.cache.magnifications(slide_id)}
            if not needed <= have:
                bad.append(f"{slide_id} (has {sorted(have)})")
        if bad:
            raise ValueError(
                f"{len(bad)} slide(s) lack magnification(s) {sorted(needed)} in the cache: {bad[:20]}; "
                "re-run `e2e-wsi preprocess` with those magnifications or change `magnifications`"
            )

    def _bags(self, df: pd.DataFrame) -> list[Bag]:
        """The split's bags with their targets; the first call (the train split) fits the target state."""
        units = self.spec.bag_units(df)
        if self.target_state is None:  # the train split comes first: e.g. survival bins from training times
            self.target_state = self.spec.fit_targets(units, self.num_classes)
        return [Bag(b, s, self.spec.finish_targets(t, self.target_state)) for b, s, t in units]

    @property
    def survival_bin_edges(self) -> list[float] | None:
        """Edges of the survival time bins (0, the training quantiles, inf); ``None`` for other tasks."""
        return (self.target_state or {}).get("bin_edges")

    def _write_splits(self, df: pd.DataFrame) -> None:
        run_dir = self.run_dir
        if run_dir is None and self.trainer is not None:
            run_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if run_dir is None:
            log.info("no run_dir: the split is not written to disk")
            return
        if self.trainer is None or self.trainer.is_global_zero:
            path = save_splits(df, df["split"], RunFolder(run_dir).splits)
            self.split_path = path
            log.info("split written to %s", path)

    # ------------------------------------------------------- split in checkpoints
    def split_fingerprint(self) -> str:
        """SHA-256 of the split (sorted ``slide_id,split`` lines): equal fingerprints, equal splits."""
        table = self._table()
        lines = sorted(f"{s},{t}" for s, t in zip(table["slide_id"], table["split"], strict=True))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Stored in every checkpoint: the split's fingerprint and the training slides (plain data)."""
        if self.table is None:
            return {}
        train = self.table.loc[self.table["split"] == "train", "slide_id"]
        return {"split_sha256": self.split_fingerprint(), "train_slide_ids": sorted(map(str, train))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint trained on another split (resume) or on the slides being evaluated.

        Raises:
            ValueError: ``fit`` resumes with a split other than the checkpoint's, or ``validate``/``test``
                evaluate slides the checkpoint was trained on.
        """
        if self.table is None or not state_dict.get("split_sha256"):
            return  # checkpoints written before splits were fingerprinted
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        stage = str(getattr(fn, "value", fn))
        if stage == "fit" and state_dict["split_sha256"] != self.split_fingerprint():
            raise ValueError(
                "the checkpoint was trained on another split than this run's (split fingerprint "
                f"{state_dict['split_sha256'][:12]} != {self.split_fingerprint()[:12]}): resuming would mix "
                "training and test slides. Resume with the checkpoint's own splits.csv (--data.split_file "
                "RUN/splits.csv of the run that wrote it), or start a fresh fit"
            )
        split = {"validate": "val", "test": "test"}.get(stage)
        if split is not None:
            evaluated = set(self.table.loc[self.table["split"] == split, "slide_id"].astype(str))
            leaked = sorted(evaluated & set(state_dict.get("train_slide_ids", [])))
            if leaked:
                raise ValueError(
                    f"{len(leaked)} {split} slide(s) were training slides of this checkpoint "
                    f"(e.g. {leaked[:5]}): evaluate with the split of the checkpoint's run "
                    "(--data.split_file RUN/splits.csv)"
                )

    def _table(self) -> pd.DataFrame:
        if self.table is None:
            raise RuntimeError("call setup() first (Lightning does it before the loaders are requested)")
        return self.table

    # ------------------------------------------------------------ properties
    @property
    def train_targets(self) -> torch.Tensor:
        """Training targets before oversampling: int64 [n] labels, float32 [n, 2] (time, event) for
        survival, float32 [n] for regression."""
        return self.spec.train_targets([b.targets for b in self._require("train")])

    @property
    def class_counts(self) -> list[int]:
        """Training bags per class (classification/grading) or per time bin (survival).

        Raises:
            ValueError: For a task without discrete targets (regression).
        """
        bags = self._require("train")
        if self.num_classes is None:
            raise ValueError(f"a {self.task} task has no classes to count")
        labels = np.array([b.targets["target"] for b in bags], dtype=np.int64)
        return np.bincount(labels, minlength=self.num_classes or 0).tolist()

    def _require(self, split: str) -> list[Bag]:
        if self.table is None:
            raise RuntimeError("call setup() first (Lightning does it before the loaders are requested)")
        return self.bags[split]

    # ---------------------------------------------------------- dataloaders
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        workers = int(hp.num_workers)
        return {
            "num_workers": workers,
            "pin_memory": hp.pin_memory,
            "collate_fn": collate_bags,
            "persistent_workers": bool(hp.persistent_workers and workers > 0),
        }

    def train_dataset(self) -> TrainBagDataset:
        """The MRIS training dataset (built once, so the shared epoch counter is stable)."""
        if self._train_dataset is None:
            hp = self.hparams
            bags = self._require("train")
            rank, _ = self._rank_world()
            index_map, length = None, None
            if hp.oversample:
                labels = np.array([b.targets["target"] for b in bags])
                index_map = OversampleMap(labels, hp.oversample, hp.seed, hp.oversample_mode)
                length = len(index_map)
            transform = TrainTransform(
                hp.train_patch_size,
                scale=tuple(hp.crop_scale),
                color_jitter=hp.color_jitter,
                crop_chunks=hp.crop_chunks,
            )
            self._train_dataset = TrainBagDataset(
                self.cache,
                bags,
                hp.sample_size,
                self.magnifications,
                hp.mag_ratios,
                transform,
                seed=hp.seed,
                rank=rank,
                index_map=index_map,
                length=length,
                shortfall=hp.mris_shortfall,
            )
        return self._train_dataset

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        rank, world = self._rank_world()
        sampler = EpochSampler(dataset, num_replicas=world, rank=rank, seed=self.hparams.seed)
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        hp = self.hparams
        if hp.drop_last and len(sampler) < hp.batch_size:
            raise ValueError(
                f"drop_last with batch_size {hp.batch_size} but only {len(sampler)} training bag(s) per "
                "process: every batch would be dropped; lower data.batch_size or set data.drop_last false"
            )
        return DataLoader(
            dataset,
            batch_size=hp.batch_size,
            sampler=sampler,
            drop_last=hp.drop_last,
            **self._loader_kwargs(),
        )

    def eval_crop_fraction(self) -> float:
        """The evaluation crop: 1.0 (whole patch resized) when the attached model requires it
        (its encoder's ``eval_resize``, e.g. a converted official checkpoint), else ``eval_crop_fraction``."""
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if model is not None and getattr(model, "eval_resize", False):
            return 1.0
        return float(self.hparams.eval_crop_fraction)

    def _eval_loader(self, bags: list[Bag]) -> DataLoader:
        mags = self.hparams.eval_magnifications or self.magnifications[:1]
        transform = EvalTransform(self.hparams.eval_patch_size, crop_fraction=self.eval_crop_fraction())
        dataset = EvalBagDataset(self.cache, bags, mags, transform)
        rank, world = self._rank_world()
        if world == 1:
            return DataLoader(dataset, batch_size=1, shuffle=False, **self._loader_kwargs())
        # Under DDP, Lightning's default DistributedSampler pads by repeating bags, which would count
        # some slides twice in gathered metrics; this sampler gives each rank a disjoint share instead,
        # and a rank left without a bag (fewer bags than processes) one padding bag that counts for nothing.
        sampler = EvalShardSampler(dataset, num_replicas=world, rank=rank)
        padded = PaddedEvalDataset(dataset)
        return DataLoader(padded, batch_size=1, shuffle=False, sampler=sampler, **self._loader_kwargs())

    def _eval_bags(self, stage: str) -> list[Bag]:
        if stage == "predict":
            split = self.hparams.predict_split
            names = ("train", "val", "test") if split == "all" else (split,)
            return [b for name in names for b in self._require(name)]
        return self._require(stage)

    def val_dataloader(self) -> DataLoader | list:
        bags = self._require("val")
        return self._eval_loader(bags) if bags else []

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self._eval_bags("test"))

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self._eval_bags("predict"))

    def eval_frame(self, stage: str) -> pd.DataFrame:
        """Truth per evaluation unit, row i = item ``index`` i of the stage's loader.

        Args:
            stage: ``val``, ``test`` or ``predict``.

        Returns:
            ``case_id``, ``slide_id`` (the bag id; for survival the case id) and the spec's truth
            columns (``label``; ``time``, ``event``; ``target``).
        """
        rows = []
        table = self._table().set_index("slide_id")
        for bag in self._eval_bags(stage):
            case_id = str(table.loc[bag.slide_ids[0], "case_id"])
            rows.append({"case_id": case_id, "slide_id": bag.bag_id, **self.spec.truth_row(bag.targets)})
        return pd.DataFrame(rows)
