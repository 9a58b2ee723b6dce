"""`make demo`: synthesize -> preprocess -> fit -> test -> heatmaps on a small synthetic cohort (CPU).

Every stage is restartable: a stage whose output is complete is skipped, preprocessing resumes slide by
slide, and training resumes from ``last.ckpt``. Re-running after an interruption reuses what is done.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import pandas as pd

from e2e_wsi.cli import main as cli

CONFIG = "configs/demo_subtype.yaml"


TIMINGS: dict[str, dict[str, float]] = {}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system), in seconds."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def stage(name: str) -> tuple[float, float]:
    print(f"\n=== demo: {name} ===", flush=True)
    return time.perf_counter(), cpu_seconds()


def done(t0: tuple[float, float], what: str) -> None:
    # CPU seconds next to wall seconds: on a shared machine the wall time includes other jobs' turns,
    # the CPU time does not (it is what the stage costs; divide by the cores it used for an idle wall time).
    wall, cpu = time.perf_counter() - t0[0], cpu_seconds() - t0[1]
    TIMINGS[what] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    print(f"=== demo: {what} in {wall:.0f} s ({cpu:.0f} CPU s) ===", flush=True)


def run(args: list[str]) -> None:
    status = cli(args)
    if status != 0:
        raise SystemExit(f"demo: `e2e-wsi {' '.join(args)}` failed with status {status}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo", help="demo folder (cohort, cache, run)")
    p.add_argument("--num-slides", type=int, default=72)
    p.add_argument("--size", type=int, default=6144, help="slide side in level-0 pixels")
    p.add_argument("--lesion-fraction", type=float, default=0.06, help="share of tissue covered by lesions")
    p.add_argument("--max-epochs", type=int, default=None, help="override the config's epochs")
    p.add_argument("--heatmaps", type=int, default=3, help="test slides to draw")
    args = p.parse_args(argv)
    out = Path(args.out)
    cohort, cache, run_dir = out / "cohort", out / "cache", out / "run"
    start = time.perf_counter()

    t0 = stage("synthesize cohort")
    if (cohort / "manifest.csv").is_file():
        print(f"reusing {cohort}")
    else:
        run(
            [
                "synth",
                "--task",
                "subtype",
                "--num-slides",
                str(args.num_slides),
                "--seed",
                "0",
                "--size",
                str(args.size),
                "--lesion-fraction",
                str(args.lesion_fraction),
                "--out",
                str(cohort),
            ]
        )
    done(t0, "cohort")

    t0 = stage("preprocess (10x and 5x, resumable)")
    run(
        [
            "preprocess",
            "--manifest",
            str(cohort / "manifest.csv"),
            "--out",
            str(cache),
            "--magnifications",
            "10",
            "5",
            "--workers",
            "2",
        ]
    )
    done(t0, "cache")

    t0 = stage("fit (ResNet-18 to layer3 + ABMILX, random init, CPU fp32)")
    fit = [
        "fit",
        "--config",
        CONFIG,
        "--run_dir",
        str(run_dir),
        "--data.manifest",
        str(cohort / "manifest.csv"),
        "--data.cache_dir",
        str(cache),
    ]
    if args.max_epochs is not None:
        fit += ["--trainer.max_epochs", str(args.max_epochs)]
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        fit += ["--ckpt_path", "last"]
    run(fit)
    done(t0, "training")

    t0 = stage("test (bootstrap report)")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    best = sorted((run_dir / "checkpoints").glob("best*.ckpt"))
    ckpt = best[-1] if best else ckpt
    run(
        [
            "test",
            "--config",
            str(run_dir / "config.yaml"),
            "--ckpt_path",
            str(ckpt),
            "--run_dir",
            str(run_dir),
        ]
    )
    done(t0, "test")

    t0 = stage("heatmaps")
    splits = pd.read_csv(run_dir / "splits.csv")
    test_ids = splits.loc[splits["split"] == "test", "slide_id"].tolist()[: args.heatmaps]
    run(["heatmap", "--ckpt_path", str(ckpt), "--slide", *test_ids])
    done(t0, "heatmaps")

    report = json.loads((run_dir / "metrics.json").read_text())
    auroc = report["metrics"]["auroc"]
    locs = [json.loads(p.read_text()) for p in sorted((run_dir / "heatmaps").glob("*.localization.json"))]
    loc_aucs = [f"{loc['slide_id']}: {loc['auroc']:.3f}" for loc in locs if loc["auroc"] is not None]
    TIMINGS["total"] = {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu_seconds(), 1)}
    (run_dir / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
    print(f"\n=== demo finished in {time.perf_counter() - start:.0f} s ===")
    print(f"run folder:   {run_dir.resolve()}")
    print(f"tensorboard:  tensorboard --logdir {run_dir.resolve()}")
    print(f"report:       {(run_dir / 'metrics.md').resolve()}")
    print(
        f"test AUROC:   {auroc['point']:.3f} (bootstrap mean {auroc['mean']:.3f}, "
        f"95% CI {auroc['ci_low']:.3f}-{auroc['ci_high']:.3f})"
    )
    print(f"heatmaps:     {(run_dir / 'heatmaps').resolve()}")
    print(f"lesion localisation AUROC of attention: {', '.join(loc_aucs) or 'n/a'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
