"""``predictions.csv`` and the test report: this module owns both file formats.

It builds the predictions frame a run writes (:func:`predictions_frame`), reads and validates one
(:func:`read_predictions`), and writes and formats the bootstrap report.

``predictions.csv`` holds one row per evaluated unit:

* classification / grading (one row per slide): ``case_id,slide_id,label,pred,prob_0,...,prob_{K-1}``
  with class indices in ``[0, K)`` and probabilities summing to 1;
* survival (one row per case): ``case_id,time,event,risk`` with ``event`` in {0, 1} and higher
  ``risk`` = shorter expected survival.

The report written next to it is ``metrics.json`` (layout in :func:`e2e_wsi.evaluation.bootstrap.
bootstrap_report`) and ``metrics.md``, a Markdown table of the same numbers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from e2e_wsi.task_kinds import TASK_KINDS, TaskKind
from e2e_wsi.utils import validate_slide_id

CLASSIFICATION_COLUMNS: tuple[str, ...] = ("case_id", "slide_id", "label", "pred")
SURVIVAL_COLUMNS: tuple[str, ...] = ("case_id", "time", "event", "risk")
# Probabilities written as CSV text with a few decimals still sum to 1 within this.
PROB_SUM_TOLERANCE = 1e-3
_PROB_COLUMN = re.compile(r"prob_(\d+)")


def prediction_columns(preds: Mapping[str, np.ndarray]) -> dict[str, list]:
    """Flatten per-unit predictions into ``predictions.csv`` columns.

    Args:
        preds: ``probs`` [M, K] (classification / grading) or ``risk`` [M] (survival), as arrays.

    Returns:
        ``pred`` (argmax) and ``prob_0 .. prob_{K-1}``, or ``risk``; each a list of M values.
    """
    if "probs" in preds:
        probs = np.asarray(preds["probs"], dtype=np.float64)
        cols: dict[str, list] = {"pred": probs.argmax(-1).tolist()}
        for k in range(probs.shape[-1]):
            cols[f"prob_{k}"] = probs[:, k].tolist()
        return cols
    if "risk" in preds:
        return {"risk": np.asarray(preds["risk"], dtype=np.float64).tolist()}
    raise ValueError(f"predictions hold neither 'probs' nor 'risk' (got {sorted(preds)})")


def predictions_frame(units: pd.DataFrame, kind: TaskKind, preds: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The ``predictions.csv`` frame: per-unit truth joined with predictions by dataset index.

    Args:
        units: One row per evaluated unit, in dataset order, with ``case_id`` and ``slide_id``
            (classification / grading: ``label``; survival: ``time``, ``event``).
        kind: The task kind; survival rows are cases, the others slides.
        preds: ``index`` [M] (positions in ``units``) and ``probs`` [M, K] or ``risk`` [M].

    Returns:
        ``case_id,slide_id,label,pred,prob_0..`` or ``case_id,time,event,risk``, one row per index.
    """
    index = np.asarray(preds["index"], dtype=np.int64)
    rows = units.iloc[index].reset_index(drop=True)
    cols = prediction_columns({k: v for k, v in preds.items() if k != "index"})
    base = rows[list(SURVIVAL_COLUMNS[:3])] if kind == "survival" else rows[list(CLASSIFICATION_COLUMNS[:3])]
    return pd.concat([base, pd.DataFrame(cols)], axis=1)


def write_predictions(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a ``predictions.csv`` atomically (a temp file renamed into place) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)
    return path


def attention_table(
    coords: np.ndarray, size_level0: np.ndarray, magnification: np.ndarray, attention: np.ndarray
) -> pd.DataFrame:
    """``attention/<id>.csv``, written by both ``predict`` routes: one row per patch.

    Args:
        coords: [N, 2] level-0 (x, y) of each patch's top-left corner.
        size_level0: [N] side of each patch in level-0 pixels (NaN when unknown, e.g. foreign features).
        magnification: [N] magnification of each patch.
        attention: [H, N] attention per head (or [N]).

    Returns:
        Columns ``x, y, size_level0, magnification, attention`` (mean over heads), ``attention_head_<h>``.
    """
    heads = np.atleast_2d(np.asarray(attention, dtype=np.float64))
    coords = np.asarray(coords).reshape(-1, 2)
    frame = pd.DataFrame(
        {
            "x": coords[:, 0],
            "y": coords[:, 1],
            "size_level0": np.asarray(size_level0),
            "magnification": np.asarray(magnification),
            "attention": heads.mean(axis=0),
        }
    )
    for h, values in enumerate(heads):
        frame[f"attention_head_{h}"] = values
    return frame


def unlabelled(frame: pd.DataFrame) -> pd.DataFrame:
    """A ``predictions.csv`` frame without its truth columns: what ``predict`` writes (no labels needed).

    The unit's id (``slide_id``; ``case_id`` for survival bags, which are cases) and the prediction
    columns of :func:`prediction_columns` stay.
    """
    unit = "case_id" if "risk" in frame.columns else "slide_id"
    truth = {"case_id", "slide_id", "label", "time", "event"} - {unit}
    return frame.drop(columns=[c for c in frame.columns if c in truth])


def prob_columns(df: pd.DataFrame, source: str = "predictions") -> list[str]:
    """Return ``prob_0 .. prob_{K-1}`` of a classification frame, in class order.

    Args:
        df: Predictions frame.
        source: Name of the file or frame, used in error messages.

    Returns:
        The probability column names, ``K >= 2`` of them.

    Raises:
        ValueError: If there are fewer than two or the indices are not ``0 .. K-1``.
    """
    indices = sorted(int(m.group(1)) for c in df.columns if (m := _PROB_COLUMN.fullmatch(str(c))))
    if len(indices) < 2 or indices != list(range(len(indices))):
        found = [str(c) for c in df.columns if str(c).startswith("prob_")]
        raise ValueError(
            f"{source}: expected probability columns prob_0 .. prob_{{K-1}} with K >= 2, found {found}; "
            "write one column per class in the config's class order"
        )
    return [f"prob_{k}" for k in indices]


def num_classes(df: pd.DataFrame) -> int:
    """Number of classes ``K`` of a classification / grading frame (its prob columns)."""
    return len(prob_columns(df))


def _row(df: pd.DataFrame, mask: np.ndarray | pd.Series) -> int:
    """1-based CSV line of the first flagged row (line 1 is the header)."""
    return int(np.flatnonzero(np.asarray(mask))[0]) + 2


def _require(df: pd.DataFrame, columns: tuple[str, ...] | list[str], source: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {list(map(str, df.columns))}")
    for col in columns:
        bad = df[col].isna().to_numpy()
        if bad.any():
            raise ValueError(f"{source}: empty or NaN value in column {col!r} at line {_row(df, bad)}")


def _as_numbers(df: pd.DataFrame, col: str, source: str, integer: bool) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if integer:
        bad |= np.isfinite(values) & (values != np.round(values))
    if bad.any():
        kind = "an integer" if integer else "a finite number"
        line = _row(df, bad)
        raise ValueError(
            f"{source}: column {col!r} at line {line} is {df[col].iloc[line - 2]!r}, expected {kind}"
        )
    return values


def _check_ids(df: pd.DataFrame, col: str, source: str) -> None:
    for i, value in enumerate(df[col]):
        try:
            validate_slide_id(value)
        except ValueError as err:
            raise ValueError(f"{source}: column {col!r} at line {i + 2}: {err}") from None


def _check_unique(df: pd.DataFrame, col: str, source: str) -> None:
    dup = df[col].duplicated().to_numpy()
    if dup.any():
        line = _row(df, dup)
        raise ValueError(
            f"{source}: {col} {df[col].iloc[line - 2]!r} appears twice (line {line}); one row per unit"
        )


def _validate_classification(df: pd.DataFrame, source: str) -> pd.DataFrame:
    probs = prob_columns(df, source)
    _require(df, [*CLASSIFICATION_COLUMNS, *probs], source)
    out = df[[*CLASSIFICATION_COLUMNS, *probs]].copy()
    for col in ("case_id", "slide_id"):
        out[col] = out[col].astype(str)
        _check_ids(out, col, source)
    _check_unique(out, "slide_id", source)
    k = len(probs)
    for col in ("label", "pred"):
        values = _as_numbers(out, col, source, integer=True)
        bad = (values < 0) | (values >= k)
        if bad.any():
            line = _row(out, bad)
            raise ValueError(
                f"{source}: {col} {int(values[line - 2])} at line {line} is outside [0, {k - 1}] (K = {k} prob columns)"
            )
        out[col] = values.astype(np.int64)
    matrix = np.stack([_as_numbers(out, c, source, integer=False) for c in probs], axis=1)
    bad = ((matrix < -PROB_SUM_TOLERANCE) | (matrix > 1 + PROB_SUM_TOLERANCE)).any(axis=1)
    if bad.any():
        raise ValueError(f"{source}: probabilities at line {_row(out, bad)} are outside [0, 1]")
    sums = matrix.sum(axis=1)
    bad = np.abs(sums - 1.0) > PROB_SUM_TOLERANCE
    if bad.any():
        line = _row(out, bad)
        raise ValueError(
            f"{source}: probabilities at line {line} sum to {sums[line - 2]:.6f}, not 1 (tolerance "
            f"{PROB_SUM_TOLERANCE}); write softmax outputs, not logits"
        )
    out[probs] = matrix
    return out.reset_index(drop=True)


def _validate_survival(df: pd.DataFrame, source: str) -> pd.DataFrame:
    _require(df, SURVIVAL_COLUMNS, source)
    out = df[list(SURVIVAL_COLUMNS)].copy()
    out["case_id"] = out["case_id"].astype(str)
    _check_ids(out, "case_id", source)
    _check_unique(out, "case_id", source)
    out["time"] = _as_numbers(out, "time", source, integer=False)
    if (out["time"] < 0).any():
        raise ValueError(f"{source}: negative time at line {_row(out, out['time'] < 0)}")
    event = _as_numbers(out, "event", source, integer=True)
    bad = (event != 0) & (event != 1)
    if bad.any():
        raise ValueError(
            f"{source}: event at line {_row(out, bad)} is {event[bad][0]:g}; use 1 = event, 0 = censored"
        )
    out["event"] = event.astype(np.int64)
    out["risk"] = _as_numbers(out, "risk", source, integer=False)
    return out.reset_index(drop=True)


def validate_predictions(df: pd.DataFrame, task: str, source: str = "predictions") -> pd.DataFrame:
    """Check a predictions frame for ``task`` and return a clean copy with typed columns.

    Args:
        df: Frame in the ``predictions.csv`` layout.
        task: ``classification``, ``grading`` or ``survival``.
        source: File or frame name for error messages.

    Returns:
        A new frame with the layout's columns only: ids as ``str``, labels / preds / events as
        ``int64``, the rest as ``float64``.

    Raises:
        ValueError: Naming the column and CSV line of the first problem (missing column, NaN,
            label outside ``[0, K)``, probabilities not summing to 1, duplicate unit, bad id).
    """
    if task not in TASK_KINDS:
        raise ValueError(f"unknown task {task!r}; use one of {list(TASK_KINDS)}")
    if len(df) == 0:
        raise ValueError(f"{source}: no rows to evaluate")
    if task == "survival":
        return _validate_survival(df, source)
    if set(SURVIVAL_COLUMNS[1:]) <= set(map(str, df.columns)) and "label" not in df.columns:
        raise ValueError(
            f"{source}: holds survival columns (time, event, risk) but task {task!r} was asked for"
        )
    return _validate_classification(df, source)


def _sidecar_task(path: Path) -> str | None:
    sidecar = path.parent / "metrics.json"
    if not sidecar.is_file():
        return None
    try:
        task = json.loads(sidecar.read_text()).get("task")
    except (json.JSONDecodeError, AttributeError, OSError):
        return None
    return task if task in TASK_KINDS else None


def read_predictions(path: str | Path, task: str | None = None) -> tuple[pd.DataFrame, TaskKind]:
    """Read and validate a ``predictions.csv`` and work out its task.

    The task is, in order: ``task`` if given; survival if the file has ``time``, ``event`` and
    ``risk``; the ``task`` of a ``metrics.json`` in the same folder; else classification (grading
    and classification files have the same columns).

    Args:
        path: The CSV file.
        task: Explicit task, or ``None`` to infer it.

    Returns:
        ``(frame, task)`` with the frame as :func:`validate_predictions` returns it.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file cannot be parsed or fails validation (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"case_id": str, "slide_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable CSV ({err})") from None
    if task is None:
        if set(SURVIVAL_COLUMNS[1:]) <= set(df.columns):
            task = "survival"
        else:
            task = _sidecar_task(path) or "classification"
    return validate_predictions(df, task, source=str(path)), task  # type: ignore[return-value]


def _json_ready(value: Any) -> Any:
    """Replace NaN / inf by ``None`` and numpy scalars by Python ones, recursively."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    level = round(100 * float(report["bootstrap"].get("ci", 0.95)))
    header = ["metric", "point", "mean", "std", f"{level}% CI", "n_valid"]
    rows = []
    for name, m in report["metrics"].items():
        ci = f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
        rows.append(
            [
                name,
                _fmt(m["point"]),
                _fmt(m["mean"]),
                _fmt(m["std"]),
                ci,
                f"{m['n_valid']}/{report['bootstrap']['n_resamples']}",
            ]
        )
    return header, rows


def _caption(report: dict[str, Any]) -> str:
    b = report["bootstrap"]
    return (
        f"task {report['task']}, n = {report['n']} ({report.get('n_cases', report['n'])} cases); "
        f"{b['n_resamples']} bootstrap resamples of {b.get('unit', 'case')}s, seed {b['seed']}, percentile CI"
    )


def markdown_table(report: dict[str, Any]) -> str:
    """The report as a Markdown table (metric | point | mean | std | CI | n_valid) with a caption."""
    header, rows = _rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([_caption(report), "", *lines]) + "\n"


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned plain-text table for the terminal."""
    header, rows = _rows(report)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines = [line.rstrip() for line in [*lines, *(fmt.format(*r) for r in rows)]]
    return "\n".join([_caption(report), *lines])


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write ``data`` as indented JSON (NaN as ``null``) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_ready(data), indent=2, allow_nan=False) + "\n")
    return path


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` into ``out_dir``.

    Returns:
        ``(json_path, md_path)``.
    """
    out_dir = Path(out_dir)
    json_path = write_json(report, out_dir / "metrics.json")
    md_path = out_dir / "metrics.md"
    md_path.write_text(markdown_table(report))
    return json_path, md_path
