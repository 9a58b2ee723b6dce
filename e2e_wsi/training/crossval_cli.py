"""``e2e-wsi crossval --config C --folds K --run_dir DIR [fit overrides]``: thin CLI over :mod:`.crossval`."""

from __future__ import annotations

from e2e_wsi.cli_common import ArgumentParser
from e2e_wsi.training.crossval import run_crossval


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi crossval`` command line; arguments it does not know go to every fold's ``fit``."""
    p = ArgumentParser(
        prog="e2e-wsi crossval",
        description="K patient-level stratified folds, each a run folder DIR/fold_k (fit then test); "
        "finished folds are skipped on a re-run. Other arguments go to `e2e-wsi fit`.",
    )
    p.add_argument("--config", required=True, help="fit config (YAML)")
    p.add_argument("--folds", type=int, required=True, help="number of folds K >= 2")
    p.add_argument("--run_dir", required=True, help="cross-validation folder")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the reports")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``e2e-wsi crossval``; unknown arguments are passed to every fold's ``fit``."""
    args, overrides = build_parser().parse_known_args(argv)
    summary = run_crossval(args.config, args.folds, args.run_dir, overrides, bootstrap=args.bootstrap)
    pooled = ", ".join(
        f"{k} {v['point']:.4f} [{v['ci_low']:.4f}, {v['ci_high']:.4f}]"
        for k, v in summary["pooled"]["metrics"].items()
        if v["point"] is not None and v["ci_low"] == v["ci_low"]
    )
    print(f"e2e-wsi: crossval {args.run_dir}: pooled out-of-fold {pooled}")
    print(f"e2e-wsi: summary {args.run_dir}/summary.json and summary.md", flush=True)
    return 0
