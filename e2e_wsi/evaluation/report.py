"""``predictions.csv`` and the test report: this module owns both file formats.

It builds the predictions frame a run writes (:func:`predictions_frame`), reads and validates one
(:func:`read_predictions`), and writes and formats the bootstrap report.

``predictions.csv`` holds one row per evaluated unit:

* classification / grading (one row per slide): ``case_id,slide_id,label,pred,prob_0,...,prob_{K-1}``
  with class indices in ``[0, K)`` and probabilities summing to 1;
* survival (one row per case): ``case_id,time,event,risk`` with ``event`` in {0, 1} and higher
  ``risk`` = shorter expected survival;
* regression (one row per slide): ``case_id,slide_id,target,pred``.

Each layout and its checks belong to the task's spec (:mod:`e2e_wsi.tasks`); this module dispatches.

The report written next to it is ``metrics.json`` (layout in :func:`e2e_wsi.evaluation.bootstrap.
bootstrap_report`) and ``metrics.md``, a Markdown table of the same numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from e2e_wsi.tasks import get_task_spec, spec_of_predictions, task_specs
from e2e_wsi.tasks.classification import PROB_SUM_TOLERANCE, prob_columns

__all__ = [
    "PROB_SUM_TOLERANCE",
    "format_table",
    "markdown_table",
    "num_classes",
    "prediction_columns",
    "predictions_frame",
    "prob_columns",
    "read_predictions",
    "validate_predictions",
    "write_json",
    "write_predictions",
    "write_report",
]


def prediction_columns(preds: Mapping[str, np.ndarray], kind: str | None = None) -> dict[str, list]:
    """Flatten per-unit predictions into ``predictions.csv`` columns (the task spec's layout).

    Args:
        preds: The task's predictions as arrays (``probs`` [M, K], ``risk`` [M], ``pred`` [M], ...).
        kind: The task kind; ``None`` picks the first spec whose prediction keys ``preds`` holds.

    Returns:
        The prediction columns, each a list of M values.
    """
    spec = spec_of_predictions(preds) if kind is None else get_task_spec(kind)
    return spec.prediction_columns(preds)


def predictions_frame(units: pd.DataFrame, kind: str, preds: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The ``predictions.csv`` frame: per-unit truth joined with predictions by dataset index.

    Args:
        units: One row per evaluated unit, in dataset order, with ``case_id``, ``slide_id`` and the
            task's truth columns (:meth:`e2e_wsi.data.datamodule.WSIDataModule.eval_frame`).
        kind: The task kind.
        preds: ``index`` [M] (positions in ``units``) and the task's predictions.

    Returns:
        The spec's id and truth columns, then its prediction columns, one row per index.
    """
    spec = get_task_spec(kind)
    index = np.asarray(preds["index"], dtype=np.int64)
    rows = units.iloc[index].reset_index(drop=True)
    cols = spec.prediction_columns({k: v for k, v in preds.items() if k != "index"})
    base = rows[[*spec.id_columns, *spec.truth_columns]]
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


def unlabelled(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    """A ``predictions.csv`` frame without its truth columns: what ``predict`` writes (no labels needed).

    The unit's id (``slide_id``; ``case_id`` for tasks whose units are cases, e.g. survival) and the
    task spec's prediction columns stay, as in ``predict --run`` (:mod:`e2e_wsi.inference.outputs`).
    """
    spec = get_task_spec(kind)
    drop = {*spec.id_columns[:-1], *spec.truth_columns}
    return frame.drop(columns=[c for c in frame.columns if c in drop])


def num_classes(df: pd.DataFrame) -> int:
    """Number of classes ``K`` of a classification / grading frame (its prob columns)."""
    return len(prob_columns(df))


def validate_predictions(df: pd.DataFrame, task: str, source: str = "predictions") -> pd.DataFrame:
    """Check a predictions frame for ``task`` and return a clean copy with typed columns.

    Args:
        df: Frame in the ``predictions.csv`` layout.
        task: A registered task kind.
        source: File or frame name for error messages.

    Returns:
        A new frame with the layout's columns only: ids as ``str``, labels / preds / events as
        ``int64``, the rest as ``float64``.

    Raises:
        ValueError: Naming the column and CSV line of the first problem (missing column, NaN,
            label outside ``[0, K)``, probabilities not summing to 1, duplicate unit, bad id), or a
            file that holds another task kind's columns.
    """
    spec = get_task_spec(task)
    if len(df) == 0:
        raise ValueError(f"{source}: no rows to evaluate")
    columns = set(map(str, df.columns))
    if not set(spec.truth_columns) <= columns:
        for other in task_specs().values():
            if other.kind != spec.kind and other.recognises(columns):
                raise ValueError(
                    f"{source}: holds {other.kind} columns ({', '.join(other.truth_columns)}) but task "
                    f"{task!r} was asked for"
                )
    return spec.validate_predictions(df, source)


def _sidecar_task(path: Path) -> str | None:
    sidecar = path.parent / "metrics.json"
    if not sidecar.is_file():
        return None
    try:
        task = json.loads(sidecar.read_text()).get("task")
    except (json.JSONDecodeError, AttributeError, OSError):
        return None
    return task if task in task_specs() else None


def read_predictions(path: str | Path, task: str | None = None) -> tuple[pd.DataFrame, str]:
    """Read and validate a ``predictions.csv`` and work out its task.

    The task is, in order: ``task`` if given; the kind whose columns the file surely has (survival:
    ``time``, ``event``, ``risk``; regression: ``target``, ``pred``); the ``task`` of a
    ``metrics.json`` in the same folder; else classification (grading and classification files have
    the same columns).

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
        columns = set(map(str, df.columns))
        surely = [s.kind for s in task_specs().values() if s.recognises(columns)]
        task = surely[0] if surely else (_sidecar_task(path) or "classification")
    return validate_predictions(df, task, source=str(path)), task


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
