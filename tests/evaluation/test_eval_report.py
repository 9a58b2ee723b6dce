"""predictions.csv validation and the metrics.json / metrics.md report files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from e2e_wsi.evaluation.bootstrap import bootstrap_report
from e2e_wsi.evaluation.report import (
    format_table,
    predictions_frame,
    read_predictions,
    validate_predictions,
    write_predictions,
    write_report,
)


def _frame(n: int = 12, k: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(k), n)
    labels = np.arange(n) % k
    df = pd.DataFrame(
        {
            "case_id": [f"c{i // 2}" for i in range(n)],
            "slide_id": [f"s{i}" for i in range(n)],
            "label": labels,
            "pred": probs.argmax(1),
        }
    )
    for j in range(k):
        df[f"prob_{j}"] = probs[:, j]
    return df


def _write(df: pd.DataFrame, path: Path) -> Path:
    df.to_csv(path, index=False)
    return path


def test_read_classification_and_default_task(tmp_path: Path) -> None:
    df, task = read_predictions(_write(_frame(), tmp_path / "predictions.csv"))
    assert task == "classification"
    assert list(df.columns) == ["case_id", "slide_id", "label", "pred", "prob_0", "prob_1", "prob_2"]
    assert df["label"].dtype == np.int64 and df["case_id"].iloc[0] == "c0"


def test_numeric_looking_ids_stay_strings(tmp_path: Path) -> None:
    raw = _frame().assign(case_id=[f"{i // 2:03d}" for i in range(12)])
    df, _ = read_predictions(_write(raw, tmp_path / "p.csv"))
    assert df["case_id"].iloc[0] == "000"


def test_task_inference(tmp_path: Path) -> None:
    surv = pd.DataFrame({"case_id": ["a", "b"], "time": [1.0, 2.0], "event": [1, 0], "risk": [0.3, 0.1]})
    assert read_predictions(_write(surv, tmp_path / "surv.csv"))[1] == "survival"
    run = tmp_path / "run"
    run.mkdir()
    path = _write(_frame(), run / "predictions.csv")
    (run / "metrics.json").write_text(json.dumps({"task": "grading"}))
    assert read_predictions(path)[1] == "grading"
    assert read_predictions(path, task="classification")[1] == "classification"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.drop(columns="pred"), r"missing column\(s\) \['pred'\]"),
        (lambda d: d.drop(columns="prob_1"), "prob_0 .. prob_"),
        (lambda d: d.assign(prob_0=d["prob_0"] + 0.1), "line 2 sum to 1.1"),
        (lambda d: d.assign(label=[0] * 5 + [3] + [0] * 6), r"label 3 at line 7 is outside \[0, 2\]"),
        (lambda d: d.assign(pred=[0] * 11 + [-1]), "pred -1 at line 13"),
        (lambda d: d.assign(label=[0.5] + [0] * 11), "'label' at line 2 .* expected an integer"),
        (
            lambda d: d.assign(prob_2=[np.nan] + list(d["prob_2"][1:])),
            "NaN value in column 'prob_2' at line 2",
        ),
        (lambda d: d.assign(slide_id=["s0"] * 12), "slide_id 's0' appears twice"),
        (
            lambda d: d.assign(slide_id=["../x"] + [f"s{i}" for i in range(1, 12)]),
            "'slide_id' at line 2: invalid slide id",
        ),
    ],
)
def test_bad_classification_files_name_the_problem(tmp_path: Path, edit, message: str) -> None:
    path = _write(edit(_frame()), tmp_path / "predictions.csv")
    with pytest.raises(ValueError, match=message) as err:
        read_predictions(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("column", "values", "message"),
    [
        ("event", [1, 2, 0], "event at line 3 is 2"),
        ("time", [1.0, -2.0, 3.0], "negative time at line 3"),
        ("risk", [0.1, "high", 0.2], "'risk' at line 3 is 'high'"),
        ("case_id", ["a", "a", "b"], "case_id 'a' appears twice"),
    ],
)
def test_bad_survival_files_name_the_problem(tmp_path: Path, column: str, values: list, message: str) -> None:
    df = pd.DataFrame(
        {"case_id": ["a", "b", "c"], "time": [1.0, 2.0, 3.0], "event": [1, 0, 1], "risk": [0.3, 0.1, 0.2]}
    )
    df[column] = values
    with pytest.raises(ValueError, match=message):
        read_predictions(_write(df, tmp_path / "p.csv"))


def test_survival_file_read_as_classification_is_refused() -> None:
    surv = pd.DataFrame({"case_id": ["a"], "time": [1.0], "event": [1], "risk": [0.3]})
    with pytest.raises(ValueError, match="survival columns"):
        validate_predictions(surv, "grading")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_predictions(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="not a readable CSV"):
        read_predictions(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("case_id,slide_id,label,pred,prob_0,prob_1\n")
    with pytest.raises(ValueError, match="no rows"):
        read_predictions(tmp_path / "header.csv")


def test_write_report_json_and_markdown(tmp_path: Path) -> None:
    df = _frame(40, k=2, seed=1)
    df.loc[:, "label"] = 0
    df.loc[5, "label"] = 1  # one positive slide: some resamples undefined for AUROC
    report = bootstrap_report(df, "classification", n_resamples=50, seed=0)
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json_path.name == "metrics.json" and md_path.name == "metrics.md"
    loaded = json.loads(json_path.read_text())
    assert loaded["metrics"]["auroc"]["n_valid"] == report["metrics"]["auroc"]["n_valid"] < 50
    assert loaded["metrics"]["accuracy"]["point"] == pytest.approx(report["metrics"]["accuracy"]["point"])
    md = md_path.read_text().splitlines()
    assert "| metric | point | mean | std | 95% CI | n_valid |" in md
    acc = report["metrics"]["accuracy"]
    row = next(line for line in md if line.startswith("| accuracy |"))
    assert f"{acc['point']:.4f}" in row and f"[{acc['ci_low']:.4f}, {acc['ci_high']:.4f}]" in row
    text = format_table(report)
    assert all(name in text for name in report["metrics"]) and "50 bootstrap resamples" in text


def test_undefined_values_are_null_in_json(tmp_path: Path) -> None:
    surv = pd.DataFrame({"case_id": ["a", "b"], "time": [1.0, 2.0], "event": [0, 0], "risk": [0.3, 0.1]})
    json_path, md_path = write_report(bootstrap_report(surv, "survival", n_resamples=5), tmp_path)
    m = json.loads(json_path.read_text())["metrics"]["c_index"]
    assert m["point"] is None and m["ci_low"] is None and m["n_valid"] == 0
    assert "n/a" in md_path.read_text()


def test_predictions_frame_joins_truth_by_dataset_index(tmp_path: Path) -> None:
    units = pd.DataFrame(
        {"case_id": ["c0", "c1", "c2"], "slide_id": ["s0", "s1", "s2"], "label": [0, 1, 1], "line": [2, 3, 4]}
    )
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    frame = predictions_frame(units, "classification", {"index": np.array([2, 0]), "probs": probs})
    assert list(frame.columns) == ["case_id", "slide_id", "label", "pred", "prob_0", "prob_1"]
    assert frame["slide_id"].tolist() == ["s2", "s0"] and frame["pred"].tolist() == [1, 0]
    path = write_predictions(frame, tmp_path / "run" / "predictions.csv")
    back, task = read_predictions(path)
    assert task == "classification" and back["prob_1"].tolist() == pytest.approx([0.8, 0.1])
    assert [p.name for p in path.parent.iterdir()] == ["predictions.csv"]  # no temp file left behind


def test_predictions_frame_survival_rows_are_cases() -> None:
    units = pd.DataFrame(
        {"case_id": ["a", "b"], "slide_id": ["a-s0", "b-s0"], "time": [3.0, 9.5], "event": [1, 0]}
    )
    frame = predictions_frame(units, "survival", {"index": np.array([0, 1]), "risk": np.array([0.7, -0.2])})
    assert list(frame.columns) == ["case_id", "time", "event", "risk"]
    validate_predictions(frame, "survival")
    with pytest.raises(ValueError, match="survival predictions need 'risk'"):
        predictions_frame(units, "survival", {"index": np.array([0])})
