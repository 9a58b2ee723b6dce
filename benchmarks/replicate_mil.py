"""Miniature replication of the paper's aggregator comparison in end-to-end training (issue 7).

The paper (Table 3 bottom, Table 5) reports that in E2E training plain ABMIL's very sparse attention
hurts the encoder and that ABMILX (multi-head local attention + attention plus) fixes it (BRCA
subtyping: ABMIL 89.23 vs ABMILX 93.97 AUC). This script repeats the comparison in miniature on a
synthetic two-class subtyping cohort with sparse lesions and many patches per slide:

1. ``e2e-wsi synth`` writes the cohort (skipped when ``OUT/cohort/manifest.csv`` exists);
2. ``e2e-wsi preprocess`` caches it once at 10x and 5x (resumable);
3. for every aggregator and seed, ``e2e-wsi fit`` then ``e2e-wsi test`` on ``last.ckpt`` (same encoder,
   budget and split; ``seed_everything`` and the MRIS seed are the training seed, the split seed is
   fixed, so runs with the same seed are paired across aggregators). Each run is a subprocess (one
   torch thread) and is skipped when its ``result.json`` exists, so the benchmark is restartable;
4. for every test slide, the attention of the trained model over all its 10x patches (the heatmap API)
   gives the attention sparsity and the lesion localisation AUROC against the cohort's masks.

Prints two tables (AUROC; attention and training), one row per aggregator, and writes
``OUT/summary.json`` and ``OUT/summary.md``.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/replicate_mil.py --out /tmp/replicate

``--regime many-patch`` runs the TCGA-like regime instead (issue 23, ``replicate_many_patch.py``: thousands
of patches per slide, MRIS samples 256, per-epoch mechanism measurements, two-stage arms).

``--ablation`` runs the attention-plus ablation instead (issue 11): the same ABMILX module with alpha
fixed at 0 (``alpha0``) versus learnable (``alpha_learn``). Both arms of a seed start from one shared
initial state (``benchmarks/replicate_init.py``: the first run saves its state, the other loads it and
keeps only its own alpha; dropout is re-seeded at the start of training), so the per-seed difference
is a true pairing. It reports paired differences (learnable - fixed) with a bootstrap CI over seeds,
and how far alpha moved.

    nice -n 5 .venv/bin/python benchmarks/replicate_mil.py --ablation --out /tmp/ablation \
        --num-slides 40 --size 6144 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from e2e_wsi.runs.folder import LAST_CHECKPOINT, RunFolder

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "replicate_configs"
AGGREGATORS = {
    "abmilx": "ABMILX (MHLA + A+)",
    "mhla": "ABMILX w/o A+ (MHLA only)",
    "abmil": "ABMIL",
    "transmil": "TransMIL",
    "meanpool": "Mean pooling",
}
ABLATION = {"alpha0": "ABMILX, alpha fixed at 0", "alpha_learn": "ABMILX, learnable alpha"}
NAMES = {**AGGREGATORS, **ABLATION}
MASS = 0.9  # sparsity: smallest share of patches holding this share of the attention mass


def cli(args: list[str]) -> None:
    """Run an ``e2e-wsi`` verb in-process; a non-zero status stops the benchmark."""
    from e2e_wsi.cli import main

    status = main(args)
    if status != 0:
        raise SystemExit(f"replicate: `e2e-wsi {' '.join(args)}` failed with status {status}")


def top_mass_share(att: np.ndarray, mass: float = MASS) -> float:
    """Smallest share of patches whose attention sums to ``mass`` of the total.

    Args:
        att: [N] non-negative attention of one slide (one head or merged).
        mass: Target share of the attention mass.

    Returns:
        k / N for the smallest k with top-k sum >= mass * total (1/N = one patch holds it all; ``mass``
        = uniform attention).
    """
    w = np.sort(np.asarray(att, dtype=np.float64))[::-1]
    cum = np.cumsum(w) / max(w.sum(), 1e-12)
    k = int(np.searchsorted(cum, mass - 1e-9) + 1)
    return min(k, len(w)) / len(w)


def analyse_attention(run_dir: Path, ckpt: Path, test_ids: list[str], masks_dir: Path) -> dict:
    """Sparsity and localisation of a trained model's attention over every 10x patch of the test slides.

    Returns:
        Means over test slides: ``top90_head`` (per-head sparsity averaged over heads), ``top90_merged``
        (of the head-averaged attention), ``loc_auroc`` (head-averaged attention vs patch lesion labels,
        slides with both kinds of patch), ``att_on_lesion`` and ``lesion_share`` (its chance level),
        plus ``per_slide`` rows.
    """
    import torch
    from PIL import Image

    from e2e_wsi.cache.store import PatchCache
    from e2e_wsi.inference.attention import slide_attention
    from e2e_wsi.runs import load_run
    from e2e_wsi.utils import validate_slide_id
    from e2e_wsi.viz.heatmap import localization_summary, patch_lesion_labels

    loaded = load_run(ckpt)
    model, data_cfg = loaded.model, loaded.data
    cache = PatchCache(data_cfg["cache_dir"])
    main_mag = [float(data_cfg["magnifications"][0])]
    rows = []
    with torch.inference_mode():
        for slide_id in test_ids:
            att, _ = slide_attention(model, cache, slide_id, main_mag, int(data_cfg["eval_patch_size"]))
            truth = np.asarray(Image.open(masks_dir / f"{validate_slide_id(slide_id)}.png").convert("L"))
            labels = patch_lesion_labels(att.coords, att.size_level0, truth, att.dimensions)
            loc = localization_summary(att, labels)
            rows.append(
                {
                    "slide_id": slide_id,
                    "n_patches": loc["n_patches"],
                    "n_lesion_patches": loc["n_lesion_patches"],
                    "top90_head": float(np.mean([top_mass_share(a) for a in att.attention])),
                    "top90_merged": top_mass_share(att.merged),
                    "loc_auroc": loc["auroc"],
                    "att_on_lesion": loc["attention_on_lesion"],
                    "lesion_share": loc["lesion_share"],
                }
            )
    aucs = [r["loc_auroc"] for r in rows if r["loc_auroc"] is not None]
    return {
        "top90_head": float(np.mean([r["top90_head"] for r in rows])),
        "top90_merged": float(np.mean([r["top90_merged"] for r in rows])),
        "loc_auroc": float(np.mean(aucs)) if aucs else None,
        "loc_slides": len(aucs),
        "att_on_lesion": float(np.mean([r["att_on_lesion"] for r in rows])),
        "lesion_share": float(np.mean([r["lesion_share"] for r in rows])),
        "mean_patches": float(np.mean([r["n_patches"] for r in rows])),
        "per_slide": rows,
    }


def run_one(out: Path, agg: str, seed: int, overrides: list[str]) -> dict:
    """fit -> test -> attention analysis of one (aggregator, seed); writes ``RUN/result.json``."""
    import pandas as pd
    import torch

    torch.set_num_threads(1)
    run_dir = out / "runs" / f"{agg}_s{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    data = ["--data.manifest", str(out / "cohort" / "manifest.csv"), "--data.cache_dir", str(out / "cache")]
    run = RunFolder(run_dir)
    ckpt = run.checkpoint(LAST_CHECKPOINT)
    t0 = time.perf_counter()
    if not (run_dir / "fit.done").is_file():
        fit = [
            "fit",
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(CONFIGS / f"{agg}.yaml"),
            "--seed_everything",
            str(seed),
            "--data.seed",
            str(seed),
            "--run_dir",
            str(run_dir),
            *data,
            *overrides,
        ]
        if ckpt.is_file():
            fit += ["--ckpt_path", "last"]  # resume an interrupted run
        cli(fit)
        (run_dir / "fit.done").write_text("")
    fit_s = time.perf_counter() - t0
    cli(
        [
            "test",
            "--config",
            str(test_config(run, out / "test_configs" / f"{agg}_s{seed}.yaml")),
            "--ckpt_path",
            str(ckpt),
            "--run_dir",
            str(run_dir),
            "--bootstrap",
            "1000",
        ]
    )
    report = json.loads(run.metrics.read_text())
    splits = pd.read_csv(run.splits)
    test_ids = splits.loc[splits["split"] == "test", "slide_id"].tolist()
    attention = analyse_attention(run_dir, ckpt, test_ids, out / "cohort" / "masks")
    from e2e_wsi.runs.checkpoints import STATE_DICT, load_checkpoint

    state = load_checkpoint(ckpt)[STATE_DICT]
    init = json.loads((run_dir / "init.json").read_text()) if (run_dir / "init.json").is_file() else {}
    result = {
        "aggregator": agg,
        "seed": seed,
        "auroc": report["metrics"]["auroc"],
        "nll": test_nll(run_dir),
        "alpha_final": float(state["aggregator.alpha"]) if "aggregator.alpha" in state else None,
        "alpha_init": init.get("kept", {}).get("aggregator.alpha"),
        "init_digest": init.get("digest_without_keep"),
        "fit_s": fit_s,
        "total_s": time.perf_counter() - t0,
        **attention,
    }
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def prepare(args: argparse.Namespace) -> None:
    """Synthesize and preprocess the cohort once (both steps skip or resume what is done)."""
    out = Path(args.out)
    cohort = out / "cohort"
    if not (cohort / "manifest.csv").is_file():
        cli(
            [
                "synth",
                "--task",
                "subtype",
                "--num-slides",
                str(args.num_slides),
                "--seed",
                str(args.cohort_seed),
                "--size",
                str(args.size),
                "--lesion-fraction",
                str(args.lesion_fraction),
                "--workers",
                "2",
                "--out",
                str(cohort),
            ]
        )
    cli(
        [
            "preprocess",
            "--manifest",
            str(cohort / "manifest.csv"),
            "--out",
            str(out / "cache"),
            "--magnifications",
            "10",
            "5",
            "--patch-size",
            str(args.patch_size),
            "--workers",
            "2",
            "--quiet",
        ]
    )


def launch(args: argparse.Namespace, agg: str, seed: int) -> subprocess.Popen:
    """Start one run as a niced, single-threaded subprocess logging to ``OUT/logs``."""
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--out",
        args.out,
        "--one",
        f"{agg}:{seed}",
        "--max-epochs",
        str(args.max_epochs),
        "--sample-size",
        str(args.sample_size),
        "--input-size",
        str(args.input_size),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(log_dir / f"{agg}_s{seed}.log", "a")  # noqa: SIM115 - closed when the process ends
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def test_config(run: RunFolder, path: Path) -> Path:
    """The run's config for ``test``, without this benchmark's own fit-time callback (``SharedInit``).

    ``test`` accepts only allow-listed classes in its configs (docs/security.md); ``SharedInit`` lives in
    ``benchmarks/`` and matters only while fitting, so the benchmark drops it from the copy it tests with.
    """
    import yaml

    config = yaml.safe_load(run.config.read_text())
    callbacks = config.get("trainer", {}).get("callbacks") or []
    config["trainer"]["callbacks"] = [
        c for c in callbacks if c.get("class_path") != "replicate_init.SharedInit"
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_nll(run_dir: Path) -> float:
    """Mean cross-entropy of the test predictions (``predictions.csv``); unlike AUROC it does not saturate."""
    import pandas as pd

    frame = pd.read_csv(RunFolder(run_dir).predictions)
    p_true = frame.apply(lambda row: row[f"prob_{int(row['label'])}"], axis=1).to_numpy(dtype=np.float64)
    return float(-np.log(np.clip(p_true, 1e-7, 1.0)).mean())


def train_curve(run_dir: Path) -> dict[str, list[float]]:
    """Per-epoch ``train/loss_epoch`` and ``train/auroc`` from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    return {
        tag: [float(e.value) for e in events.Scalars(tag)] if tag in tags else []
        for tag in ("train/loss_epoch", "train/auroc")
    }


def _aggregate_runs(out: Path, agg: str, runs: list[dict]) -> dict:
    """Means over seeds of one aggregator's finished runs."""
    aucs = np.array([r["auroc"]["point"] for r in runs])
    locs = [r["loc_auroc"] for r in runs if r["loc_auroc"] is not None]
    curves = [train_curve(out / "runs" / f"{agg}_s{r['seed']}") for r in runs]
    reach = [next((i + 1 for i, a in enumerate(c["train/auroc"]) if a >= 0.9), None) for c in curves]
    return {
        "name": NAMES[agg],
        "seeds": [r["seed"] for r in runs],
        "auroc_per_seed": aucs.round(4).tolist(),
        "auroc_mean": float(aucs.mean()),
        "auroc_sd": float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0,
        "nll_per_seed": [round(test_nll(out / "runs" / f"{agg}_s{r['seed']}"), 4) for r in runs],
        "top90_head": float(np.mean([r["top90_head"] for r in runs])),
        "top90_merged": float(np.mean([r["top90_merged"] for r in runs])),
        "loc_auroc": float(np.mean(locs)) if locs else None,
        "att_on_lesion": float(np.mean([r["att_on_lesion"] for r in runs])),
        "lesion_share": float(np.mean([r["lesion_share"] for r in runs])),
        "mean_patches": float(np.mean([r["mean_patches"] for r in runs])),
        "fit_min": float(np.mean([r["fit_s"] for r in runs]) / 60),
        "train_loss_curves": [[round(v, 4) for v in c["train/loss_epoch"]] for c in curves],
        "mean_train_loss": float(
            np.mean([np.mean(c["train/loss_epoch"]) for c in curves if c["train/loss_epoch"]])
        ),
        "epoch_train_auroc_0.9": reach,
    }


def summarise(out: Path, aggs: list[str], seeds: list[int]) -> dict:
    """Collect every finished run into per-aggregator means and spreads; write summary.json/.md."""
    table: dict[str, dict] = {}
    for agg in aggs:
        paths = [out / "runs" / f"{agg}_s{s}" / "result.json" for s in seeds]
        runs = [json.loads(p.read_text()) for p in paths if p.is_file()]
        if runs:
            table[agg] = _aggregate_runs(out, agg, runs)
    ref = table.get("abmilx", {})
    ref_auc = dict(zip(ref.get("seeds", []), ref.get("auroc_per_seed", []), strict=True))
    for t in table.values():
        # Paired by seed: same split, initialisation seed and MRIS draws, only the aggregator differs.
        diffs = [a - ref_auc[s] for s, a in zip(t["seeds"], t["auroc_per_seed"], strict=True) if s in ref_auc]
        t["delta_vs_abmilx"] = float(np.mean(diffs)) if diffs else None
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = [
        "| aggregator | test AUROC mean ± sd | per seed | paired Δ AUROC (this − ABMILX) | test NLL per seed |",
        "|---|---|---|---|---|",
    ]
    for t in table.values():
        delta = "n/a" if t["delta_vs_abmilx"] is None else f"{t['delta_vs_abmilx']:+.3f}"
        lines.append(
            f"| {t['name']} | {t['auroc_mean']:.3f} ± {t['auroc_sd']:.3f} | "
            f"{', '.join(f'{a:.3f}' for a in t['auroc_per_seed'])} | {delta} | "
            f"{', '.join(f'{v:.3f}' for v in t['nll_per_seed'])} |"
        )
    lines += [
        "",
        "| aggregator | top-90% patch share (per head / merged) | localisation AUROC "
        "| attention on lesion (chance) | mean train loss | epoch train AUROC >= 0.9 | fit min/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in table.values():
        loc = "n/a" if t["loc_auroc"] is None else f"{t['loc_auroc']:.3f}"
        reach = ", ".join("-" if e is None else str(e) for e in t["epoch_train_auroc_0.9"])
        lines.append(
            f"| {t['name']} | {100 * t['top90_head']:.1f}% / {100 * t['top90_merged']:.1f}% | {loc} | "
            f"{100 * t['att_on_lesion']:.1f}% ({100 * t['lesion_share']:.1f}%) | {t['mean_train_loss']:.3f} | "
            f"{reach} | {t['fit_min']:.1f} |"
        )
    text = "\n".join(lines)
    (out / "summary.md").write_text(text + "\n")
    print(text, flush=True)
    return table


def seed_bootstrap(diffs: np.ndarray, n_resamples: int = 10000, seed: int = 0) -> dict:
    """Mean paired difference over seeds with a percentile bootstrap CI over seeds.

    Args:
        diffs: [S] per-seed differences (learnable - fixed); NaN entries are dropped.
        n_resamples: Bootstrap resamples of the seeds.
        seed: Resampling seed.

    Returns:
        :func:`e2e_wsi.evaluation.bootstrap.summarize` of the mean difference, plus ``per_seed``.
    """
    from e2e_wsi.evaluation.bootstrap import draw_cases, summarize

    d = np.asarray([x for x in diffs if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(d) == 0:
        return {"point": float("nan"), "per_seed": []}
    draws = draw_cases(len(d), n_resamples, seed)  # [R, S] seed indices drawn with replacement
    return {**summarize(float(d.mean()), d[draws].mean(axis=1)), "per_seed": d.round(4).tolist()}


def summarise_ablation(out: Path, seeds: list[int]) -> dict:
    """Paired (same seed, same initial weights) differences learnable-alpha minus alpha-0."""
    import pandas as pd

    from e2e_wsi.evaluation.bootstrap import paired_comparison

    rows = []
    for s in seeds:
        paths = {a: out / "runs" / f"{a}_s{s}" / "result.json" for a in ABLATION}
        if not all(p.is_file() for p in paths.values()):
            continue
        fixed, learn = (json.loads(paths[a].read_text()) for a in ("alpha0", "alpha_learn"))
        preds = {a: pd.read_csv(RunFolder(out / "runs" / f"{a}_s{s}").predictions) for a in ABLATION}
        case = paired_comparison(preds["alpha_learn"], preds["alpha0"], "classification", n_resamples=1000)
        rows.append(
            {
                "seed": s,
                "paired_init": fixed["init_digest"] is not None
                and fixed["init_digest"] == learn["init_digest"],
                "auroc_fixed": fixed["auroc"]["point"],
                "auroc_learn": learn["auroc"]["point"],
                "nll_fixed": fixed["nll"],
                "nll_learn": learn["nll"],
                "loc_fixed": fixed["loc_auroc"],
                "loc_learn": learn["loc_auroc"],
                "alpha_init": learn["alpha_init"],
                "alpha_final": learn["alpha_final"],
                "alpha_fixed_final": fixed["alpha_final"],
                "case_bootstrap_auroc_diff": case["difference"],
            }
        )
    diff = {
        key: seed_bootstrap(
            np.array(
                [
                    r[f"{key}_learn"] - r[f"{key}_fixed"]
                    for r in rows
                    if r[f"{key}_learn"] is not None and r[f"{key}_fixed"] is not None
                ]
            )
        )
        for key in ("auroc", "nll", "loc")
    }
    moved = [abs(r["alpha_final"] - r["alpha_init"]) for r in rows if r["alpha_init"] is not None]
    table = {"rows": rows, "paired_differences_learn_minus_fixed": diff, "alpha_abs_change": moved}
    (out / "ablation.json").write_text(json.dumps(table, indent=2) + "\n")
    lines = [
        "| seed | same init | AUROC fixed / learn | NLL fixed / learn | loc AUROC fixed / learn "
        "| alpha start -> end (learnable) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        loc = (
            "n/a"
            if r["loc_fixed"] is None or r["loc_learn"] is None
            else f"{r['loc_fixed']:.3f} / {r['loc_learn']:.3f}"
        )
        lines.append(
            f"| {r['seed']} | {'yes' if r['paired_init'] else 'NO'} | {r['auroc_fixed']:.3f} / {r['auroc_learn']:.3f} "
            f"| {r['nll_fixed']:.3f} / {r['nll_learn']:.3f} | {loc} "
            f"| {r['alpha_init']:+.4f} -> {r['alpha_final']:+.4f} |"
        )
    lines += [
        "",
        "| paired difference (learnable - fixed) | mean | 95% bootstrap CI over seeds | per seed |",
        "|---|---|---|---|",
    ]
    for key, name in (("auroc", "test AUROC"), ("nll", "test NLL"), ("loc", "localisation AUROC")):
        d = diff[key]
        if d.get("per_seed"):
            lines.append(
                f"| {name} | {d['point']:+.4f} | {d['ci_low']:+.4f} to {d['ci_high']:+.4f} "
                f"| {', '.join(f'{v:+.3f}' for v in d['per_seed'])} |"
            )
    if moved:
        lines += [
            "",
            f"|alpha_end - alpha_start| over seeds: mean {np.mean(moved):.4f}, max {np.max(moved):.4f}",
        ]
    text = "\n".join(lines)
    (out / "ablation.md").write_text(text + "\n")
    print(text, flush=True)
    return table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/replicate", help="working folder (cohort, cache, runs, logs)")
    p.add_argument("--num-slides", type=int, default=80)
    p.add_argument("--cohort-seed", type=int, default=7)
    p.add_argument("--size", type=int, default=8192, help="slide side in level-0 px (40x)")
    p.add_argument("--lesion-fraction", type=float, default=0.03, help="share of tissue that is lesion")
    p.add_argument("--patch-size", type=int, default=96, help="cached patch side at 10x and 5x")
    p.add_argument("--aggregators", nargs="+", default=list(AGGREGATORS), choices=list(AGGREGATORS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, default=12)
    p.add_argument("--input-size", type=int, default=64, help="train and eval patch side fed to the encoder")
    p.add_argument("--sample-size", type=int, default=32, help="patches per training bag (MRIS)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once (each one torch thread)")
    p.add_argument("--summarise", action="store_true", help="only print the table of the finished runs")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="run the attention-plus ablation (alpha 0 vs learnable, paired)",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # AGG:SEED, the worker entry point
    p.add_argument(
        "--regime",
        choices=("miniature", "many-patch"),
        default="miniature",
        help="miniature: this PANDA-like benchmark (default); many-patch: the TCGA-like regime "
        "(benchmarks/replicate_many_patch.py, see its --help)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    regime = argparse.ArgumentParser(add_help=False)
    regime.add_argument("--regime", choices=("miniature", "many-patch"), default="miniature")
    known, rest = regime.parse_known_args(argv)
    if known.regime == "many-patch":  # the TCGA-like regime (issue 23) has its own driver and options
        from replicate_many_patch import main as many_patch

        return many_patch(rest)
    args = _parser().parse_args(rest)
    out = Path(args.out)
    overrides = [
        "--trainer.max_epochs",
        str(args.max_epochs),
        "--data.sample_size",
        str(args.sample_size),
        "--data.train_patch_size",
        str(args.input_size),
        "--data.eval_patch_size",
        str(args.input_size),
    ]
    if args.one:
        agg, seed = args.one.split(":")
        result = run_one(out, agg, int(seed), overrides)
        print(
            f"replicate: {agg} seed {seed}: test AUROC {result['auroc']['point']:.3f}, "
            f"loc AUROC {result['loc_auroc']}, {result['total_s']:.0f} s",
            flush=True,
        )
        return 0
    aggs = list(ABLATION)[::-1] if args.ablation else args.aggregators
    if args.summarise:
        summarise_ablation(out, args.seeds) if args.ablation else summarise(out, aggs, args.seeds)
        return 0
    start = time.perf_counter()
    prepare(args)
    print(f"replicate: cohort and cache ready in {time.perf_counter() - start:.0f} s", flush=True)
    # Seed-major order: a cut-short benchmark still has every aggregator at the first seeds.
    queue = [(a, s) for s in args.seeds for a in aggs]
    running: list[tuple[str, int, subprocess.Popen]] = []
    while queue or running:
        while queue and len(running) < args.jobs:
            agg, seed = queue.pop(0)
            running.append((agg, seed, launch(args, agg, seed)))
        time.sleep(5)
        for item in list(running):
            agg, seed, proc = item
            if proc.poll() is not None:
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see logs/"
                print(
                    f"replicate: {agg} seed {seed} {state} at {(time.perf_counter() - start) / 60:.1f} min",
                    flush=True,
                )
    summarise(out, aggs, args.seeds)
    if args.ablation:
        summarise_ablation(out, args.seeds)
    print(f"replicate: total wall time {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
