"""Callbacks of a run: checkpoint selection, the fallback without validation, test reports, predictions.

Lives beside (not inside) ``models/`` because these deal with run folders and files, not with tensors.

Per-slide predictions have one owner: :class:`SlidePredictionWriter` collects what the module's
``test_step``/``predict_step`` return, gathers it over ranks and builds the ``predictions.csv`` frame
(format owned by :mod:`e2e_wsi.evaluation.report`); its subclasses only decide what to write.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from e2e_wsi.cache.store import mag_key
from e2e_wsi.evaluation.bootstrap import bootstrap_report
from e2e_wsi.evaluation.report import (
    attention_table,
    format_table,
    predictions_frame,
    unlabelled,
    write_predictions,
    write_report,
)
from e2e_wsi.models.module import real_rows
from e2e_wsi.models.tasks import Task
from e2e_wsi.runs.folder import RunFolder
from e2e_wsi.utils import grid_step, validate_slide_id


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``RUN/checkpoints/last.ckpt`` equal to the state after the latest epoch, for resuming.

    Lightning 2.6's ``save_last`` only rewrites ``last.ckpt`` when a top-k checkpoint was saved in the
    same step, so after an epoch that did not improve the monitored metric ``last.ckpt`` would be stale
    and ``--ckpt_path last`` would silently repeat epochs. This callback saves every epoch instead.
    """

    def __init__(self) -> None:
        super().__init__(
            filename=self.CHECKPOINT_NAME_LAST,
            monitor=None,
            save_top_k=1,
            save_last=False,
            enable_version_counter=False,
            every_n_epochs=1,
        )


def _undefined(current: torch.Tensor | None) -> bool:
    return current is not None and bool(torch.isnan(torch.as_tensor(current)).any())


class DefinedMetricCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never selects a checkpoint on an undefined (NaN) monitored value.

    A metric can be undefined on a validation split (the AUROC of a single-class split, the C-index
    without a comparable pair). Lightning ranks NaN as the worst value but still saves it while fewer
    than ``save_top_k`` checkpoints exist, so an undefined epoch 0 became "best". Here an epoch whose
    monitored value is NaN is skipped; if every epoch is undefined no ``best-*`` checkpoint is written
    and evaluation falls back to ``last.ckpt`` (:meth:`e2e_wsi.runs.RunFolder.best_checkpoint`).
    The CLI substitutes this class for every plain ``ModelCheckpoint`` of a config, whatever it monitors.
    """

    @property
    def state_key(self) -> str:
        # Same key as ModelCheckpoint, so runs and checkpoints written before the substitution resume.
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__) :]

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if _undefined(current):
            rank_zero_info(f"{self.monitor} is undefined (NaN) this epoch: no checkpoint selected on it")
            return False
        return super().check_monitor_top_k(trainer, current)


class DefinedMetricEarlyStopping(EarlyStopping):
    """``EarlyStopping`` that skips epochs whose monitored value is undefined (NaN).

    Lightning's ``check_finite`` stops training at the first NaN; an undefined validation metric says
    nothing about divergence, so such an epoch neither stops training nor uses up patience.
    """

    @property
    def state_key(self) -> str:
        return "EarlyStopping" + super().state_key[len(type(self).__qualname__) :]

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        if _undefined(trainer.callback_metrics.get(self.monitor)):
            return
        super()._run_early_stopping_check(trainer)


_DEFINED_SUBSTITUTES = {
    "lightning.pytorch.callbacks.ModelCheckpoint": DefinedMetricCheckpoint,
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint": DefinedMetricCheckpoint,
    "lightning.pytorch.callbacks.EarlyStopping": DefinedMetricEarlyStopping,
    "lightning.pytorch.callbacks.early_stopping.EarlyStopping": DefinedMetricEarlyStopping,
}


def defined_metric_class_path(class_path: str) -> str:
    """The class path to instantiate for a configured callback: plain ``ModelCheckpoint`` and
    ``EarlyStopping`` become their NaN-skipping subclasses (same arguments); anything else is kept."""
    sub = _DEFINED_SUBSTITUTES.get(class_path)
    return f"{sub.__module__}.{sub.__qualname__}" if sub is not None else class_path


class BestCheckpoint(DefinedMetricCheckpoint):
    """Keeps the best checkpoint (``RUN/checkpoints/best-{epoch}.ckpt``), selected on the task's metric.

    ``monitor`` defaults to the module's ``task.monitor`` (``val/auroc`` for classification, ``val/qwk``
    for grading, ``val/c_index`` for survival) and ``mode`` to its ``task.monitor_mode``, so a config
    states the task once (``model.task``) and never repeats the metric. Giving ``monitor`` overrides it;
    ``mode`` then defaults to Lightning's ``min`` unless the metric is the task's own.

    Args:
        monitor: Logged metric to select on; ``None`` = the task's.
        mode: ``max`` or ``min``; ``None`` = the task's for its metric, else ``min``.
        filename: Checkpoint name pattern (``RunFolder.best_checkpoints`` lists every non-``last`` one).
        save_top_k: How many best checkpoints to keep.
        **kwargs: Any other :class:`~lightning.pytorch.callbacks.ModelCheckpoint` argument.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        filename: str = "best-{epoch}",
        save_top_k: int = 1,
        **kwargs: Any,
    ) -> None:
        if save_top_k < -1:
            raise ValueError(f"save_top_k must be >= -1, got {save_top_k}")
        # ModelCheckpoint refuses top-k > 1 without a monitor; ours arrives from the task in setup.
        super().__init__(
            monitor=monitor,
            mode=mode or "min",
            filename=filename,
            save_top_k=save_top_k if monitor is not None else min(save_top_k, 1),
            **kwargs,
        )
        self.save_top_k = save_top_k
        self._given_mode = mode
        self._resolved = False

    @property
    def state_key(self) -> str:
        # A class of its own (not a stand-in for ModelCheckpoint): keep Lightning's usual key.
        return ModelCheckpoint.state_key.fget(self)  # type: ignore[attr-defined]

    def follow_task(self, task: Task) -> None:
        """Fill the unset ``monitor``/``mode`` from ``task`` (idempotent; called before any checkpoint)."""
        if self._resolved:
            return
        self._resolved = True
        _aim(self, *selection_metric(self.monitor, self._given_mode, task))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.follow_task(pl_module.task)
        super().setup(trainer, pl_module, stage)


class TaskEarlyStopping(DefinedMetricEarlyStopping):
    """Early stopping on the same metric family as :class:`BestCheckpoint`, stated once by the task.

    Args:
        monitor: ``None`` (default): the task's ``monitor`` (validation loss for the paper tasks);
            ``"official"``: the official code's metric (:func:`official_selection`); or a logged metric.
        mode: ``None``: follows the metric (see :func:`selection_metric`).
        patience: Validation epochs without improvement before stopping (official ``patient``).
        **kwargs: Any other Lightning ``EarlyStopping`` argument (``strict``, ``min_delta`` ...).
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        patience: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(monitor=monitor or "val/loss", mode=mode or "min", patience=patience, **kwargs)
        self._given_monitor, self._given_mode = monitor, mode
        self._resolved = False

    def follow_task(self, task: Task) -> None:
        """Resolve ``monitor``/``mode`` against ``task`` (idempotent; before the first check)."""
        if self._resolved:
            return
        self._resolved = True
        self.monitor, self.mode = selection_metric(self._given_monitor, self._given_mode, task)
        self.min_delta = abs(self.min_delta) * (1 if self.monitor_op == torch.gt else -1)
        self.best_score = torch.tensor(math.inf if self.mode == "min" else -math.inf)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.follow_task(pl_module.task)
        super().setup(trainer, pl_module, stage)


def official_selection(task: Task) -> tuple[str, Literal["min", "max"]]:
    """The official code's selection and early-stopping metric for ``task``, always maximised.

    DearCaat/E2E-WSI-ABMILX stops early and keeps checkpoints on the validation value of its main
    metric: index ``best_metric_index`` of the metric list, 0 (AUC) for two classes and survival
    (C-index), 1 (macro-averaged accuracy) otherwise (options.py:253-254; engines/metrics.py:196-204,
    227-228; main.py:375,394), with ``EarlyStopping(score = -metric)`` (utils.py:288-327,
    train_utils.py:108-114). Under ``test_type: both_ema`` the early-stopping value is the EMA model's
    (engines/base_engine.py:343-364, main.py:305-307). Our validation metrics are the EMA model's
    whenever ``model.ema_decay`` is set (``SlideModule`` evaluates the EMA weights).
    """
    if task.kind == "survival":
        return "val/c_index", "max"
    if task.kind == "classification" and getattr(task, "num_classes", 2) == 2:
        return "val/auroc", "max"
    return "val/balanced_accuracy", "max"


def selection_metric(
    monitor: str | None, mode: Literal["min", "max"] | None, task: Task
) -> tuple[str, Literal["min", "max"]]:
    """``(monitor, mode)`` of a selection callback: ``None`` = the task's own metric, ``"official"`` =
    :func:`official_selection`, else the named metric with ``mode`` or :func:`_mode_of`."""
    if monitor is None:
        return task.monitor, mode or task.monitor_mode
    if monitor == "official":
        official, official_mode = official_selection(task)
        return official, mode or official_mode
    return monitor, mode or _mode_of(monitor, task)


def _mode_of(monitor: str, task: Task) -> Literal["min", "max"]:
    """``min`` or ``max`` for a logged metric: the task's own mode for its metric; ``max`` for the task's
    other metrics (AUROC, accuracy, QWK, C-index: higher is better); ``min`` for anything else (losses)."""
    if monitor == task.monitor:
        return task.monitor_mode
    stage, _, name = monitor.partition("/")
    return "max" if stage in {"train", "val"} and name in task.metrics() else "min"


def _aim(cb: ModelCheckpoint, monitor: str, mode: str) -> None:
    """Point a checkpoint callback at ``monitor``; its "worst kept" value must follow the new mode."""
    cb.monitor, cb.mode = monitor, mode
    cb.kth_value = torch.tensor(math.inf if mode == "min" else -math.inf)


class NoValidationFallback(Callback):
    """Selects checkpoints on ``train/loss`` when the split has no validation slides.

    Checkpoint selection and early stopping must never look at the test split; without a validation
    split the honest choices are the training loss or the last epoch. This callback says so loudly and
    re-points ``ModelCheckpoint`` at ``train/loss`` (``last.ckpt`` is kept as well) and disables early
    stopping on validation metrics.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit" or dm is None or getattr(dm, "has_val", True):
            return
        warnings.warn(
            "no validation split: checkpoints are selected on train/loss (plus last.ckpt), never on test",
            stacklevel=2,
        )
        for cb in trainer.callbacks:
            if isinstance(cb, BestCheckpoint):
                cb.follow_task(pl_module.task)  # whichever setup runs first, the task's metric is known
            if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.monitor.startswith("val/"):
                _aim(cb, "train/loss_epoch", "min")
            if isinstance(cb, EarlyStopping) and cb.monitor.startswith("val/"):
                cb.patience = 10**9  # in effect off; removing it from trainer.callbacks is not supported


class SlidePredictionWriter(Callback):
    """Collects the per-slide predictions of a ``test`` or ``predict`` epoch and hands them to a writer.

    Modelled on Lightning's :class:`~lightning.pytorch.callbacks.BasePredictionWriter`: the module's
    ``test_step``/``predict_step`` return ``index`` [B] (positions in the evaluation dataset) and
    ``preds`` (``probs`` [B, K] or ``risk`` [B]); this callback is the one object that collects them.
    At the end of the epoch it gathers every rank's rows (padded samplers' duplicates removed), builds
    the ``predictions.csv`` frame with :func:`e2e_wsi.evaluation.report.predictions_frame` and calls
    :meth:`write_on_epoch_end` on rank 0. :meth:`write_on_batch_end` sees every batch on every rank.

    Args:
        stage: ``test`` or ``predict``: the loop whose outputs are collected.
    """

    def __init__(self, stage: Literal["test", "predict"]) -> None:
        if stage not in ("test", "predict"):
            raise ValueError(f"stage must be 'test' or 'predict', got {stage!r}")
        self.stage = stage
        self._rows: list[dict[str, Tensor]] = []

    # ------------------------------------------------------------------------ to override
    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict, batch: dict
    ) -> None:
        """Write per-batch files (every rank). Default: nothing."""

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, frame: pd.DataFrame
    ) -> None:
        """Write the epoch's predictions (rank 0 only); ``frame`` is in the ``predictions.csv`` layout."""
        raise NotImplementedError

    # --------------------------------------------------------------------------- collection
    def reset(self) -> None:
        """Forget the rows of an earlier epoch."""
        self._rows = []

    def collect(self, outputs: dict) -> None:
        """Keep one batch's ``index`` [B] and per-slide ``preds`` (detached)."""
        preds = {k: v.detach() for k, v in outputs["preds"].items()}
        self._rows.append({"index": outputs["index"].detach(), **preds})

    def gather(self, pl_module: L.LightningModule) -> dict[str, Tensor]:
        """This epoch's rows from every rank, sorted by dataset index; collective (every rank calls it).

        Returns:
            ``index`` [M] and ``probs`` [M, K] or ``risk`` [M]; ``{}`` when nothing was collected.
        """
        if not self._rows:
            return {}
        local = {k: torch.cat([row[k] for row in self._rows]) for k in self._rows[0]}
        if pl_module.trainer.world_size > 1:
            local = {k: _gather_rows(pl_module, v) for k, v in local.items()}
        order = torch.argsort(local["index"])
        ordered = {k: v[order] for k, v in local.items()}
        keep = torch.ones_like(ordered["index"], dtype=torch.bool)
        keep[1:] = ordered["index"][1:] != ordered["index"][:-1]
        keep &= (
            ordered["index"] >= 0
        )  # padding bags of DDP ranks without a slide (index -1) count for nothing
        return {k: v[keep] for k, v in ordered.items()}

    # -------------------------------------------------------------------------------- hooks
    def _batch_end(self, trainer, pl_module, outputs, batch) -> None:
        self.collect(outputs)
        self.write_on_batch_end(trainer, pl_module, outputs, batch)

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preds = self.gather(pl_module)
        self.reset()
        if not trainer.is_global_zero or not preds:
            return
        arrays = {k: v.cpu().numpy() for k, v in preds.items()}
        frame = predictions_frame(trainer.datamodule.eval_frame(self.stage), pl_module.task.kind, arrays)
        self.write_on_epoch_end(trainer, pl_module, frame)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        if self.stage == "test":
            self.reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "test":
            self._batch_end(trainer, pl_module, outputs, batch)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if self.stage == "test":
            self._epoch_end(trainer, pl_module)

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        if self.stage == "predict":
            self.reset()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.stage == "predict":
            self._batch_end(trainer, pl_module, outputs, batch)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        if self.stage == "predict":
            self._epoch_end(trainer, pl_module)


def _gather_rows(pl_module: L.LightningModule, value: Tensor) -> Tensor:
    """all_gather rows of unequal count per rank by padding to the largest count."""
    count = torch.tensor([value.shape[0]], device=value.device)
    counts = pl_module.all_gather(count).flatten()
    width = int(counts.max())
    padded = torch.zeros((width, *value.shape[1:]), dtype=value.dtype, device=value.device)
    padded[: value.shape[0]] = value
    gathered = pl_module.all_gather(padded)
    return torch.cat([gathered[r, : int(c)] for r, c in enumerate(counts)])


class TestReportWriter(SlidePredictionWriter):
    """After ``test``: ``RUN/predictions.csv`` and the bootstrap report (``metrics.json``/``metrics.md``).

    Args:
        n_resamples: Bootstrap resamples (case-level).
        seed: Bootstrap seed.
    """

    __test__ = False  # a callback, not a pytest test class

    def __init__(self, n_resamples: int = 1000, seed: int = 0) -> None:
        super().__init__("test")
        self.n_resamples = n_resamples
        self.seed = seed

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, frame: pd.DataFrame
    ) -> None:
        run = RunFolder(trainer.default_root_dir)
        write_predictions(frame, run.predictions)
        report = bootstrap_report(frame, pl_module.task.kind, n_resamples=self.n_resamples, seed=self.seed)
        json_path, md_path = write_report(report, run.root)
        print("\n" + format_table(report))
        print(f"e2e-wsi: predictions {run.predictions.resolve()}")
        print(f"e2e-wsi: report {json_path.resolve()} and {md_path.resolve()}", flush=True)


class PredictionWriter(SlidePredictionWriter):
    """After ``predict``: ``RUN/predict/predictions.csv`` and ``RUN/predict/attention/<id>.csv`` per bag.

    The same files and columns as ``e2e-wsi predict --run`` on new slides (:mod:`e2e_wsi.inference.outputs`):
    ``predictions.csv`` holds the unit's id and the prediction columns (no truth: predict needs no
    labels), each attention file one row per patch (:func:`e2e_wsi.evaluation.report.attention_table`).
    """

    def __init__(self) -> None:
        super().__init__("predict")

    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: dict, batch: dict
    ) -> None:
        out = RunFolder(trainer.default_root_dir).predict_attention_dir
        out.mkdir(parents=True, exist_ok=True)
        real = real_rows(batch)
        cache = getattr(trainer.datamodule, "cache", None)  # patch runs; feature runs have none
        for b, bag_id in enumerate(batch["bag_id"]):
            if not bool(real[b]):
                continue  # a padding bag of a DDP rank without a slide of its own
            valid = batch["mask"][b].cpu()  # everything below indexed on the CPU (batches may live on a GPU)
            coords = batch["coords"][b].cpu()[valid].numpy()
            mags = batch["magnification"][b].cpu()[valid].numpy()
            slides = [batch["slide_ids"][b][int(i)] for i in batch["patch_slide"][b].cpu()[valid]]
            attention = outputs["attention"][b].float().cpu()[:, valid].numpy()
            frame = attention_table(coords, _patch_sides(cache, slides, mags, coords), mags, attention)
            path = out / f"{validate_slide_id(bag_id)}.csv"
            tmp = path.with_name(f".{path.name}.tmp")
            frame.to_csv(tmp, index=False)
            tmp.replace(path)

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, frame: pd.DataFrame
    ) -> None:
        path = write_predictions(
            unlabelled(frame, pl_module.task.kind), RunFolder(trainer.default_root_dir).predict_predictions
        )
        print(f"e2e-wsi: predictions {path.resolve()} ; attention in {path.parent / 'attention'}", flush=True)


def _patch_sides(cache: Any, slides: list[str], mags: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """[N] side of each patch in level-0 pixels: from the patch cache's metadata, else the grid step of
    the coordinates (features without a cache), else NaN."""
    if cache is not None and hasattr(cache, "meta"):
        sizes = {}
        for slide, mag in set(zip(slides, mags.tolist(), strict=True)):
            meta = cache.meta(slide)["magnifications"][mag_key(float(mag))]
            sizes[(slide, mag)] = int(meta["size_level0"])
        return np.array([sizes[(s, m)] for s, m in zip(slides, mags.tolist(), strict=True)], dtype=np.float64)
    step = grid_step(coords)
    return np.full(len(coords), np.nan if step is None else float(step))
