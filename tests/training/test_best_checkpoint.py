"""BestCheckpoint takes the metric that selects checkpoints from the task (the task is stated once)."""

from __future__ import annotations

import math

import pytest

from e2e_wsi.models.tasks import ClassificationTask, CoxSurvivalTask, GradingTask
from e2e_wsi.training.callbacks import BestCheckpoint


@pytest.mark.parametrize(
    ("task", "monitor", "mode"),
    [
        (ClassificationTask(), "val/loss", "min"),  # AUROC saturates on small validation sets (issue 11)
        (GradingTask(), "val/loss", "min"),
        (CoxSurvivalTask(), "val/c_index", "max"),  # the Cox loss depends on how cases are batched
    ],
)
def test_monitor_and_mode_default_to_the_task(task, monitor: str, mode: str) -> None:
    cb = BestCheckpoint()
    assert cb.monitor is None  # nothing is decided before the task is known
    cb.follow_task(task)
    assert (cb.monitor, cb.mode) == (task.monitor, task.monitor_mode) == (monitor, mode)
    # the "worst kept" score follows the mode
    assert cb.kth_value.item() == (math.inf if mode == "min" else -math.inf)
    assert cb.filename == "best-{epoch}" and cb.save_top_k == 1


def test_an_explicit_monitor_wins_with_the_right_direction() -> None:
    cb = BestCheckpoint(monitor="val/auroc", save_top_k=3)
    cb.follow_task(ClassificationTask())
    assert (cb.monitor, cb.mode, cb.save_top_k) == ("val/auroc", "max", 3)  # a task metric: higher is better
    cb = BestCheckpoint(monitor="val/accuracy", mode="min")  # an explicit mode always wins
    cb.follow_task(GradingTask())
    assert (cb.monitor, cb.mode) == ("val/accuracy", "min")
    cb = BestCheckpoint(monitor="val/qwk")
    cb.follow_task(GradingTask())
    assert cb.mode == "max"
    cb = BestCheckpoint(monitor="train/loss_epoch")  # not a task metric: Lightning's default, min
    cb.follow_task(ClassificationTask())
    assert cb.mode == "min"


def test_bad_top_k_is_rejected() -> None:
    with pytest.raises(ValueError, match="save_top_k"):
        BestCheckpoint(save_top_k=-2)


@pytest.mark.parametrize(
    ("task", "metric"),
    [
        (ClassificationTask(num_classes=2), "val/auroc"),  # official best_metric_index 0 (AUC)
        (ClassificationTask(num_classes=3), "val/balanced_accuracy"),  # index 1: macro accuracy
        (GradingTask(num_classes=6), "val/balanced_accuracy"),
        (CoxSurvivalTask(), "val/c_index"),
    ],
)
def test_official_selection_and_early_stopping_follow_the_official_main_metric(task, metric: str) -> None:
    from e2e_wsi.training.callbacks import TaskEarlyStopping

    best, stop = BestCheckpoint(monitor="official"), TaskEarlyStopping(monitor="official", patience=10)
    best.follow_task(task)
    stop.follow_task(task)
    assert (best.monitor, best.mode) == (stop.monitor, stop.mode) == (metric, "max")
    assert stop.best_score == -math.inf and stop.patience == 10
    default = TaskEarlyStopping(patience=10)  # our default: the task's own metric (validation loss)
    default.follow_task(GradingTask())
    assert (default.monitor, default.mode, default.best_score) == ("val/loss", "min", math.inf)
