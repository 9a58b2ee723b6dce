"""`make demo`: synthesize -> preprocess -> fit -> test -> heatmaps on a small synthetic cohort (CPU).

Every stage is restartable: a stage whose output is complete is skipped, preprocessing resumes slide by
slide, and training resumes from ``last.ckpt``. Re-running after an interruption reuses what is done.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd

from e2e_wsi.cli import main as cli
from e2e_wsi.runs.folder import LAST_CHECKPOINT, RunFolder

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
    p.add_argument(
        "--overlap", type=float, default=0.875, help="patch overlap of the heatmaps (0 = the cache's grid)"
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    cohort, cache, run_dir = out / "cohort", out / "cache", out / "run"
    folder = RunFolder(run_dir)
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
    if folder.last_checkpoint() is not None:
        fit += ["--ckpt_path", "last"]
    run(fit)
    done(t0, "training")

    t0 = stage("test (bootstrap report)")
    ckpt = folder.checkpoint(LAST_CHECKPOINT)
    best = folder.best_checkpoints()
    ckpt = best[-1] if best else ckpt
    run(
        [
            "test",
            "--config",
            str(folder.config),
            "--ckpt_path",
            str(ckpt),
            "--run_dir",
            str(run_dir),
        ]
    )
    done(t0, "test")

    t0 = stage("heatmaps")
    splits = pd.read_csv(folder.splits)
    test_ids = splits.loc[splits["split"] == "test", "slide_id"].tolist()[: args.heatmaps]
    # The synthetic cohort's lesion masks are the ground truth of the localisation scores.
    heatmap = ["heatmap", "--ckpt_path", str(ckpt), "--slide", *test_ids, "--mask_dir", str(cohort / "masks")]
    run(heatmap + (["--overlap", str(args.overlap)] if args.overlap > 0 else []))
    done(t0, "heatmaps")

    report = json.loads(folder.metrics.read_text())
    auroc = report["metrics"]["auroc"]
    locs = [json.loads(p.read_text()) for p in sorted(folder.heatmaps_dir.glob("*.localization.json"))]
    loc_aucs = [_localisation_text(loc) for loc in locs]
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
    print(f"heatmaps:     {folder.heatmaps_dir.resolve()}")
    print(f"lesion localisation AUROC of attention: {', '.join(loc_aucs) or 'n/a'}")
    print_outputs(out)
    return 0


def _localisation_text(loc: dict) -> str:
    """``slide: pixel 0.93, patch 0.90`` (AUROCs to 2 digits; ``n/a`` when undefined)."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    pixel = f"pixel {fmt(loc['pixel_auroc'])}, " if "pixel_auroc" in loc else ""
    return f"{loc['slide_id']}: {pixel}patch {fmt(loc['auroc'])}"


# What each file the demo writes is, by pattern relative to the demo folder; the first match wins.
OUTPUTS: list[tuple[str, str]] = [
    ("cohort/manifest.csv", "slide list: case_id, slide_id, path, label"),
    ("cohort/synth.json", "settings the synthetic cohort was drawn with"),
    ("cohort/slides/*", "synthetic slides: Aperio-like pyramidal TIFFs, 40x (open in QuPath)"),
    ("cohort/masks/*.png", "ground truth at 1/16 scale: 0 background, 128 tissue, 255 lesion"),
    ("cache/*.lmdb/data.mdb", "patch cache: LMDB of JPEG patches at 10x and 5x, with their coordinates"),
    ("cache/*.lmdb/lock.mdb", "LMDB lock file of the patch cache"),
    ("cache/.*.lock", "lock file of the cache (one preprocess writes a shard at a time)"),
    ("cache/summary*.json", "preprocessing summary: patches per slide, reasons for failed slides"),
    ("cache/qc/*.png", "tissue-detection QC: tissue outline and kept 10x patches per slide"),
    ("run/config.yaml", "complete training config (resume: e2e-wsi fit --config it --ckpt_path last)"),
    ("run/config.*.yaml", "config of a later stage (e.g. `test`) as the CLI saved it"),
    ("run/hparams.yaml", "hyper-parameters as Lightning recorded them"),
    ("run/splits.csv", "train/val/test split of the slides"),
    (
        "run/checkpoints/best*.ckpt",
        "checkpoint with the lowest validation loss (the task's selection metric)",
    ),
    ("run/checkpoints/last.ckpt", "last checkpoint (resume point)"),
    ("run/*events.out.tfevents.*", "TensorBoard logs: losses, metrics, learning rate"),
    ("run/preprocess.json", "tiling parameters of the training cache (predict tiles new slides alike)"),
    ("run/timings.json", "wall and CPU seconds of each demo stage"),
    ("run/predictions.csv", "test-set prediction per slide"),
    ("run/metrics.json", "test metrics with bootstrap 95% CIs (machine-readable)"),
    ("run/metrics.md", "test metrics with bootstrap 95% CIs (report)"),
    (
        "run/heatmaps/*.overlay.tif",
        "attention over the tissue, pyramidal TIFF: zoom in with QuPath/OpenSlide",
    ),
    ("run/heatmaps/*.localization.json", "how well attention finds the lesions (pixel and patch AUROC)"),
    ("run/heatmaps/*.png", "heatmap figure: smooth attention map, top patches, prediction caption"),
]


def describe_outputs(out: Path, max_listed: int = 3) -> list[tuple[str, str]]:
    """Every file under ``out`` with one line on what it is.

    Files of a kind with more than ``max_listed`` members are shown as one line (pattern and count);
    a file no pattern describes is still listed, as "other output".

    Returns:
        (path or pattern relative to ``out``, description) rows, in :data:`OUTPUTS` order.
    """
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    groups: dict[int, list[str]] = {}
    others = []
    for name in files:
        kind = next((i for i, (pattern, _) in enumerate(OUTPUTS) if fnmatch(name, pattern)), None)
        if kind is None:
            others.append(name)
        else:
            groups.setdefault(kind, []).append(name)
    rows = []
    for kind in sorted(groups):
        pattern, what = OUTPUTS[kind]
        names = groups[kind]
        if len(names) > max_listed:
            rows.append((f"{pattern} ({len(names)} files)", what))
        else:
            rows += [(name, what) for name in names]
    return rows + [(name, "other output") for name in others]


def print_outputs(out: Path) -> None:
    """Print :func:`describe_outputs` as an aligned list."""
    rows = describe_outputs(out)
    width = min(60, max((len(name) for name, _ in rows), default=0))
    print(f"\nfiles written under {out.resolve()}:")
    for name, what in rows:
        print(f"  {name:<{width}}  {what}")


if __name__ == "__main__":
    raise SystemExit(main())
