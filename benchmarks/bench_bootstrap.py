"""Time the vectorised case-level bootstrap: R resamples on n cases, for each task.

Usage::

    .venv/bin/python benchmarks/bench_bootstrap.py [--cases 1000] [--resamples 1000] [--repeats 3]

Prints one line per configuration with the best wall time of ``--repeats`` runs of
``bootstrap_report`` (all the task's metrics), and, for reference, the time of a per-resample loop
with lifelines (survival) extrapolated from a few resamples.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np
import pandas as pd
from lifelines.utils import concordance_index

from e2e_wsi.evaluation.bootstrap import bootstrap_report, draw_cases, paired_comparison


def classification_frame(n_cases: int, k: int, slides: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, k, n_cases), slides)
    logits = rng.normal(size=(len(labels), k)) + 1.5 * np.eye(k)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    df = pd.DataFrame(
        {
            "case_id": np.repeat([f"c{i}" for i in range(n_cases)], slides),
            "slide_id": [f"s{i}" for i in range(len(labels))],
            "label": labels,
            "pred": probs.argmax(1),
        }
    )
    for j in range(k):
        df[f"prob_{j}"] = probs[:, j]
    return df


def survival_frame(n_cases: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n_cases)
    return pd.DataFrame(
        {
            "case_id": [f"c{i}" for i in range(n_cases)],
            "time": np.round(rng.exponential(10 * np.exp(-risk)), 1) + 0.1,
            "event": rng.integers(0, 2, n_cases),
            "risk": risk + rng.normal(scale=0.7, size=n_cases),
        }
    )


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def loop_reference(df: pd.DataFrame, resamples: int, probe: int = 20) -> float:
    """Seconds for ``resamples`` lifelines calls, one per resample, extrapolated from ``probe``."""
    t, e, r = (df[c].to_numpy() for c in ("time", "event", "risk"))
    draws = draw_cases(len(df), probe, 0)
    start = time.perf_counter()
    for idx in draws:
        concordance_index(t[idx], -r[idx], e[idx])
    return (time.perf_counter() - start) * resamples / probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, r = args.cases, args.resamples
    configs: list[tuple[str, str, pd.DataFrame]] = [
        ("classification K=2, 1 slide/case", "classification", classification_frame(n, 2, 1)),
        ("classification K=4, 1 slide/case", "classification", classification_frame(n, 4, 1)),
        ("classification K=2, 2 slides/case", "classification", classification_frame(n, 2, 2)),
        ("grading K=6, 1 slide/case", "grading", classification_frame(n, 6, 1)),
        ("survival", "survival", survival_frame(n)),
    ]
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    print(f"{r} resamples, {n} cases, best of {args.repeats}")
    for label, task, df in configs:
        seconds = best_of(lambda df=df, task=task: bootstrap_report(df, task, n_resamples=r), args.repeats)
        print(f"  bootstrap_report  {label:<36} {seconds:7.2f} s  ({len(df)} rows)")
    surv = configs[-1][2]
    other = surv.assign(risk=surv["risk"] + np.random.default_rng(1).normal(size=len(surv)))
    seconds = best_of(lambda: paired_comparison(surv, other, "survival", n_resamples=r), args.repeats)
    print(f"  paired_comparison {'survival (2 runs)':<36} {seconds:7.2f} s")
    print(
        f"  reference: lifelines loop, one call per resample (extrapolated) {loop_reference(surv, r):7.2f} s"
    )


if __name__ == "__main__":
    main()
