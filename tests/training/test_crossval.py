"""`e2e-wsi crossval` on a tiny cohort: K run folders, resume, pooled out-of-fold predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from e2e_wsi.cli import main
from e2e_wsi.runs import resolve_checkpoints


@pytest.fixture(scope="module")
def crossval_dir(synth_cache: tuple[Path, Path], tiny_args, tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest, cache = synth_cache
    root = tmp_path_factory.mktemp("cv") / "cv"
    fit = tiny_args(manifest, cache, root)  # ["fit", "--config", C, "--run_dir", R, *overrides]
    config, overrides = fit[2], fit[5:]
    args = ["crossval", "--config", config, "--folds", "2", "--run_dir", str(root), "--bootstrap", "50"]
    assert main([*args, *overrides, "--trainer.max_epochs", "1"]) == 0
    return root


def test_each_fold_is_a_run_folder_with_its_own_test_cases(crossval_dir: Path, synth_cache) -> None:
    cases = set(pd.read_csv(synth_cache[0])["case_id"])
    held_out = []
    for k in range(2):
        fold = crossval_dir / f"fold_{k}"
        assert (fold / "config.yaml").is_file() and (fold / "metrics.json").is_file()
        assert (fold / "checkpoints" / "last.ckpt").is_file()
        splits = pd.read_csv(fold / "splits.csv")
        test = set(splits.loc[splits["split"] == "test", "case_id"])
        assert set(splits["case_id"]) == cases
        held_out.append(test)
    assert held_out[0].isdisjoint(held_out[1]) and held_out[0] | held_out[1] == cases


def test_out_of_fold_predictions_cover_every_case_once(crossval_dir: Path, synth_cache) -> None:
    oof = pd.read_csv(crossval_dir / "oof_predictions.csv")
    manifest = pd.read_csv(synth_cache[0])
    assert sorted(oof["slide_id"]) == sorted(manifest["slide_id"])
    for k in range(2):
        fold_preds = pd.read_csv(crossval_dir / f"fold_{k}" / "predictions.csv")
        assert sorted(oof.loc[oof["fold"] == k, "slide_id"]) == sorted(fold_preds["slide_id"])
    summary = json.loads((crossval_dir / "summary.json").read_text())
    assert summary["task"] == "classification" and [r["fold"] for r in summary["per_fold"]] == [0, 1]
    assert summary["pooled"]["n"] == len(manifest) and summary["pooled"]["bootstrap"]["n_resamples"] == 50
    auroc = summary["pooled"]["metrics"]["auroc"]
    assert auroc["ci_low"] <= auroc["mean"] <= auroc["ci_high"]
    assert "Pooled out-of-fold" in (crossval_dir / "summary.md").read_text()


def test_resume_skips_finished_folds(
    crossval_dir: Path, synth_cache, tiny_args, capsys: pytest.CaptureFixture[str]
) -> None:
    fold0 = crossval_dir / "fold_0" / "checkpoints" / "last.ckpt"
    fold1 = crossval_dir / "fold_1"
    before = fold0.stat().st_mtime_ns
    (fold1 / "metrics.json").unlink()  # fold 1 "killed" after fit, before its test report
    fit = tiny_args(*synth_cache, crossval_dir)
    args = [
        "crossval",
        "--config",
        fit[2],
        "--folds",
        "2",
        "--run_dir",
        str(crossval_dir),
        "--bootstrap",
        "50",
    ]
    assert main([*args, *fit[5:], "--trainer.max_epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "fold 0 finished already" in out and "fold 1 finished already" not in out
    assert fold0.stat().st_mtime_ns == before
    assert (fold1 / "metrics.json").is_file()
    assert len(pd.read_csv(crossval_dir / "oof_predictions.csv")) == len(pd.read_csv(synth_cache[0]))


def test_a_crossval_folder_is_an_ensemble_of_its_folds(crossval_dir: Path) -> None:
    ckpts = resolve_checkpoints(crossval_dir)
    assert [c.parent.parent.name for c in ckpts] == ["fold_0", "fold_1"]
