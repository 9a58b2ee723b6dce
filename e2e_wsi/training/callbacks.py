"""Callbacks the CLI adds to every run: checkpoint fallback without validation, test reports, predictions.

Lives beside (not inside) ``models/`` because these deal with run folders and files, not with tensors.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from e2e_wsi.evaluation.bootstrap import bootstrap_report
from e2e_wsi.evaluation.report import format_table, write_report
from e2e_wsi.models.module import real_rows
from e2e_wsi.models.tasks import prediction_columns
from e2e_wsi.utils import validate_slide_id


def run_dir_of(trainer: L.Trainer) -> Path:
    """The run folder (the CLI sets ``default_root_dir`` to it)."""
    return Path(trainer.default_root_dir)


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
    and evaluation falls back to ``last.ckpt`` (:meth:`e2e_wsi.training.run.RunFolder.best_checkpoint`).
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
            if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.monitor.startswith("val/"):
                # Re-aim the callback; its "worst kept" value must follow the new mode.
                cb.monitor, cb.mode = "train/loss_epoch", "min"
                cb.kth_value = torch.tensor(float("inf"))
            if isinstance(cb, EarlyStopping) and cb.monitor.startswith("val/"):
                cb.patience = 10**9  # in effect off; removing it from trainer.callbacks is not supported


class TestReportWriter(Callback):
    """After ``test``: ``predictions.csv`` and the bootstrap report (``metrics.json``/``metrics.md``).

    Args:
        n_resamples: Bootstrap resamples (case-level).
        seed: Bootstrap seed.
    """

    def __init__(self, n_resamples: int = 1000, seed: int = 0) -> None:
        self.n_resamples = n_resamples
        self.seed = seed

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        preds = pl_module.collected_predictions()  # collective: every rank must call it
        if not trainer.is_global_zero or not preds:
            return
        frame = predictions_frame(trainer.datamodule.eval_frame("test"), pl_module.task, preds)
        out = run_dir_of(trainer)
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "predictions.csv"
        frame.to_csv(csv_path, index=False)
        report = bootstrap_report(frame, pl_module.task.kind, n_resamples=self.n_resamples, seed=self.seed)
        json_path, md_path = write_report(report, out)
        print("\n" + format_table(report))
        print(f"e2e-wsi: predictions {csv_path.resolve()}")
        print(f"e2e-wsi: report {json_path.resolve()} and {md_path.resolve()}", flush=True)


def predictions_frame(units: pd.DataFrame, task, preds: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Join per-unit truth (rows in dataset order) with gathered predictions by dataset index.

    Args:
        units: One row per evaluated unit with ``case_id`` and ``slide_id`` (classification/grading:
            ``label``; survival: ``time``, ``event``), in dataset order.
        task: The module's task.
        preds: ``index`` [M] and ``probs`` [M, K] or ``risk`` [M].

    Returns:
        The ``predictions.csv`` frame.
    """
    index = preds["index"].cpu().numpy()
    rows = units.iloc[index].reset_index(drop=True)
    cols = prediction_columns(task, {k: v for k, v in preds.items() if k != "index"})
    if task.kind == "survival":
        base = rows[["case_id", "time", "event"]]
    else:
        base = rows[["case_id", "slide_id", "label"]]
    return pd.concat([base, pd.DataFrame(cols)], axis=1)


class PredictionWriter(Callback):
    """After ``predict``: ``predict/predictions.csv`` and ``predict/attention/<id>.pt`` per bag.

    Attention files hold plain tensors (``attention`` [H, N], ``coords`` [N, 2] level-0 x, y,
    ``magnification`` [N]) and load with ``torch.load(path, weights_only=True)``.
    """

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        out = run_dir_of(trainer) / "predict" / "attention"
        out.mkdir(parents=True, exist_ok=True)
        real = real_rows(batch)
        for b, bag_id in enumerate(batch["bag_id"]):
            if not bool(real[b]):
                continue  # a padding bag of a DDP rank without a slide of its own
            valid = batch["mask"][b]
            torch.save(
                {
                    "attention": outputs["attention"][b][:, valid].float().cpu(),
                    "coords": batch["coords"][b][valid].cpu(),
                    "magnification": batch["magnification"][b][valid].cpu(),
                },
                out / f"{validate_slide_id(bag_id)}.pt",
            )
        pl_module._collected.append(
            {
                "index": outputs["index"].detach()[real],
                **{k: v.detach()[real] for k, v in outputs["preds"].items()},
            }
        )

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        pl_module._collected = []

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        preds = pl_module.collected_predictions()
        if not trainer.is_global_zero or not preds:
            return
        frame = predictions_frame(trainer.datamodule.eval_frame("predict"), pl_module.task, preds)
        path = run_dir_of(trainer) / "predict" / "predictions.csv"
        frame.to_csv(path, index=False)
        print(f"e2e-wsi: predictions {path.resolve()} ; attention in {path.parent / 'attention'}", flush=True)
