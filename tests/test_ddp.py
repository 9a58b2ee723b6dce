"""DDP on CPU (gloo, 2 processes): training runs, and the gathered validation metrics and test
predictions equal a 1-process evaluation of the same checkpoint (no slide dropped or counted twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest


def _cli(*args: str, timeout: int = 600) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "e2e_wsi", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow  # three CLI subprocesses, two of them 2-process gloo DDP
@pytest.mark.timeout(900)
def test_ddp_two_processes_match_single_process(
    synth_cache: tuple[Path, Path], tmp_path: Path, tiny_args
) -> None:
    manifest, cache = synth_cache
    run = tmp_path / "ddp"
    # 4 validation slides, one bag per step, one epoch, two gloo processes on the CPU.
    ddp = ["--data.batch_size", "1", "--data.split_ratios", "[0.25, 0.5, 0.25]", "--trainer.max_epochs", "1",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]  # fmt: skip
    _cli(*tiny_args(manifest, cache, run, *ddp))
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # 4 validation slides over 2 ranks, then the same checkpoint on 1 process.
    validate = ["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)]
    _cli(*validate, "--run_dir", str(run / "v2"), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    _cli(*validate, "--run_dir", str(run / "v1"), "--trainer.devices", "1", "--trainer.strategy", "auto")
    two = json.loads((run / "v2" / "validate_metrics.json").read_text())
    one = json.loads((run / "v1" / "validate_metrics.json").read_text())
    for key in ("val/auroc", "val/accuracy", "val/balanced_accuracy", "val/f1_macro"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    # Test predictions gathered over 2 ranks (SlidePredictionWriter) equal a 1-process test, slide by slide.
    test = ["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--bootstrap", "10"]
    _cli(*test, "--run_dir", str(run / "t2"), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    _cli(*test, "--run_dir", str(run / "t1"), "--trainer.devices", "1", "--trainer.strategy", "auto")
    two_preds = pd.read_csv(run / "t2" / "predictions.csv")
    one_preds = pd.read_csv(run / "t1" / "predictions.csv")
    split = pd.read_csv(run / "t1" / "splits.csv")
    assert sorted(one_preds["slide_id"]) == sorted(split.loc[split["split"] == "test", "slide_id"])
    pd.testing.assert_frame_equal(two_preds, one_preds, atol=1e-6, rtol=0)


def test_eval_shards_are_disjoint_and_never_empty() -> None:
    from e2e_wsi.data.datamodule import PADDING_INDEX, EvalShardSampler, PaddedEvalDataset

    five = list(range(5))
    shards = [list(EvalShardSampler(five, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == five
    one = [{"index": 0, "bag_id": "a"}]
    assert list(EvalShardSampler(one, num_replicas=2, rank=0)) == [0]
    assert list(EvalShardSampler(one, num_replicas=2, rank=1)) == [PADDING_INDEX]
    padded = PaddedEvalDataset(one)
    assert padded[PADDING_INDEX]["index"] == PADDING_INDEX and padded[PADDING_INDEX]["bag_id"] == "a"
    assert padded[0] is one[0]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_with_fewer_evaluation_slides_than_processes(
    synth_cache: tuple[Path, Path], tmp_path: Path, tiny_args
) -> None:
    import pandas as pd

    manifest, cache = synth_cache
    df = pd.read_csv(manifest)
    split = ["val", "test"] + ["train"] * (len(df) - 2)  # one validation slide, one test slide
    split_file = tmp_path / "split.csv"
    pd.DataFrame({"slide_id": df["slide_id"], "case_id": df["case_id"], "split": split}).to_csv(split_file)
    run = tmp_path / "ddp"
    two = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    _cli(*tiny_args(manifest, cache, run, "--data.split_file", str(split_file), "--data.batch_size", "1",
                    "--trainer.max_epochs", "1", *two))  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # The rank without a validation slide ran a padding bag that counts for nothing: the gathered
    # validation loss equals a 1-process evaluation of the same checkpoint.
    validate = ["validate", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)]
    _cli(*validate, "--run_dir", str(run / "v2"), *two)
    _cli(*validate, "--run_dir", str(run / "v1"), "--trainer.devices", "1", "--trainer.strategy", "auto")
    v2 = json.loads((run / "v2" / "validate_metrics.json").read_text())
    v1 = json.loads((run / "v1" / "validate_metrics.json").read_text())
    assert v2["val/loss"] == pytest.approx(v1["val/loss"], abs=1e-6)
    _cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--bootstrap", "10", *two)
    preds = pd.read_csv(run / "predictions.csv")
    assert list(preds["slide_id"]) == [df["slide_id"][1]]  # the one test slide, once
