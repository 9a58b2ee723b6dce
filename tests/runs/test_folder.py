"""Run folders, cross-validation folders and which checkpoint each verb loads (e2e_wsi.runs)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from e2e_wsi.runs import CrossvalFolder, RunFolder, encoder_from_run, load_run, resolve_checkpoints
from e2e_wsi.runs.preprocess import preprocess_params
from e2e_wsi.runs.resolve import command_run_folder, resolve_checkpoint


def _touch(path: Path, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def test_best_checkpoint_is_the_newest_selected_one_else_last(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    assert run.best_checkpoint() is None and not run.has_checkpoints()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint.*e2e-wsi fit"):
        run.require_checkpoint()
    last = _touch(run.checkpoint("last.ckpt"))
    assert run.best_checkpoint() == last and run.has_checkpoints()
    _touch(run.checkpoint("best-epoch=1.ckpt"), mtime=1_000)
    newer = _touch(run.checkpoint("best-epoch=3.ckpt"), mtime=2_000)
    assert run.best_checkpoint() == newer
    assert resolve_checkpoint("test", None, run) == str(newer)
    assert resolve_checkpoint("fit", "last", run) == str(last)
    assert resolve_checkpoint("fit", None, run) is None


def test_resolve_checkpoints_of_a_run_a_crossval_folder_and_names(tmp_path: Path) -> None:
    cv = CrossvalFolder(tmp_path / "cv")
    fold_ckpts = [_touch(cv.fold(k).checkpoint("last.ckpt")) for k in (0, 1, 10)]
    assert [f.root.name for f in cv.folds()] == ["fold_0", "fold_1", "fold_10"]  # numeric order
    assert CrossvalFolder.is_crossval_folder(cv.root)
    assert resolve_checkpoints(cv.root) == fold_ckpts
    assert resolve_checkpoints(cv.fold(1).root) == [fold_ckpts[1]]
    assert resolve_checkpoints(cv.fold(1).root, ["last.ckpt"]) == [fold_ckpts[1]]  # a name inside RUN
    with pytest.raises(FileNotFoundError, match="or a name in"):
        resolve_checkpoints(cv.fold(1).root, ["best.ckpt"])
    with pytest.raises(ValueError, match="--run RUN"):
        resolve_checkpoints(None)


def test_command_run_folder_order(tmp_path: Path) -> None:
    copy = RunFolder(tmp_path / "copy")
    _touch(copy.splits)
    ckpt = tmp_path / "orig" / "checkpoints" / "x.ckpt"
    assert command_run_folder("typed", True, [copy.config], str(ckpt)) == RunFolder("typed")
    assert command_run_folder("in_config", False, [copy.config], str(ckpt)) == copy
    assert command_run_folder(None, False, [tmp_path / "c.yaml"], str(ckpt)) == RunFolder(tmp_path / "orig")
    assert command_run_folder(None, False, [], "https://x/checkpoints/a.ckpt") == RunFolder("runs/default")


def _copy_run(src: Path, dst: Path) -> RunFolder:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("events.*", "best-*"))
    return RunFolder(dst)


def test_load_run_from_a_run_folder_never_fetches_initial_weights(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained from ImageNet weights loads where no ImageNet file exists: the checkpoint has them."""
    run = _copy_run(tiny_run, tmp_path / "run")
    config = yaml.safe_load(run.config.read_text())
    config["model"]["encoder"]["init_args"]["weights"] = "imagenet"
    run.config.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    loaded = load_run(run.root)
    assert loaded.checkpoint == run.checkpoint("last.ckpt") and loaded.run == run
    state = torch.load(run.checkpoint("last.ckpt"), map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(loaded.model.encoder.state_dict()["conv1.weight"], state["encoder.conv1.weight"])
    encoder, size = encoder_from_run(run.root)
    assert size == loaded.eval_patch_size
    assert torch.equal(encoder.state_dict()["conv1.weight"], state["encoder.conv1.weight"])
    assert loaded.preprocess_params() == preprocess_params(run, loaded.data)
