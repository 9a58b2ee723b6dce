"""`e2e-wsi fit / test / predict / validate` in-process on a real synthetic cohort (CPU, fp32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from e2e_wsi.cli import main
from e2e_wsi.errors import UserError
from e2e_wsi.evaluation.report import read_predictions
from e2e_wsi.models.tasks import ClassificationTask


@pytest.fixture
def fit(tiny_args) -> Callable[..., int]:
    def run_fit(manifest: Path, cache: Path, run: Path, *extra: str, debug: bool = False) -> int:
        return main(["--debug"] * debug + tiny_args(manifest, cache, run, *extra))

    return run_fit


@pytest.fixture
def trained_run(tiny_run: Path) -> Path:
    return tiny_run


def test_fit_fills_the_run_folder(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpts = trained_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and list(ckpts.glob("best-*.ckpt"))
    assert (trained_run / "config.yaml").is_file() and (trained_run / "splits.csv").is_file()
    assert list(trained_run.glob("events.out.tfevents.*"))
    splits = pd.read_csv(trained_run / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"}
    # Checkpoints are plain data: they load with weights_only=True (no pickled objects).
    ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and any(k.startswith("aggregator.") for k in ckpt["state_dict"])
    tags = _tensorboard_tags(trained_run)
    assert {"train/loss_epoch", "val/auroc", "val/accuracy", "val/loss"} <= tags


def _tensorboard_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_resume_from_last_continues_epochs(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(trained_run, run)
    before = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (
        main(
            [
                "fit",
                "--config",
                str(run / "config.yaml"),
                "--run_dir",
                str(run),
                "--ckpt_path",
                "last",
                "--trainer.max_epochs",
                "3",
            ]
        )
        == 0
    )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2  # epochs 0 and 1 came from the first run, epoch 2 from the resume
    assert ckpt["global_step"] == before["global_step"] * 3 // 2  # exactly one more epoch of steps
    # The original run folder is untouched: the resumed run writes into its own folder.
    assert (
        torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == before["global_step"]
    )
    # The resumed run evaluates the split it was trained with.
    assert pd.read_csv(run / "splits.csv").equals(pd.read_csv(trained_run / "splits.csv"))


def test_fresh_fit_refuses_a_used_run_folder(
    trained_run: Path, synth_cache: tuple[Path, Path], fit, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, cache = synth_cache
    assert fit(manifest, cache, trained_run) == 2  # a user error: one line, no traceback
    err = capsys.readouterr().err
    assert "already holds checkpoints" in err and "Traceback" not in err


def test_test_writes_predictions_and_bootstrap_report(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    assert (
        main(
            [
                "test",
                "--config",
                str(trained_run / "config.yaml"),
                "--ckpt_path",
                str(ckpt),
                "--bootstrap",
                "200",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "95% CI" in out and str((trained_run / "metrics.json").resolve()) in out
    df, task = read_predictions(trained_run / "predictions.csv")
    assert task == "classification"
    test_ids = pd.read_csv(trained_run / "splits.csv").query("split == 'test'")["slide_id"]
    assert sorted(df["slide_id"]) == sorted(test_ids)
    assert list(df.columns[:6]) == ["case_id", "slide_id", "label", "pred", "prob_0", "prob_1"]
    assert (df[["prob_0", "prob_1"]].sum(axis=1) - 1).abs().max() < 1e-5
    import json

    report = json.loads((trained_run / "metrics.json").read_text())
    assert report["bootstrap"]["n_resamples"] == 200
    assert set(report["metrics"]) == {"auroc", "accuracy", "balanced_accuracy", "f1_macro"}


def test_predict_writes_attention_per_slide(trained_run: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    # The LightningCLI predict path stays a library function; the `predict` verb runs on raw slides.
    from e2e_wsi.training.cli import predict_main

    assert predict_main(["--config", str(trained_run / "config.yaml"), "--ckpt_path", str(ckpt)]) == 0
    preds = pd.read_csv(trained_run / "predict" / "predictions.csv")
    assert len(preds) == len(pd.read_csv(trained_run / "splits.csv"))
    # The columns of `e2e-wsi predict --run` on new slides (inference/outputs.py): no truth columns.
    assert list(preds.columns) == ["slide_id", "pred", "prob_0", "prob_1"]
    files = sorted((trained_run / "predict" / "attention").glob("*.csv"))
    assert len(files) == len(preds) and not list((trained_run / "predict" / "attention").glob("*.pt"))
    table = pd.read_csv(files[0])
    heads = [f"attention_head_{h}" for h in range(8)]
    assert list(table.columns) == ["x", "y", "size_level0", "magnification", "attention", *heads]
    assert np.allclose(table[heads].sum(axis=0), 1.0, atol=1e-4)  # each head sums to 1 over the patches
    assert table["size_level0"].nunique() == 1 and table["size_level0"].iloc[0] > 0  # from the cache


def test_fit_without_validation_split_selects_on_training_loss(
    synth_cache: tuple[Path, Path], tmp_path: Path, fit
) -> None:
    manifest, cache = synth_cache
    run = tmp_path / "noval"
    with pytest.warns(UserWarning, match="no validation split"):
        assert (
            fit(manifest, cache, run, "--trainer.max_epochs", "1", "--data.split_ratios", "[0.6, 0.0, 0.4]")
            == 0
        )
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    callbacks = {
        k: v for k, v in ckpt["callbacks"].items() if k.startswith("BestCheckpoint")
    }  # not LastCheckpoint
    assert [v["monitor"] for v in callbacks.values()] == ["train/loss_epoch"]


def test_survival_fit_and_test_report_c_index(survival_cache: tuple[Path, Path], tmp_path: Path, fit) -> None:
    manifest, cache = survival_cache
    run = tmp_path / "surv"
    args = [
        "--model.task",
        "e2e_wsi.models.tasks.DiscreteSurvivalTask",
        "--model.task.num_bins",
        "2",
        "--data.task",
        "survival",
        "--data.num_classes",
        "2",
        "--data.split_ratios",
        "[0.6, 0.0, 0.4]",
        "--trainer.max_epochs",
        "1",
    ]
    with pytest.warns(UserWarning, match="no validation split"):
        assert fit(manifest, cache, run, *args) == 0
    assert (
        main(
            [
                "test",
                "--config",
                str(run / "config.yaml"),
                "--ckpt_path",
                str(run / "checkpoints" / "last.ckpt"),
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    df, task = read_predictions(run / "predictions.csv")
    assert task == "survival" and list(df.columns) == ["case_id", "time", "event", "risk"]
    import json

    assert set(json.loads((run / "metrics.json").read_text())["metrics"]) == {"c_index"}


def test_best_checkpoint_follows_the_task_metric(trained_run: Path) -> None:
    # The demo config names no metric: BestCheckpoint takes ClassificationTask.monitor / monitor_mode.
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    best = [v for k, v in ckpt["callbacks"].items() if k.startswith("BestCheckpoint")]
    task = ClassificationTask()
    assert len(best) == 1 and best[0]["monitor"] == task.monitor == "val/loss"
    assert f"'mode': '{task.monitor_mode}'" in next(
        k for k in ckpt["callbacks"] if k.startswith("BestCheckpoint")
    )


def test_data_task_follows_model_task(trained_run: Path) -> None:
    # The saved config states the task once; the datamodule's hyperparameters got it from model.task.
    config = (trained_run / "config.yaml").read_text()
    assert "num_classes: 2" in config and "task: classification" not in config
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["datamodule_hyper_parameters"]["task"] == "classification"
    assert ckpt["datamodule_hyper_parameters"]["num_classes"] == 2


def test_old_data_keys_must_agree_with_model_task(
    synth_cache: tuple[Path, Path], tmp_path: Path, fit
) -> None:
    manifest, cache = synth_cache
    flags = ["--data.num_classes", "2", "--model.task.num_classes", "3"]
    with pytest.raises(UserError, match=r"data.num_classes=2 disagrees with model.task.num_classes=3"):
        fit(manifest, cache, tmp_path / "mismatch", *flags, debug=True)
    with pytest.raises(UserError, match=r"delete data.task"):
        fit(manifest, cache, tmp_path / "mismatch", "--data.task=survival", debug=True)


def test_old_config_with_data_task_keys_still_parses(synth_cache: tuple[Path, Path], tmp_path: Path) -> None:
    from e2e_wsi.training.cli import E2ECLI, SlideModule, WSIDataModule

    manifest, cache = synth_cache
    old = tmp_path / "old.yaml"
    old.write_text(
        "model:\n  task:\n    class_path: e2e_wsi.models.tasks.GradingTask\n    init_args: {num_classes: 6}\n"
        "data:\n  task: grading\n  num_classes: 6\n"
    )
    args = ["--config", str(old), "--data.manifest", str(manifest), "--data.cache_dir", str(cache)]
    args += ["--run_dir", str(tmp_path / "run")]
    cli = E2ECLI(SlideModule, WSIDataModule, args=args, run=False, auto_configure_optimizers=False)
    assert (cli.datamodule.task, cli.datamodule.num_classes) == ("grading", 6)
