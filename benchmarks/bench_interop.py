"""Benchmark of the interop paths: exported-model latency against PyTorch, and GeoJSON parse memory.

1. A ResNet-18-to-layer3 + ABMILX (8 heads) slide model with random weights is exported to ONNX and
   TorchScript (:class:`e2e_wsi.export.graph.ExportGraph`, the graph ``e2e-wsi export`` writes) and one
   bag of N uint8 patches is run through PyTorch, onnxruntime and TorchScript (best of ``--repeats``).
2. A GeoJSON of ``--geojson-mb`` MB of polygon annotations is parsed by
   :func:`e2e_wsi.annotations.geojson.read_annotations` in a child process; its peak RSS growth over the
   file size is the ratio behind ``MAX_GEOJSON_BYTES``.

Usage::

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/bench_interop.py --patches 256 --size 64 --geojson-mb 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_export(patches: int, size: int, repeats: int) -> None:
    from e2e_wsi.export.exporter import _export_onnx, _export_torchscript
    from e2e_wsi.export.graph import ExportGraph, example_input
    from e2e_wsi.export.runtime import load_exported
    from e2e_wsi.models.encoders import ResNetEncoder
    from e2e_wsi.models.module import SlideModule

    torch.manual_seed(0)
    graph = ExportGraph(SlideModule(encoder=ResNetEncoder()).eval()).eval()
    x = example_input(graph, size, patches, None)
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        with torch.no_grad():
            rows["pytorch"] = _best(lambda: graph(x), repeats)
        for fmt, export in (("onnx", _export_onnx), ("torchscript", _export_torchscript)):
            path = Path(tmp) / f"model.{fmt}"
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                export(graph, example_input(graph, size, 5, None), path)
            exported = time.perf_counter() - start
            run = load_exported(path, fmt)
            rows[fmt] = _best(lambda run=run: run(x.numpy()), repeats)
            print(f"export {fmt}: {exported:.1f} s, {path.stat().st_size / 2**20:.1f} MB")
    for name, seconds in rows.items():
        print(
            f"bag of {patches} x {size}px: {name:12s} {seconds * 1000:8.1f} ms  ({seconds / rows['pytorch']:.2f}x PyTorch)"
        )


def _parse(path: str, queue: multiprocessing.Queue) -> None:
    import threading

    import psutil

    from e2e_wsi.annotations.geojson import read_annotations

    proc = psutil.Process()
    before = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:  # ru_maxrss would include the imports' own peak
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    annotations = read_annotations(path, (10**6, 10**6))
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    queue.put((len(annotations), seconds, before // 1024, peak // 1024))


def bench_geojson(megabytes: float) -> None:
    rng = np.random.default_rng(0)
    features, size = [], 0
    while size < megabytes * 2**20:
        x, y = rng.uniform(0, 9 * 10**5, 2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 40))
        ring = [[round(x + 500 * np.cos(a), 1), round(y + 500 * np.sin(a), 1)] for a in angles]
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                   "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [1, 2, 3]}}}  # fmt: skip
        text = json.dumps(feature)
        features.append(text)
        size += len(text) + 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.geojson"
        path.write_text('{"type": "FeatureCollection", "features": [' + ",".join(features) + "]}")
        file_mb = path.stat().st_size / 2**20
        queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
        child = multiprocessing.get_context("spawn").Process(target=_parse, args=(str(path), queue))
        child.start()
        n, seconds, before, peak = queue.get()
        child.join()
    growth = (peak - before) / 1024
    print(f"GeoJSON {file_mb:.1f} MB, {n} polygons: parsed in {seconds:.1f} s, peak RSS +{growth:.0f} MB "
          f"({growth / file_mb:.1f}x the file)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patches", type=int, default=256, help="bag size (default 256)")
    parser.add_argument("--size", type=int, default=64, help="patch side in pixels (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, best kept (default 3)")
    parser.add_argument("--geojson-mb", type=float, default=20.0, help="GeoJSON size in MB (default 20)")
    parser.add_argument(
        "--only", choices=("export", "geojson"), default=None, help="run one part (default: both)"
    )
    args = parser.parse_args()
    if args.only in (None, "export"):
        bench_export(args.patches, args.size, args.repeats)
    if args.only in (None, "geojson"):
        bench_geojson(args.geojson_mb)


if __name__ == "__main__":
    main()
