"""The regression kind end to end on real parts: a synthetic `regression` cohort (pyramidal TIFFs whose
target is their lesion percentage), its LMDB cache, a tiny in-process `fit` and `test`, `predict` on a
slide file and a heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e2e_wsi.cache.preprocess import PreprocessConfig, jobs_from_manifest, preprocess
from e2e_wsi.cli import main
from e2e_wsi.synth.cohort import synthesize_cohort
from tests.helpers.cli import TINY

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_regression.yaml"


@pytest.fixture(scope="module")
def regression_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("regression")
    manifest = synthesize_cohort(
        root / "cohort", task="regression", num_slides=8, seed=0, size=2048, workers=1
    )
    config = PreprocessConfig(magnifications=(10.0, 5.0), patch_size=64)
    preprocess(jobs_from_manifest(manifest), root / "cache", config, workers=0, qc=False, progress=False)
    return manifest, root / "cache"


@pytest.fixture(scope="module")
def regression_run(regression_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest, cache = regression_cache
    run = tmp_path_factory.mktemp("reg_run") / "run"
    args = ["fit", "--config", str(CONFIG), "--run_dir", str(run), "--data.manifest", str(manifest)]
    assert main([*args, "--data.cache_dir", str(cache), *TINY]) == 0
    assert main(["test", "--config", str(run / "config.yaml"), "--bootstrap", "20"]) == 0
    return run


def test_synthetic_targets_follow_the_lesion_share(regression_cache: tuple[Path, Path]) -> None:
    manifest, _ = regression_cache
    table = pd.read_csv(manifest)
    assert list(table.columns) == ["case_id", "slide_id", "path", "target"]
    info = json.loads((manifest.parent / "synth.json").read_text())
    painted = np.array([s["lesion_fraction"] for s in info["slides"]])
    # The target is the planned lesion percentage; the painted share follows it closely.
    np.testing.assert_allclose(
        table["target"], [100 * s["target_lesion_fraction"] for s in info["slides"]], atol=0.01
    )
    assert np.corrcoef(table["target"], painted)[0, 1] > 0.9


def test_fit_and_test_write_a_regression_report(
    regression_run: Path, regression_cache: tuple[Path, Path]
) -> None:
    manifest, _ = regression_cache
    preds = pd.read_csv(regression_run / "predictions.csv")
    assert list(preds.columns) == ["case_id", "slide_id", "target", "pred"]
    truth = pd.read_csv(manifest).set_index("slide_id")["target"]
    np.testing.assert_allclose(preds["target"], truth.loc[preds["slide_id"]].to_numpy(), rtol=1e-6)
    assert np.isfinite(preds["pred"]).all()
    report = json.loads((regression_run / "metrics.json").read_text())
    assert report["task"] == "regression"
    assert list(report["metrics"]) == ["pearson_r", "spearman_rho", "mae", "r2"]
    assert report["metrics"]["mae"]["point"] == pytest.approx(
        np.mean(np.abs(preds["target"] - preds["pred"]))
    )


def test_predict_and_heatmap_of_a_regression_run(
    regression_run: Path, regression_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, cache = regression_cache
    tested = pd.read_csv(regression_run / "predictions.csv")
    slide_id = str(tested["slide_id"][0])
    out = tmp_path / "out"
    slide = manifest.parent / "slides" / f"{slide_id}.svs"
    assert (
        main(["predict", "--run", str(regression_run), "--slides", str(slide), "--out", str(out), "--quiet"])
        == 0
    )
    frame = pd.read_csv(out / "predictions.csv")
    assert list(frame.columns) == ["slide_id", "pred"]
    assert frame["pred"][0] == pytest.approx(float(tested["pred"][0]), rel=1e-4)  # the cache's patches again
    assert (out / "heatmaps" / f"{slide_id}.png").is_file()
    assert json.loads((out / "summary.json").read_text())["task"] == "regression"
    ckpt = next((regression_run / "checkpoints").glob("*.ckpt"))
    assert main(["heatmap", "--ckpt_path", str(ckpt), "--slide", slide_id, "--cache_dir", str(cache)]) == 0
    assert list((regression_run / "heatmaps").glob(f"{slide_id}*.png"))
