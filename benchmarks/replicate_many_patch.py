"""Many-patch regime of the replication: the paper's mechanism where the paper says it bites (issue 23).

The paper (sections 3.1-3.3, Table 3 bottom) says that in end-to-end training plain ABMIL's very sparse
attention sends the encoder's gradient to few, possibly wrong, patches *on slides with many patches*
(TCGA-BRCA, ~10k patches at 10x, MRIS samples 512), while ABMILX's multi-head local attention (MHLA) and
attention plus (A+) keep it spread. The miniature (``replicate_mil.py``) ran the PANDA-like regime
(95-239 patches per slide). This driver runs the TCGA-like one on a 2-core CPU:

1. ``e2e-wsi synth``: 2-class subtyping slides of 12288 px (about 2-4k patches of 32 px at 10x), lesions
   3% of the tissue in 6 foci, label-independent lymphoid aggregates (distractors) on 3%;
2. ``e2e-wsi preprocess`` at 10x and 5x;
3. per seed, five E2E arms (``e2e-wsi fit``, 32 epochs, MRIS 256 patches per bag, patches fed at 16 px): ABMIL,
   MHLA (alpha = 0), ABMILX (learnable alpha), TransMIL, mean pooling. All arms of a seed start from
   the same encoder and head weights, and MHLA and ABMILX from the same aggregator weights but alpha
   (``replicate_init.SharedInit``; SHA-256 digests in ``init_*.json`` are checked in the summary).
   ``e2e_wsi.training.mechanism.MechanismProbe`` records per epoch the share of the encoder's
   gradient norm from lesion and distractor patches, and, over every 10x patch of the test slides,
   attention sparsity, attention mass on lesion / distractor patches, localisation, AUROC and NLL;
4. per seed, two-stage ABMILX (``configs/two_stage_abmilx.yaml``) on ``e2e-wsi extract`` features of the
   seed's initial (random) encoder and of the ABMILX arm's trained encoder, tested on the same split.

Every run is a single-threaded subprocess writing ``OUT/runs/<arm>_s<seed>/result.json`` when done; a
finished run is skipped, an interrupted fit resumes from ``last.ckpt``. ``--quick`` is a smoke test
(12 small slides, one seed, 2 epochs). Then ``--summarise`` (also run at the end) writes
``OUT/summary.{json,md}`` and ``OUT/curves.png``.
The settings a folder's results depend on are kept in ``OUT/benchmark.json``; a rerun with other
values is refused.

    nice -n 10 .venv/bin/python benchmarks/replicate_mil.py --regime many-patch --out /tmp/many_patch
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "replicate_configs" / "many_patch"
E2E_ARMS = {
    "abmil": "ABMIL",
    "mhla": "MHLA (alpha = 0)",
    "abmilx": "ABMILX (learnable alpha)",
    "transmil": "TransMIL",
    "meanpool": "Mean pooling",
}
TWO_STAGE_ARMS = {"ts_init": "two-stage, initial encoder", "ts_e2e": "two-stage, ABMILX E2E encoder"}
ARMS = {**E2E_ARMS, **TWO_STAGE_ARMS}
ABMILX_PAIR = ("mhla", "abmilx")  # one module, alpha fixed at 0 vs learnable: share the aggregator too
# Queue order: seed + lag. The paper's contrast (ABMIL / MHLA / ABMILX) goes seed by seed; TransMIL and mean
# pooling trail by 1.5 seeds and the two-stage arms (which wait for ABMILX anyway) by 2, so a run cut short
# has the contrast at the most seeds and every arm at the first ones.
LAG = {
    "abmil": 0.0,
    "mhla": 0.0,
    "abmilx": 0.0,
    "transmil": 1.5,
    "meanpool": 1.5,
    "ts_init": 2.0,
    "ts_e2e": 2.0,
}
# 32 epochs x 19 bags = 608 steps. The first full run used 8 (152 steps): no arm fitted even its training
# slides (docs/results.md, "Short schedule"); 32 was fixed before the 5-seed run and not changed after it.
FULL = {"num_slides": 32, "size": 12288, "max_epochs": 32, "seeds": [0, 1, 2, 3, 4], "two_stage_epochs": 20}
# What a folder's results depend on: a rerun with other values would mix two benchmarks in one summary.
SETTINGS = (
    "num_slides",
    "size",
    "cohort_seed",
    "lesion_fraction",
    "lesion_foci",
    "distractor_fraction",
    "patch_size",
    "input_size",
    "sample_size",
    "max_epochs",
    "two_stage_epochs",
    "two_stage_instances",
)
QUICK = {"num_slides": 12, "size": 8192, "max_epochs": 2, "seeds": [0], "two_stage_epochs": 2}


def cli(args: list[str]) -> None:
    """Run an ``e2e-wsi`` verb in-process; a non-zero status stops this run."""
    from e2e_wsi.cli import main

    status = main([str(a) for a in args])
    if status != 0:
        raise SystemExit(f"many-patch: `e2e-wsi {' '.join(map(str, args))}` failed with status {status}")


def check_settings(args: argparse.Namespace) -> None:
    """Record this folder's settings on its first run (``OUT/benchmark.json``); refuse a rerun that differs.

    Finished runs are skipped by their ``result.json`` alone, so without this a rerun with, say, another
    ``--max_epochs`` would silently summarise runs of two schedules together.
    """
    out = Path(args.out)
    path = out / "benchmark.json"
    settings = {key: getattr(args, key) for key in SETTINGS}
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n")
        return
    recorded = json.loads(path.read_text())
    differ = {k: (recorded.get(k), v) for k, v in settings.items() if recorded.get(k) != v}
    if differ:
        detail = ", ".join(f"--{k} {new} (folder: {old})" for k, (old, new) in differ.items())
        raise SystemExit(
            f"many-patch: {out} holds runs made with other settings: {detail}. Pass the folder's settings "
            f"(recorded in {path}) or use another --out."
        )


def prepare(args: argparse.Namespace) -> None:
    """Synthesize and preprocess the cohort once (both skip or resume what is done)."""
    out = Path(args.out)
    cohort = out / "cohort"
    if not (cohort / "manifest.csv").is_file():
        cli(["synth", "--task", "subtype", "--num-slides", args.num_slides, "--seed", args.cohort_seed,
             "--size", args.size, "--lesion-fraction", args.lesion_fraction, "--lesion_foci", args.lesion_foci,
             "--distractor_fraction", args.distractor_fraction, "--workers", 2, "--out", cohort])  # fmt: skip
    cli(["preprocess", "--manifest", cohort / "manifest.csv", "--out", out / "cache", "--magnifications",
         "10", "5", "--patch-size", args.patch_size, "--workers", 2, "--quiet"])  # fmt: skip


def _callbacks(out: Path, arm: str) -> Path:
    """This arm's ``trainer.callbacks`` (checkpoint, shared initial weights, mechanism probe) as YAML."""
    init = str(out / "init")
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0}},
        {"class_path": "replicate_init.SharedInit",
         "init_args": {"folder": init, "name": "trunk", "share": ["encoder.", "head."]}},
    ]  # fmt: skip
    if arm in ABMILX_PAIR:
        callbacks.append(
            {"class_path": "replicate_init.SharedInit",
             "init_args": {"folder": init, "name": "abmilx", "share": ["aggregator."], "keep": ["aggregator.alpha"]}}
        )  # fmt: skip
    callbacks.append(
        {"class_path": "e2e_wsi.training.mechanism.MechanismProbe",
         "init_args": {"masks_dir": str(out / "cohort" / "masks"), "split": "test",
                      "every_n_epochs": 2, "probe_slides": 4}}
    )  # fmt: skip
    path = out / "configs" / f"callbacks_{arm}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}, sort_keys=False))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _digests(run_dir: Path) -> dict[str, str | None]:
    out = {}
    for name in ("trunk", "abmilx"):
        path = run_dir / f"init_{name}.json"
        out[name] = json.loads(path.read_text())["digest_without_keep"] if path.is_file() else None
    return out


def run_e2e(args: argparse.Namespace, arm: str, seed: int) -> dict:
    """fit one E2E arm with the mechanism probe; the last epoch's probe is the test result."""
    import torch

    out = Path(args.out)
    run_dir = out / "runs" / f"{arm}_s{seed}"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    t0 = time.perf_counter()
    fit = ["fit", "--config", CONFIGS / "base.yaml", "--config", CONFIGS / f"{arm}.yaml",
           "--config", _callbacks(out, arm), "--seed_everything", seed, "--data.seed", seed,
           "--run_dir", run_dir, "--data.manifest", out / "cohort" / "manifest.csv",
           "--data.cache_dir", out / "cache", "--trainer.max_epochs", args.max_epochs,
           "--data.sample_size", args.sample_size, "--data.train_patch_size", args.input_size,
           "--data.eval_patch_size", args.input_size]  # fmt: skip
    if ckpt.is_file():
        fit += ["--ckpt_path", "last"]  # resume an interrupted run; its probe rows so far are kept
    else:
        (run_dir / "mechanism.jsonl").unlink(missing_ok=True)  # rows of a run that died before a checkpoint
    cli(fit)
    epochs = _read_jsonl(run_dir / "mechanism.jsonl")
    final = epochs[-1]["probe"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    alpha_init = None
    if (run_dir / "init_abmilx.json").is_file():
        alpha_init = json.loads((run_dir / "init_abmilx.json").read_text())["kept"].get("aggregator.alpha")
    return {
        "arm": arm,
        "seed": seed,
        "auroc": final.get("auroc"),
        "nll": final.get("nll"),
        "loc_auroc": final.get("loc_auroc"),
        "final_probe": final,
        "epochs": epochs,
        "init_digests": _digests(run_dir),
        "alpha_init": alpha_init,
        "alpha_final": float(state["aggregator.alpha"]) if "aggregator.alpha" in state else None,
        "seconds": time.perf_counter() - t0,
    }


def run_two_stage(args: argparse.Namespace, arm: str, seed: int) -> dict:
    """extract features (initial or ABMILX-trained encoder of this seed), fit and test two-stage ABMILX."""
    import pandas as pd

    out = Path(args.out)
    run_dir = out / "runs" / f"{arm}_s{seed}"
    e2e_dir = out / "runs" / f"abmilx_s{seed}"
    feats = out / "features" / f"{arm}_s{seed}"
    t0 = time.perf_counter()
    if arm == "ts_init":  # the encoder weights every E2E arm of this seed started from
        encoder = ["--encoder", "resnet18", "--weights", out / "init" / f"trunk{seed}.pt"]
    else:
        encoder = ["--encoder", e2e_dir / "checkpoints" / "last.ckpt"]
    cli(["extract", "--cache", out / "cache", "--out", feats, *encoder, "--magnification", "10",
         "--input-size", args.input_size, "--workers", 0, "--no-progress"])  # fmt: skip
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    callbacks = out / "configs" / "callbacks_two_stage.yaml"
    callbacks.parent.mkdir(parents=True, exist_ok=True)
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"save_last": True, "save_top_k": 0}}]}}))  # fmt: skip
    if not (run_dir / "fit.done").is_file():
        fit = ["fit", "--config", ROOT / "configs" / "two_stage_abmilx.yaml", "--config", callbacks,
               "--seed_everything", seed, "--run_dir", run_dir, "--data.manifest", out / "cohort" / "manifest.csv",
               "--data.features_dir", feats, "--data.split_file", e2e_dir / "splits.csv",
               "--trainer.accelerator", "cpu", "--trainer.max_epochs", args.two_stage_epochs,
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--data.num_workers", 0, "--data.max_instances", args.two_stage_instances]  # fmt: skip
        cli([*fit, "--ckpt_path", "last"] if ckpt.is_file() else fit)
        (run_dir / "fit.done").write_text("")
    cli(["test", "--config", run_dir / "config.yaml", "--ckpt_path", ckpt, "--run_dir", run_dir])
    report = json.loads((run_dir / "metrics.json").read_text())
    preds = pd.read_csv(run_dir / "predictions.csv")
    p_true = preds.apply(lambda r: r[f"prob_{int(r['label'])}"], axis=1).clip(1e-7, 1.0)
    import numpy as np

    return {
        "arm": arm,
        "seed": seed,
        "auroc": report["metrics"]["auroc"]["point"],
        "nll": float(-np.log(p_true.to_numpy(dtype=float)).mean()),
        "loc_auroc": None,
        "seconds": time.perf_counter() - t0,
    }


def where_attention(out: Path, run_dir: Path, max_slides: int = 4) -> dict[str, list[float]]:
    """Where a trained E2E model's attention goes on the first test slides (``RUN/where.json``, cached).

    Regions from the masks: lesion (255), distractor (192), glass edge (patches >= 25% background) and
    the rest (plain stroma). Returns region -> [attention mass, share of patches], means over slides.
    """
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from e2e_wsi.cache.store import PatchCache
    from e2e_wsi.evaluation.mechanism import mass_on, patch_region_labels
    from e2e_wsi.inference.attention import slide_attention
    from e2e_wsi.runs import load_run

    cached = run_dir / "where.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    loaded = load_run(run_dir / "checkpoints" / "last.ckpt", run_dir / "config.yaml")
    model, cfg = loaded.model, loaded.data
    cache = PatchCache(cfg["cache_dir"])
    splits = pd.read_csv(run_dir / "splits.csv")
    rows = []
    with torch.inference_mode():
        for sid in splits.loc[splits["split"] == "test", "slide_id"].tolist()[:max_slides]:
            att, _ = slide_attention(
                model, cache, sid, [float(cfg["magnifications"][0])], int(cfg["eval_patch_size"])
            )
            mask = np.asarray(Image.open(out / "cohort" / "masks" / f"{sid}.png").convert("L"))
            lab = {
                name: patch_region_labels(att.coords, att.size_level0, mask, att.dimensions, value=value)
                for name, value in (("lesion", 255), ("distractor", 192), ("glass_edge", 0))
            }
            lab["stroma"] = ~(lab["lesion"] | lab["distractor"] | lab["glass_edge"])
            rows.append({k: (mass_on(att.attention, v), float(v.mean())) for k, v in lab.items()})
    result = {k: [float(np.mean([r[k][i] for r in rows])) for i in (0, 1)] for k in rows[0]}
    cached.write_text(json.dumps(result) + "\n")
    return result


def run_one(args: argparse.Namespace, arm: str, seed: int) -> dict:
    """One (arm, seed): skipped when its ``result.json`` exists, else run and saved."""
    import torch

    torch.set_num_threads(1)
    path = Path(args.out) / "runs" / f"{arm}_s{seed}" / "result.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = run_two_stage(args, arm, seed) if arm in TWO_STAGE_ARMS else run_e2e(args, arm, seed)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _ready(out: Path, arm: str, seed: int) -> bool:
    """Two-stage arms wait for the seed's ABMILX run (its encoder, its split, the shared init)."""
    return arm not in TWO_STAGE_ARMS or (out / "runs" / f"abmilx_s{seed}" / "result.json").is_file()


def _launch(args: argparse.Namespace, arm: str, seed: int) -> subprocess.Popen:
    log_dir = Path(args.out) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{arm}:{seed}", *args.passthrough]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(log_dir / f"{arm}_s{seed}.log", "a")  # noqa: SIM115 - closed when the process ends
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def schedule(args: argparse.Namespace) -> None:
    """Run every (arm, seed) not done yet, ``--jobs`` at a time, seed-major (a cut-short run has whole seeds)."""
    out = Path(args.out)
    start = time.perf_counter()
    order = {s: i for i, s in enumerate(args.seeds)}
    queue = sorted(
        ((a, s) for s in args.seeds for a in args.arms),
        key=lambda p: (order[p[1]] + LAG[p[0]], list(ARMS).index(p[0])),
    )
    queue = [(a, s) for a, s in queue if not (out / "runs" / f"{a}_s{s}" / "result.json").is_file()]
    running: list[tuple[str, int, subprocess.Popen]] = []
    failed: set[tuple[str, int]] = set()
    while queue or running:
        for item in list(queue):
            if len(running) >= args.jobs:
                break
            arm, seed = item
            if (arm in TWO_STAGE_ARMS) and ("abmilx", seed) in failed:
                queue.remove(item)
                continue
            if _ready(out, arm, seed):
                queue.remove(item)
                running.append((arm, seed, _launch(args, arm, seed)))
        if not running and queue:  # only blocked items left and nothing can unblock them
            print(f"many-patch: cannot run {queue}: their ABMILX runs are missing", flush=True)
            break
        time.sleep(5)
        for item in list(running):
            arm, seed, proc = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    failed.add((arm, seed))
                state = "done" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see logs/"
                minutes = (time.perf_counter() - start) / 60
                print(f"many-patch: {arm} seed {seed} {state} at {minutes:.1f} min", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/many_patch", help="working folder (default /tmp/many_patch)")
    p.add_argument("--quick", action="store_true", help="smoke test: 12 slides of 8192 px, seed 0, 2 epochs")
    p.add_argument("--num_slides", type=int, default=None, help="slides (default 32; quick 12)")
    p.add_argument(
        "--size", type=int, default=None, help="slide side in level-0 px (default 12288; quick 8192)"
    )
    p.add_argument("--cohort_seed", type=int, default=23, help="synth seed (default 23)")
    p.add_argument(
        "--lesion_fraction", type=float, default=0.03, help="lesion share of tissue (default 0.03)"
    )
    p.add_argument("--lesion_foci", type=int, default=6, help="lesion foci per slide (default 6)")
    p.add_argument("--distractor_fraction", type=float, default=0.03, help="distractor share (default 0.03)")
    p.add_argument("--patch_size", type=int, default=32, help="cached patch side at 10x and 5x (default 32)")
    p.add_argument("--input_size", type=int, default=16, help="patch side fed to the encoder (default 16)")
    p.add_argument("--sample_size", type=int, default=256, help="MRIS patches per training bag (default 256)")
    p.add_argument("--max_epochs", type=int, default=None, help="E2E epochs (default 32; quick 2)")
    p.add_argument(
        "--two_stage_epochs", type=int, default=None, help="two-stage epochs (default 20; quick 2)"
    )
    p.add_argument(
        "--two_stage_instances",
        type=int,
        default=512,
        help="features per training bag in two-stage fits (default 512; test bags are whole). Full bags "
        "of ~3,000 instances made A+ (quadratic in the bag) take ~2 min per epoch on the loaded CPU",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default 0-4; quick 0)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="arms (default all)")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one torch thread each (default 2)")
    p.add_argument(
        "--summarise", action="store_true", help="only write the tables and curves of finished runs"
    )
    p.add_argument(
        "--where",
        action="store_true",
        help="only measure where finished E2E models' attention goes (lesion, distractor, glass edge, stroma)",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # ARM:SEED, the worker entry point
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments with the full or quick defaults filled in; ``passthrough`` re-creates them for workers."""
    args = _parser().parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.passthrough = [
        "--out", args.out, "--max_epochs", str(args.max_epochs), "--sample_size", str(args.sample_size),
        "--input_size", str(args.input_size), "--two_stage_epochs", str(args.two_stage_epochs), "--two_stage_instances", str(args.two_stage_instances),
    ]  # fmt: skip
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        arm, seed = args.one.split(":")
        result = run_one(args, arm, int(seed))
        print(
            f"many-patch: {arm} seed {seed}: test AUROC {result['auroc']}, {result['seconds']:.0f} s",
            flush=True,
        )
        return 0
    if args.where:  # after the runs: where each finished E2E model's attention goes
        import torch

        torch.set_num_threads(1)
        for arm in (a for a in args.arms if a in E2E_ARMS):
            for seed in args.seeds:
                run_dir = Path(args.out) / "runs" / f"{arm}_s{seed}"
                if (run_dir / "result.json").is_file():
                    print(
                        f"many-patch: {arm} seed {seed}: {where_attention(Path(args.out), run_dir)}",
                        flush=True,
                    )
        return 0
    if not args.summarise:
        check_settings(args)
        start = time.perf_counter()
        prepare(args)
        print(f"many-patch: cohort and cache ready in {time.perf_counter() - start:.0f} s", flush=True)
        schedule(args)
        print(f"many-patch: runs finished in {(time.perf_counter() - start) / 60:.1f} min wall", flush=True)
    from replicate_many_patch_summary import summarise

    summarise(Path(args.out), args.arms, args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
