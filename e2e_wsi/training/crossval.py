"""K-fold patient-level cross-validation: one ordinary run folder per fold, then pooled out-of-fold results.

``DIR/fold_<k>`` is a normal run folder (``config.yaml``, ``splits.csv``, ``checkpoints/``,
``predictions.csv``, ``metrics.json``) made by ``fit`` then ``test`` through the LightningCLI path, with
``data.fold = k`` and ``data.num_folds = K`` (:func:`e2e_wsi.data.splits.make_splits`: stratified by
label or event, cases never split, fold ``k`` is the test set). A fold with ``metrics.json`` is finished
and skipped on a re-run; a fold with checkpoints but no report resumes from ``last.ckpt``. Then:

``DIR/oof_predictions.csv``  every case's prediction from the fold that held it out (+ ``fold`` column)
``DIR/summary.json|.md``     per-fold metrics, their mean and std, and the pooled out-of-fold report
                             with case-level bootstrap CIs (:func:`e2e_wsi.evaluation.bootstrap.bootstrap_report`)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from e2e_wsi.errors import UserError
from e2e_wsi.evaluation.bootstrap import bootstrap_report
from e2e_wsi.evaluation.report import markdown_table, read_predictions, write_json
from e2e_wsi.runs.folder import CrossvalFolder, RunFolder
from e2e_wsi.tasks import get_task_spec


def fold_folder(root: str | Path, fold: int) -> RunFolder:
    """``DIR/fold_<k>`` (:meth:`CrossvalFolder.fold`)."""
    return CrossvalFolder(root).fold(fold)


def fold_done(run: RunFolder) -> bool:
    """A fold is finished when its test report and predictions exist."""
    return run.predictions.is_file() and run.metrics.is_file()


def fit_args(
    config: str | Path, run: RunFolder, fold: int, folds: int, overrides: Sequence[str]
) -> list[str]:
    """``fit`` arguments of one fold (after the verb): a fresh fit, or a resume from ``last.ckpt``."""
    if run.last_checkpoint() is not None:
        return ["--config", str(run.config), "--run_dir", str(run.root), "--ckpt_path", "last"]
    return [
        "--config", str(config), "--run_dir", str(run.root),
        "--data.fold", str(fold), "--data.num_folds", str(folds), *overrides,
    ]  # fmt: skip


def run_fold(
    config: str | Path, root: str | Path, fold: int, folds: int, overrides: Sequence[str], bootstrap: int
) -> RunFolder:
    """Fit then test one fold in this process (LightningCLI), unless it is finished already.

    Errors of ``fit`` or ``test`` (a bad override, a missing file) propagate unchanged, so the dispatcher
    reports them once and ``--debug`` shows where they came from.
    """
    from e2e_wsi.training.cli import fit_main, test_main

    run = fold_folder(root, fold)
    if fold_done(run):
        print(f"e2e-wsi crossval: fold {fold} finished already ({run.root}); skipped", flush=True)
        return run
    fit_main(fit_args(config, run, fold, folds, overrides))
    ckpt = run.require_checkpoint()
    test_main(["--config", str(run.config), "--run_dir", str(run.root), "--ckpt_path", str(ckpt),
               "--bootstrap", str(bootstrap)])  # fmt: skip
    return run


def pooled_predictions(root: str | Path, folds: int) -> tuple[pd.DataFrame, str]:
    """Concatenate the folds' test predictions (each case held out by exactly one fold).

    Returns:
        (out-of-fold frame with a ``fold`` column, task).

    Raises:
        ValueError: If a case appears in two folds or the folds disagree on the task.
    """
    frames, tasks = [], set()
    for k in range(folds):
        run = fold_folder(root, k)
        task = json.loads(run.metrics.read_text())["task"]
        frame, task = read_predictions(run.predictions, task)
        tasks.add(task)
        frames.append(frame.assign(fold=k))
    if len(tasks) != 1:
        raise ValueError(f"folds of {root} have different tasks: {sorted(tasks)}")
    oof = pd.concat(frames, ignore_index=True)
    unit = get_task_spec(task).unit_column
    dup = oof[unit][oof[unit].duplicated()]
    if not dup.empty:
        raise ValueError(f"{root}: {unit} {sorted(set(dup))[:10]} predicted by two folds; the folds overlap")
    return oof, tasks.pop()


def fold_metrics(root: str | Path, folds: int) -> list[dict[str, Any]]:
    """Point estimates of every fold's test report."""
    rows = []
    for k in range(folds):
        report = json.loads(fold_folder(root, k).metrics.read_text())
        rows.append({"fold": k, "n": report["n"], **{m: v["point"] for m, v in report["metrics"].items()}})
    return rows


def _mean_std(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    names = [k for k in rows[0] if k not in ("fold", "n")]
    out = {}
    for name in names:
        values = np.array([r[name] for r in rows if r[name] is not None and math.isfinite(r[name])])
        out[name] = {
            "mean": float(values.mean()) if len(values) else None,
            "std": float(values.std(ddof=1)) if len(values) > 1 else None,
        }
    return out


def summarize(root: str | Path, folds: int, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write ``oof_predictions.csv``, ``summary.json`` and ``summary.md`` of finished folds.

    Returns:
        The summary: ``task``, ``folds``, ``per_fold`` (points), ``across_folds`` (mean, std) and
        ``pooled`` (the bootstrap report of the out-of-fold predictions).
    """
    folder = CrossvalFolder(root)
    oof, task = pooled_predictions(root, folds)
    tmp = folder.oof_predictions.with_name(f".{folder.oof_predictions.name}.tmp")
    oof.to_csv(tmp, index=False)
    os.replace(tmp, folder.oof_predictions)
    per_fold = fold_metrics(root, folds)
    summary = {
        "task": task,
        "folds": folds,
        "fold_dirs": [str(fold_folder(root, k).root) for k in range(folds)],
        "per_fold": per_fold,
        "across_folds": _mean_std(per_fold),
        "pooled": bootstrap_report(oof.drop(columns="fold"), task, n_resamples=bootstrap, seed=seed),
    }
    write_json(summary, folder.summary_json)
    folder.summary_md.write_text(_markdown(summary))
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    names = list(summary["across_folds"])
    lines = [f"# Cross-validation ({summary['folds']} folds, task {summary['task']})", ""]
    lines += ["| fold | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in summary["per_fold"]:
        lines.append(f"| {r['fold']} | {r['n']} | " + " | ".join(_fmt(r[n]) for n in names) + " |")
    stats = summary["across_folds"]
    lines.append(
        "| mean ± std | | "
        + " | ".join(f"{_fmt(stats[n]['mean'])} ± {_fmt(stats[n]['std'])}" for n in names)
        + " |"
    )
    lines += ["", "## Pooled out-of-fold predictions", "", markdown_table(summary["pooled"])]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def run_crossval(
    config: str | Path,
    folds: int,
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Run (or resume) every fold, then summarise.

    Args:
        config: The ``fit`` config.
        folds: K >= 2.
        run_dir: The cross-validation folder.
        overrides: Extra ``fit`` arguments (e.g. ``--data.manifest m.csv``), given to every fold.
        bootstrap: Bootstrap resamples of the per-fold and pooled reports.
        seed: Bootstrap seed of the pooled report.

    Returns:
        The summary (see :func:`summarize`).
    """
    if folds < 2:
        raise UserError(f"--folds must be >= 2, got {folds}")
    if not Path(config).is_file():
        raise FileNotFoundError(f"config {config} not found")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    for k in range(folds):
        run_fold(config, run_dir, k, folds, overrides, bootstrap)
    return summarize(run_dir, folds, bootstrap, seed)
