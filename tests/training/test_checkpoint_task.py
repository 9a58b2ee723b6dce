"""Resuming from a checkpoint of another task is refused before training (issue 21 item 14): the task is
recorded in every checkpoint; checkpoints without it are compared by the shapes of their head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from e2e_wsi.cli import main
from e2e_wsi.errors import UserError
from e2e_wsi.models.module import SlideModule
from e2e_wsi.models.tasks import ClassificationTask


def test_resuming_with_another_task_is_refused(
    synth_cache: tuple[Path, Path],
    tmp_path: Path,
    tiny_args: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest, cache = synth_cache
    run = tmp_path / "run"
    assert main(tiny_args(manifest, cache, run, "--trainer.max_epochs", "1")) == 0
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["e2e_wsi_task"] == {
        "kind": "classification",
        "task": "ClassificationTask",
    }
    capsys.readouterr()
    grading = ["--model.task", "e2e_wsi.models.tasks.GradingTask", "--model.task.init_args.num_classes", "2"]
    args = tiny_args(manifest, cache, tmp_path / "resumed", "--trainer.max_epochs", "2", *grading)
    assert main([*args, "--ckpt_path", str(last)]) == 2
    err = capsys.readouterr().err
    assert "trained for a classification task (ClassificationTask) but model.task here is grading" in err


def test_a_checkpoint_without_a_recorded_task_is_compared_by_its_head(tiny_run: Path) -> None:
    state = torch.load(tiny_run / "checkpoints" / "last.ckpt", weights_only=True)
    state.pop("e2e_wsi_task", None)  # as written before tasks were recorded
    SlideModule(task=ClassificationTask(2)).on_load_checkpoint(state)
    with pytest.raises(UserError, match=r"head.* is \(2, .*\) but model.task here gives \(3, "):
        SlideModule(task=ClassificationTask(3)).on_load_checkpoint(state)
