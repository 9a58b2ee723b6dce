"""A single-class validation split: ``val/auroc`` is NaN (undefined), a warning says so once, and
checkpoint selection ignores the undefined values (issue 12, silent wrong results)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from e2e_wsi.cli import main
from e2e_wsi.evaluation.torch_metrics import ReportMetric
from e2e_wsi.training.callbacks import DefinedMetricCheckpoint, DefinedMetricEarlyStopping


def one_val_slide_split(manifest: Path, path: Path) -> Path:
    """A split file with a single validation slide (so a single class), two test slides, the rest train."""
    df = pd.read_csv(manifest)
    split = ["train"] * len(df)
    split[0] = "val"
    test = [i for i in range(1, len(df)) if df["label"][i] == 0][:1] + [
        i for i in range(1, len(df)) if df["label"][i] == 1
    ][:1]
    for i in test:
        split[i] = "test"
    pd.DataFrame({"slide_id": df["slide_id"], "case_id": df["case_id"], "split": split}).to_csv(
        path, index=False
    )
    return path


def _tensorboard_scalars(run: Path, tag: str) -> list[float]:
    """Every value logged under ``tag`` in the run folder's events files, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return [v for _, v in sorted(values)]


@pytest.fixture(autouse=True)
def _fresh_warning_flag() -> None:
    ReportMetric._warned.clear()


def test_auroc_of_a_single_class_is_nan_and_warns_once() -> None:
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    metric = ReportMetric("classification", "auroc")
    metric.update({"probs": probs}, {"label": torch.tensor([1, 1, 1])})
    with pytest.warns(UserWarning, match="AUROC is undefined"):
        assert torch.isnan(metric.compute())
    # The next epoch (a fresh state) is undefined again but does not warn again; after a DDP sync the
    # list states are single concatenated tensors.
    again = ReportMetric("classification", "auroc")
    again.probs, again.label = probs, torch.tensor([0.0, 0.0, 0.0])
    again._update_count = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isnan(again.compute())
    both = ReportMetric("classification", "auroc")
    both.update({"probs": probs}, {"label": torch.tensor([1, 0, 1])})
    assert float(both.compute()) == pytest.approx(1.0)


def test_checkpoint_and_early_stopping_skip_nan_values(tmp_path: Path) -> None:
    ckpt = DefinedMetricCheckpoint(dirpath=tmp_path, monitor="val/auroc", mode="max", save_top_k=1)
    # Plain ModelCheckpoint saves a NaN while it holds fewer than save_top_k checkpoints.
    assert ModelCheckpoint(monitor="val/auroc", save_top_k=1).check_monitor_top_k(
        None, torch.tensor(float("nan"))
    )
    assert not ckpt.check_monitor_top_k(None, torch.tensor(float("nan")))
    assert ckpt.check_monitor_top_k(None, torch.tensor(0.7))
    assert ckpt.state_key.startswith("ModelCheckpoint{'monitor': 'val/auroc'")
    stop = DefinedMetricEarlyStopping(monitor="val/auroc", mode="max")
    assert stop.state_key.startswith("EarlyStopping{")


def test_single_class_validation_logs_nan_and_selects_no_checkpoint_on_it(
    synth_cache: tuple[Path, Path], tiny_args, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, cache = synth_cache
    split = one_val_slide_split(manifest, tmp_path / "split.csv")
    run = tmp_path / "run"
    # Select on the AUROC (the default selects on the validation loss, which is defined here).
    on_auroc = tmp_path / "on_auroc.yaml"
    on_auroc.write_text(
        "trainer:\n  callbacks:\n    - class_path: e2e_wsi.training.callbacks.BestCheckpoint\n"
        "      init_args: {monitor: val/auroc}\n"
    )
    args = tiny_args(manifest, cache, run, "--config", str(on_auroc), "--data.split_file", str(split))
    with pytest.warns(UserWarning, match="AUROC is undefined") as record:
        assert main(args) == 0
    assert sum("AUROC is undefined" in str(w.message) for w in record) == 1  # once, not per epoch
    ckpts = run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert not list(ckpts.glob("best-*.ckpt"))  # no epoch is "best" on an undefined metric
    aurocs = _tensorboard_scalars(run, "val/auroc")
    assert len(aurocs) == 2 and all(v != v for v in aurocs)  # NaN, not 0.0
    # Evaluation without --ckpt_path then falls back to last.ckpt.
    capsys.readouterr()
    assert main(["test", "--config", str(run / "config.yaml"), "--bootstrap", "10"]) == 0
    assert f"checkpoint {(ckpts / 'last.ckpt').resolve()}" in capsys.readouterr().out
