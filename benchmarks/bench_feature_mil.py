"""Feature-MIL benchmark: epoch time of ABMILX on precomputed features, and peak memory of a huge bag.

Sections:

* ``epoch``: ``--slides`` synthetic slides of ``--features`` x ``--dim`` float32 features are written as
  real ``.h5`` files (our layout) in ``--tmp``; a training epoch is the real path: ``FeatureBagDataset``
  reads and validates each bag, :class:`SlideModule` (``PrecomputedFeatures`` + ABMILX 512-d, the paper's
  two-stage setting) runs forward, loss, backward and an AdamW step, batch 1. Read time and compute
  time are reported separately; the epoch time for ``--target-slides`` slides is the per-slide mean
  times that count (only a subset is written: 1,000 x 3,000 x 1,024 float32 is 12 GB).
* ``memory``: peak resident memory of one ABMILX forward + backward on a bag of ``--big-bag``
  features (with and/or without A+, ``--attn-plus 1 0``), measured in a fresh subprocess (``ru_maxrss``) minus a baseline subprocess that builds the
  same model and the bag without running it.

Usage::

    .venv/bin/python benchmarks/bench_feature_mil.py --slides 40 --features 3000 --dim 1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from e2e_wsi.data.datasets import Bag  # noqa: E402
from e2e_wsi.features.datamodule import FeatureBagDataset, collate_feature_bags  # noqa: E402
from e2e_wsi.features.store import FeatureFolder, write_slide  # noqa: E402
from e2e_wsi.models.aggregators import ABMILX  # noqa: E402
from e2e_wsi.models.encoders import PrecomputedFeatures  # noqa: E402
from e2e_wsi.models.module import SlideModule  # noqa: E402


def _model(dim: int, attn_plus: bool = True) -> SlideModule:
    def aggregator(in_dim: int) -> ABMILX:
        return ABMILX(in_dim, inner_dim=512, heads=8, dropout=0.25, attn_plus=attn_plus)

    return SlideModule(encoder=PrecomputedFeatures(dim), aggregator=aggregator)


def bench_epoch(args: argparse.Namespace) -> dict:
    folder = Path(args.tmp)
    rng = np.random.default_rng(0)
    for i in range(args.slides):
        if not (folder / f"s{i:04d}.h5").exists():
            feats = rng.standard_normal((args.features, args.dim), dtype=np.float32)
            coords = rng.integers(0, 100_000, (args.features, 2))
            write_slide(folder, f"s{i:04d}", feats, coords, None)
    bags = [Bag(f"s{i:04d}", (f"s{i:04d}",), {"target": i % 2}) for i in range(args.slides)]
    dataset = FeatureBagDataset(FeatureFolder(folder), bags, float("nan"), None)
    model = _model(args.dim).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    read_s, step_s = [], []
    for k in range(len(dataset)):
        t0 = time.perf_counter()
        batch = collate_feature_bags([dataset[k]])
        t1 = time.perf_counter()
        out = model(batch["features"], batch["mask"])
        loss = torch.nn.functional.cross_entropy(out["outputs"], batch["target"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if k >= args.warmup:
            read_s.append(t1 - t0)
            step_s.append(t2 - t1)
    per_slide = float(np.mean(read_s) + np.mean(step_s))
    return {
        "section": "epoch",
        "slides_timed": len(step_s),
        "features_per_slide": args.features,
        "dim": args.dim,
        "read_s_per_slide": round(float(np.mean(read_s)), 4),
        "step_s_per_slide": round(float(np.mean(step_s)), 4),
        "epoch_s_extrapolated": round(per_slide * args.target_slides, 1),
        "target_slides": args.target_slides,
        "torch_threads": torch.get_num_threads(),
    }


def _peak_child(n: int, dim: int, run: bool, attn_plus: bool) -> float:
    code = f"""
import resource, sys, torch
sys.path.insert(0, {str(REPO)!r})
from benchmarks.bench_feature_mil import _model
model = _model({dim}, {attn_plus}).train()
x = torch.randn(1, {n}, {dim})
if {run}:
    out = model(x, None)
    out["outputs"].sum().backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024  # KiB -> MiB on Linux


def bench_memory(args: argparse.Namespace) -> Iterator[dict]:
    for n in args.big_bag:
        for attn_plus in args.attn_plus:
            base = _peak_child(n, args.dim, False, attn_plus)
            t0 = time.perf_counter()
            peak = _peak_child(n, args.dim, True, attn_plus)
            yield (
                {
                    "section": "memory",
                    "bag": n,
                    "dim": args.dim,
                    "attn_plus": attn_plus,
                    "input_mib": round(n * args.dim * 4 / 2**20, 1),
                    "peak_rss_mib": round(peak, 1),
                    "baseline_rss_mib": round(base, 1),
                    "peak_minus_baseline_mib": round(peak - base, 1),
                    "child_wall_s": round(time.perf_counter() - t0, 1),
                }
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=40, help="slides written and timed (a subset)")
    p.add_argument("--target-slides", type=int, default=1000, help="epoch size the time is scaled to")
    p.add_argument("--features", type=int, default=3000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--big-bag", type=int, nargs="+", default=[100_000])
    p.add_argument(
        "--attn-plus", type=int, nargs="+", default=[1], help="1: ABMILX with A+, 0: without (MHLA only)"
    )
    p.add_argument("--tmp", default="/tmp/bench_feature_mil")
    p.add_argument("--only", nargs="*", default=["epoch", "memory"])
    args = p.parse_args()
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    for name in args.only:
        result = {"epoch": bench_epoch, "memory": bench_memory}[name](args)
        for row in result if not isinstance(result, dict) else [result]:
            print(json.dumps(row), flush=True)
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
