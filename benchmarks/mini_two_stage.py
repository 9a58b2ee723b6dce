"""Miniature of the paper's E2E vs two-stage comparison on one synthetic split (docs/results.md).

Three models, one split, one cohort:

1. **E2E**: ResNet-18 (to layer3, random init, seed 0) + ABMILX trained end to end
   (``benchmarks/replicate_configs/base.yaml`` + ``abmilx.yaml``, the aggregator study's setting).
2. **two-stage, initial encoder**: ``e2e-wsi extract`` with the same encoder's *initial* weights
   (``--encoder resnet18 --seed 0`` draws exactly the weights the E2E run started from), then
   ``configs/two_stage_abmilx.yaml`` on those frozen features.
3. **two-stage, E2E encoder**: features from the E2E run's trained encoder (``--encoder RUN/.../last.ckpt``),
   then the same two-stage model.

Every step is the user-facing CLI in a subprocess; finished steps are skipped, so a killed run resumes.
Paired bootstrap differences come from ``e2e-wsi evaluate --compare``.

Usage::

    nice -n 10 .venv/bin/python benchmarks/mini_two_stage.py --out /tmp/mini_two_stage
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from e2e_wsi.runs.folder import LAST_CHECKPOINT, RunFolder

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "e2e_wsi"]


def run(args: list[str], done: Path | None) -> None:
    if done is not None and done.exists():
        print(f"skip (done): {' '.join(args[:2])} -> {done}", flush=True)
        return
    start = time.perf_counter()
    print("$ e2e-wsi " + " ".join(args), flush=True)
    subprocess.run([*CLI, *args], check=True, cwd=REPO)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/mini_two_stage"))
    p.add_argument("--num-slides", type=int, default=40)
    p.add_argument("--size", type=int, default=6144)
    p.add_argument("--e2e-epochs", type=int, default=12)
    p.add_argument("--two-stage-epochs", type=int, default=75)
    a = p.parse_args()
    out = a.out.resolve()
    cohort, cache, runs = out / "cohort", out / "cache", out / "runs"
    base = REPO / "benchmarks" / "replicate_configs"
    run(["synth", "--task", "subtype", "--num-slides", str(a.num_slides), "--seed", "7", "--size", str(a.size),
         "--lesion-fraction", "0.03", "--out", str(cohort)], cohort / "manifest.csv")  # fmt: skip
    run(["preprocess", "--manifest", str(cohort / "manifest.csv"), "--out", str(cache), "--magnifications",
         "10", "5", "--patch-size", "96", "--workers", "1"], cache / "summary.json")  # fmt: skip
    e2e = runs / "e2e"
    run(["fit", "--config", str(base / "base.yaml"), "--config", str(base / "abmilx.yaml"),
         "--data.manifest", str(cohort / "manifest.csv"), "--data.cache_dir", str(cache), "--run_dir", str(e2e),
         "--trainer.max_epochs", str(a.e2e_epochs)], RunFolder(e2e).checkpoint(LAST_CHECKPOINT))  # fmt: skip
    ckpt = RunFolder(e2e).checkpoint(LAST_CHECKPOINT)
    run(
        ["test", "--config", str(RunFolder(e2e).config), "--ckpt_path", str(ckpt)], RunFolder(e2e).predictions
    )
    extract = ["extract", "--cache", str(cache), "--magnification", "10", "--input-size", "64", "--workers", "1",
               "--no-progress"]  # fmt: skip
    feats = {"init": out / "features_init", "e2e": out / "features_e2e"}
    run(
        [*extract, "--encoder", "resnet18", "--seed", "0", "--out", str(feats["init"])],
        feats["init"] / "summary.json",
    )
    run([*extract, "--encoder", str(ckpt), "--out", str(feats["e2e"])], feats["e2e"] / "summary.json")
    for name, folder in feats.items():
        r = runs / f"two_stage_{name}"
        run(["fit", "--config", str(REPO / "configs" / "two_stage_abmilx.yaml"), "--data.manifest",
             str(cohort / "manifest.csv"), "--data.features_dir", str(folder), "--run_dir", str(r),
             "--data.split_file", str(RunFolder(e2e).splits), "--trainer.accelerator", "cpu",
             "--trainer.max_epochs", str(a.two_stage_epochs), "--trainer.enable_progress_bar", "false",
             "--data.num_workers", "0"], RunFolder(r).checkpoint(LAST_CHECKPOINT))  # fmt: skip
        run(["test", "--config", str(RunFolder(r).config), "--ckpt_path",
             str(RunFolder(r).checkpoint(LAST_CHECKPOINT))], RunFolder(r).predictions)  # fmt: skip
    results = {}
    for other in ("two_stage_init", "two_stage_e2e"):
        cmp = out / f"compare_e2e_vs_{other}"
        run(["evaluate", "--predictions", str(RunFolder(e2e).predictions), "--compare",
             str(RunFolder(runs / other).predictions), "--out", str(cmp)], None)  # fmt: skip
        results[other] = sorted(p.name for p in cmp.iterdir())
    for name in ("e2e", "two_stage_init", "two_stage_e2e"):
        metrics = json.loads(RunFolder(runs / name).metrics.read_text())
        print(name, json.dumps(metrics)[:400])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
