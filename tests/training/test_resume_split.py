"""Resuming never re-splits (issue 12, leakage): a resume into a new run folder with another split seed
keeps the checkpoint's split, and a checkpoint refuses a resume with any other split."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from e2e_wsi.cli import main


def _resume(run: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(run.parent / "src" / "config.yaml"), "--run_dir", str(run),
            "--ckpt_path", str(ckpt), "--trainer.max_epochs", "3", *extra]  # fmt: skip


def test_resume_into_a_new_folder_with_another_seed_keeps_the_split(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_run, src, ignore=shutil.ignore_patterns("predict", "predictions.csv", "metrics.*"))
    new = tmp_path / "new"
    ckpt = src / "checkpoints" / "last.ckpt"
    assert main(_resume(new, ckpt, "--data.split_seed", "7")) == 0
    assert pd.read_csv(new / "splits.csv").equals(pd.read_csv(src / "splits.csv"))
    state = torch.load(new / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and len(state["WSIDataModule"]["split_sha256"]) == 64
    train = pd.read_csv(src / "splits.csv").query("split == 'train'")["slide_id"]
    assert state["WSIDataModule"]["train_slide_ids"] == sorted(train)
    # The resumed run's config records where fit resumed from; `test` evaluates this run's own best.
    capsys.readouterr()
    assert main(["test", "--config", str(new / "config.yaml"), "--bootstrap", "10"]) == 0
    out = capsys.readouterr().out
    assert "ignoring ckpt_path" in out and f"checkpoint {(new / 'checkpoints').resolve()}" in out
    assert (new / "predictions.csv").is_file() and not (src / "predictions.csv").exists()


def test_resume_with_a_different_split_is_refused(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_run, src, ignore=shutil.ignore_patterns("predict", "predictions.csv", "metrics.*"))
    splits = pd.read_csv(src / "splits.csv")
    # Swap a training slide with a test slide: the same slides, another split.
    i, j = splits.index[splits["split"] == "train"][0], splits.index[splits["split"] == "test"][0]
    splits.loc[[i, j], "split"] = ["test", "train"]
    other = tmp_path / "other_split.csv"
    splits.to_csv(other, index=False)
    new = tmp_path / "new"
    ckpt = src / "checkpoints" / "last.ckpt"
    assert main(_resume(new, ckpt, "--data.split_file", str(other))) == 2
    assert "trained on another split" in capsys.readouterr().err
    assert not (new / "checkpoints" / "last.ckpt").exists()
    # Testing that checkpoint on a split whose test slides it was trained on is refused as well.
    assert main(["test", "--config", str(src / "config.yaml"), "--ckpt_path", str(ckpt),
                 "--run_dir", str(tmp_path / "t"), "--data.split_file", str(other)]) == 2  # fmt: skip
    assert "were training slides of this checkpoint" in capsys.readouterr().err
