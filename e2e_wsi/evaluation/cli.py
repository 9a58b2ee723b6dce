"""``e2e-wsi evaluate``: bootstrap report from a saved ``predictions.csv``, or compare two runs.

Examples::

    e2e-wsi evaluate --predictions runs/a/predictions.csv --bootstrap 1000
    e2e-wsi evaluate --predictions runs/a/predictions.csv --compare runs/b/predictions.csv --out cmp/
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from e2e_wsi.cli_common import ArgumentParser
from e2e_wsi.evaluation.bootstrap import (
    MAIN_METRIC,
    MAX_RESAMPLES,
    bootstrap_report,
    check_resamples,
    paired_comparison,
)
from e2e_wsi.evaluation.report import format_table, read_predictions, write_json, write_report
from e2e_wsi.tasks import task_kinds


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi evaluate`` command line."""
    parser = ArgumentParser(
        prog="e2e-wsi evaluate",
        description=(
            "Recompute the bootstrap report (metrics.json, metrics.md) of a predictions.csv, "
            "optionally side by side with a second run and the paired bootstrap difference of the "
            f"main metric ({', '.join(f'{t}: {m}' for t, m in MAIN_METRIC.items())})."
        ),
    )
    parser.add_argument("--predictions", required=True, type=Path, help="predictions.csv of run A")
    parser.add_argument(
        "--compare", type=Path, default=None, help="predictions.csv of run B to compare with A"
    )
    parser.add_argument(
        "--bootstrap",
        type=resample_count,
        default=1000,
        help=f"number of case-level resamples, 1 to {MAX_RESAMPLES:,} (default 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="resampling seed (default 0)")
    parser.add_argument("--ci", type=float, default=0.95, help="percentile interval coverage (default 0.95)")
    parser.add_argument(
        "--task",
        choices=task_kinds(),
        default=None,
        help="task of the file; default: survival if it has time/event/risk, regression if it has "
        "target/pred, else the task of a "
        "metrics.json next to it, else classification (grading files look the same: pass --task grading)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the folder of --predictions)"
    )
    return parser


def resample_count(text: str) -> int:
    """argparse type of ``--bootstrap``: a whole number (``1e4`` allowed) within :data:`MAX_RESAMPLES`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be a whole number of resamples, got {text!r}")
    try:
        return check_resamples(int(value))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _row(label: str, s: dict[str, Any]) -> str:
    def f(v: float | None) -> str:
        return "n/a" if v is None or v != v else f"{v:.4f}"

    return f"{label:<12} {f(s['point']):>8} {f(s['mean']):>8} {f(s['std']):>8}  [{f(s['ci_low'])}, {f(s['ci_high'])}]  {s['n_valid']}"


def format_comparison(comparison: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """Plain-text summary of :func:`paired_comparison`'s result."""
    d = comparison["difference"]
    level = round(100 * comparison["bootstrap"]["ci"])
    lines = [
        f"paired bootstrap of {comparison['metric']} ({comparison['task']}, {comparison['n']} units, "
        f"{comparison['n_cases']} cases, {comparison['bootstrap']['n_resamples']} resamples, seed "
        f"{comparison['bootstrap']['seed']})",
        f"A = {name_a}",
        f"B = {name_b}",
        f"{'':<12} {'point':>8} {'mean':>8} {'std':>8}  {level}% CI  n_valid",
        _row("A", comparison["a"]),
        _row("B", comparison["b"]),
        _row("A - B", d),
        f"share of resamples with A - B <= 0: {d['share_le_0']:.4f}; two-sided bootstrap p = {d['p_value']:.4f}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``e2e-wsi evaluate``.

    Args:
        argv: Arguments after the verb; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success.

    Raises:
        ValueError: Bad input, e.g. an unreadable predictions file (the dispatcher prints it, exit 2).
    """
    args = build_parser().parse_args(argv)
    df_a, task = read_predictions(args.predictions, args.task)
    check_resamples(args.bootstrap, df_a["case_id"].nunique())
    out_dir = args.out or args.predictions.parent
    report = bootstrap_report(df_a, task, n_resamples=args.bootstrap, seed=args.seed, ci=args.ci)
    if args.compare is None:
        json_path, md_path = write_report(report, out_dir)
        print(format_table(report))
        print(f"wrote {json_path}\nwrote {md_path}")
        return 0
    df_b, _ = read_predictions(args.compare, task)
    report_b = bootstrap_report(df_b, task, n_resamples=args.bootstrap, seed=args.seed, ci=args.ci)
    comparison = paired_comparison(df_a, df_b, task, n_resamples=args.bootstrap, seed=args.seed, ci=args.ci)
    comparison["a"]["path"], comparison["b"]["path"] = str(args.predictions), str(args.compare)
    comparison["reports"] = {"a": report, "b": report_b}
    path = write_json(comparison, Path(out_dir) / "comparison.json")
    print(f"A: {args.predictions}\n{format_table(report)}\n")
    print(f"B: {args.compare}\n{format_table(report_b)}\n")
    print(format_comparison(comparison, str(args.predictions), str(args.compare)))
    print(f"wrote {path}")
    return 0
