"""BestCheckpoint takes the metric that selects checkpoints from the task (the task is stated once)."""

from __future__ import annotations

import math

import pytest

from e2e_wsi.models.tasks import ClassificationTask, CoxSurvivalTask, GradingTask
from e2e_wsi.training.callbacks import BestCheckpoint


@pytest.mark.parametrize(
    ("task", "monitor"),
    [(ClassificationTask(), "val/auroc"), (GradingTask(), "val/qwk"), (CoxSurvivalTask(), "val/c_index")],
)
def test_monitor_and_mode_default_to_the_task(task, monitor: str) -> None:
    cb = BestCheckpoint()
    assert cb.monitor is None  # nothing is decided before the task is known
    cb.follow_task(task)
    assert (cb.monitor, cb.mode) == (monitor, task.monitor_mode) == (monitor, "max")
    assert cb.kth_value.item() == -math.inf  # the "worst kept" score follows the mode
    assert cb.filename == "best-{epoch}" and cb.save_top_k == 1


def test_an_explicit_monitor_wins_and_keeps_lightnings_default_mode() -> None:
    cb = BestCheckpoint(monitor="val/loss", save_top_k=3)
    cb.follow_task(ClassificationTask())
    assert (cb.monitor, cb.mode, cb.save_top_k) == ("val/loss", "min", 3)
    cb = BestCheckpoint(monitor="val/accuracy", mode="max")
    cb.follow_task(GradingTask())
    assert (cb.monitor, cb.mode) == ("val/accuracy", "max")
    # Naming the task's own metric keeps the task's mode.
    cb = BestCheckpoint(monitor="val/qwk")
    cb.follow_task(GradingTask())
    assert cb.mode == "max"


def test_bad_top_k_is_rejected() -> None:
    with pytest.raises(ValueError, match="save_top_k"):
        BestCheckpoint(save_top_k=-2)
