"""The many-patch benchmark's bookkeeping: the settings guard and the per-run mechanism scalars (issue 23)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import replicate_many_patch as driver  # noqa: E402
from replicate_many_patch_summary import run_measures  # noqa: E402


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    driver.check_settings(driver.parse(["--out", str(tmp_path), "--max_epochs", "8"]))
    recorded = json.loads((tmp_path / "benchmark.json").read_text())
    assert recorded["max_epochs"] == 8
    driver.check_settings(
        driver.parse(["--out", str(tmp_path), "--max_epochs", "8", "--seeds", "5"])
    )  # seeds may grow
    with pytest.raises(SystemExit, match=r"--max_epochs 32 \(folder: 8\)"):
        driver.check_settings(driver.parse(["--out", str(tmp_path)]))  # the default schedule is 32 epochs


def _row(grad: float, share: float, loss: float) -> dict:
    return {"train": {"grad_share_lesion": grad, "share_lesion": share, "loss": loss}}


def test_run_measures_are_ratios_to_the_lesion_share() -> None:
    result = {
        "epochs": [_row(0.02, 0.04, 0.9), _row(0.12, 0.02, 0.3)],  # enrichment 0.5 then 6.0
        "final_probe": {"att_on_lesion": 0.10, "share_lesion": 0.04},
    }
    m = run_measures(result)
    assert m["grad_enrichment"] == pytest.approx(3.25)  # the epoch mean of the ratios (ratio of means: 2.33)
    assert m["log_grad_enrichment"] == pytest.approx(1.178655, abs=1e-6)  # ln 3.25
    assert m["att_enrichment"] == pytest.approx(2.5)
    assert m["final_train_loss"] == pytest.approx(0.3)
    # a two-stage run has no per-epoch rows
    assert run_measures({"auroc": 1.0}) == {
        "grad_enrichment": None,
        "log_grad_enrichment": None,
        "att_enrichment": None,
        "final_train_loss": None,
    }
