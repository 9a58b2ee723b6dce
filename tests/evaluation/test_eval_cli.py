"""``e2e-wsi evaluate`` run in-process through the top-level dispatcher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e2e_wsi.cli import main


def _predictions(path: Path, seed: int, skill: float, n: int = 60) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    p1 = 1 / (1 + np.exp(-(skill * (2 * labels - 1) + rng.normal(size=n))))
    df = pd.DataFrame(
        {
            "case_id": [f"c{i // 2}" for i in range(n)],
            "slide_id": [f"s{i}" for i in range(n)],
            "label": labels,
            "pred": (p1 > 0.5).astype(int),
            "prob_0": 1 - p1,
            "prob_1": p1,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def test_evaluate_writes_report_next_to_predictions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _predictions(tmp_path / "run" / "predictions.csv", seed=0, skill=1.0)
    assert main(["evaluate", "--predictions", str(path), "--bootstrap", "100", "--seed", "3"]) == 0
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["task"] == "classification" and report["n"] == 60 and report["n_cases"] == 30
    assert report["bootstrap"]["n_resamples"] == 100 and report["bootstrap"]["seed"] == 3
    assert set(report["metrics"]) == {"auroc", "accuracy", "balanced_accuracy", "f1_macro"}
    assert (tmp_path / "run" / "metrics.md").is_file()
    out = capsys.readouterr().out
    assert "auroc" in out and "metrics.json" in out


def test_evaluate_task_and_out_options(tmp_path: Path) -> None:
    path = _predictions(tmp_path / "predictions.csv", seed=1, skill=1.0)
    out = tmp_path / "elsewhere"
    assert (
        main(
            [
                "evaluate",
                "--predictions",
                str(path),
                "--bootstrap",
                "20",
                "--task",
                "grading",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == "grading" and "qwk" in report["metrics"]
    assert not (tmp_path / "metrics.json").exists()


def test_evaluate_reports_bad_input_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _predictions(tmp_path / "predictions.csv", seed=0, skill=1.0)
    df = pd.read_csv(path)
    df.loc[4, "prob_1"] = 0.0
    df.loc[4, "prob_0"] = 0.5
    df.to_csv(path, index=False)
    assert main(["evaluate", "--predictions", str(path)]) == 2
    assert "line 6 sum to 0.5" in capsys.readouterr().err
    assert main(["evaluate", "--predictions", str(tmp_path / "missing.csv")]) == 2


def test_evaluate_compare_writes_paired_difference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _predictions(tmp_path / "a" / "predictions.csv", seed=0, skill=2.5)
    b = _predictions(tmp_path / "b" / "predictions.csv", seed=1, skill=0.2)
    code = main(
        [
            "evaluate",
            "--predictions",
            str(a),
            "--compare",
            str(b),
            "--bootstrap",
            "200",
            "--out",
            str(tmp_path / "cmp"),
        ]
    )
    assert code == 0
    cmp = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert cmp["metric"] == "auroc" and cmp["difference"]["definition"] == "a - b"
    assert cmp["a"]["path"] == str(a) and cmp["b"]["path"] == str(b)
    assert cmp["difference"]["point"] == pytest.approx(cmp["a"]["point"] - cmp["b"]["point"])
    assert cmp["difference"]["ci_low"] > 0 and cmp["difference"]["p_value"] < 0.05
    assert cmp["reports"]["a"]["metrics"]["auroc"]["point"] == pytest.approx(cmp["a"]["point"])
    assert "A - B" in capsys.readouterr().out


def test_evaluate_compare_refuses_different_units(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _predictions(tmp_path / "a.csv", seed=0, skill=1.0, n=60)
    b = _predictions(tmp_path / "b.csv", seed=0, skill=1.0, n=58)
    assert main(["evaluate", "--predictions", str(a), "--compare", str(b), "--bootstrap", "10"]) == 2
    assert "different slide_ids" in capsys.readouterr().err
    assert not (tmp_path / "comparison.json").exists()


@pytest.mark.parametrize("count", ["1e10", "10000000000", "0", "2.5"])
def test_evaluate_refuses_absurd_bootstrap_counts_before_allocating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], count: str
) -> None:
    path = _predictions(tmp_path / "run" / "predictions.csv", seed=0, skill=1.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--predictions", str(path), "--bootstrap", count])
    assert exit_info.value.code == 2
    assert "--bootstrap" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_evaluate_accepts_bootstrap_in_scientific_notation(tmp_path: Path) -> None:
    path = _predictions(tmp_path / "run" / "predictions.csv", seed=0, skill=1.0)
    assert main(["evaluate", "--predictions", str(path), "--bootstrap", "2e2"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bootstrap"]["n_resamples"] == 200


def test_check_resamples_bounds_the_draw_memory() -> None:
    from e2e_wsi.evaluation.bootstrap import MAX_RESAMPLES, check_resamples

    assert check_resamples(MAX_RESAMPLES, n_cases=100) == MAX_RESAMPLES
    with pytest.raises(ValueError, match="GiB of draws"):
        check_resamples(MAX_RESAMPLES, n_cases=10_000)
