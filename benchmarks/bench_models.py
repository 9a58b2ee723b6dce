"""Benchmark of the models: ABMILX forward+backward (SDPA vs naive A+) and encoder patches/s on CPU.

Each configuration runs in its own subprocess so that peak RSS (``ru_maxrss``) is clean. The memory
figure is the peak RSS during the measured runs minus the RSS once the input bag (and its gradient
buffer) exists, i.e. the peak beyond the input.

Usage::

    .venv/bin/python benchmarks/bench_models.py                 # everything (naive path up to 5k)
    .venv/bin/python benchmarks/bench_models.py --naive-max 10000  # naive at 10k too (~10 GB RAM)
    .venv/bin/python benchmarks/bench_models.py --only abmilx --sizes 1000 10000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _timed(step, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def worker_abmilx(n: int, path: str, in_dim: int, repeats: int) -> dict:
    """ABMILX (paper defaults: inner 256, 8 heads) forward+backward on one bag [1, n, in_dim]."""
    from e2e_wsi.models.aggregators import ABMILX

    torch.manual_seed(0)
    model = ABMILX(in_dim=in_dim).train()
    x = torch.randn(1, n, in_dim, requires_grad=True)
    x.grad = torch.zeros_like(x)  # count the input's gradient buffer as part of the input
    forward = model.forward if path == "sdpa" else model.forward_naive

    def step() -> None:
        slide, _ = forward(x)
        slide.sum().backward()

    base = _rss_mb()
    warm = [] if n >= 50_000 else _timed(step, 1)
    times = _timed(step, repeats)
    return {
        "bench": "abmilx",
        "n": n,
        "path": path,
        "median_s": statistics.median(times),
        "warmup_s": warm[0] if warm else None,
        "peak_beyond_input_mb": _peak_rss_mb() - base,
        "input_mb": 2 * x.numel() * 4 / 2**20,
        "threads": torch.get_num_threads(),
    }


def worker_encoder(arch: str, mode: str, batch: int, repeats: int) -> dict:
    """Patches/s of the truncated ResNet at 224 px, fp32, channels_last."""
    from e2e_wsi.models.encoders import ResNetEncoder

    torch.manual_seed(0)
    encoder = ResNetEncoder(arch, weights="none", channels_last=True)
    x = torch.randn(batch, 3, 224, 224)
    if mode == "train":
        encoder.train()

        def step() -> None:
            encoder(x).sum().backward()
    else:
        encoder.eval()

        def step() -> None:
            encoder.encode(x, chunk_size=batch)

    _timed(step, 1)
    times = _timed(step, repeats)
    return {
        "bench": "encoder",
        "arch": arch,
        "mode": mode,
        "batch": batch,
        "median_s": statistics.median(times),
        "patches_per_s": batch / statistics.median(times),
        "threads": torch.get_num_threads(),
    }


def _run_child(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc={proc.returncode}",
            "args": args,
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_abmilx(row: dict) -> None:
    if "error" in row:
        print(f"  {row['args']}: FAILED {row['error']}", flush=True)
        return
    print(
        f"  ABMILX N={row['n']:>7} {row['path']:>5}: fwd+bwd {row['median_s']:8.3f} s, "
        f"peak beyond input {row['peak_beyond_input_mb']:8.0f} MB (input+grad {row['input_mb']:.0f} MB)",
        flush=True,
    )


def _print_encoder(row: dict) -> None:
    if "error" in row:
        print(f"  {row['args']}: FAILED {row['error']}", flush=True)
        return
    print(
        f"  {row['arch']} {row['mode']:>5} batch {row['batch']:>3}: {row['patches_per_s']:7.1f} patches/s "
        f"({row['median_s']:.2f} s per batch)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (parent) or one configuration (``--worker``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["abmilx", "encoder"], default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--naive-max", type=int, default=5000, help="largest N for the naive (O(N^2)) path")
    parser.add_argument("--in-dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    if args.worker:
        kind, *rest = args.worker
        if kind == "abmilx":
            row = worker_abmilx(
                int(rest[0]), rest[1], args.in_dim, 1 if int(rest[0]) >= 50_000 else args.repeats
            )
        else:
            row = worker_encoder(rest[0], rest[1], int(rest[2]), args.repeats)
        print(json.dumps(row))
        return 0

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {psutil.cpu_count()} logical CPUs",
        flush=True,
    )
    rows = []
    if args.only in (None, "abmilx"):
        print(f"ABMILX (in_dim={args.in_dim}, inner 256, 8 heads), one bag, forward+backward:", flush=True)
        sizes = sorted(set(args.sizes) | ({5000} if args.naive_max >= 5000 else set()))
        for n in sizes:
            for path in ("sdpa", "naive"):
                if path == "naive" and n > args.naive_max:
                    print(
                        f"  ABMILX N={n:>7} naive: skipped (U alone is 8 x N^2 x 4 B = {32 * n * n / 2**30:.1f} GiB)"
                    )
                    continue
                row = _run_child(
                    ["abmilx", str(n), path, "--in-dim", str(args.in_dim), "--repeats", str(args.repeats)]
                )
                _print_abmilx(row)
                rows.append(row)
    if args.only in (None, "encoder"):
        print("Encoder at 224 px, fp32, channels_last:", flush=True)
        for arch, mode, batch in [
            ("resnet18", "train", 32),
            ("resnet18", "infer", 64),
            ("resnet50", "train", 16),
            ("resnet50", "infer", 32),
        ]:
            row = _run_child(["encoder", arch, mode, str(batch), "--repeats", str(args.repeats)])
            _print_encoder(row)
            rows.append(row)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
