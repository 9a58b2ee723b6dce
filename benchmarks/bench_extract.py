"""Extraction throughput (``e2e-wsi extract``'s library loop) against the bare encoder forward.

Both run in the same process on the same batches: the bare side gets every batch pre-decoded and
pre-resized in memory and times only normalisation + encoder forward (``inference_mode``); the extraction
side is :func:`e2e_wsi.features.extract.extract_features` into a fresh folder (LMDB read, JPEG decode in
``--workers`` DataLoader workers, resize, normalise, forward, HDF5 write, summary). Runs alternate
``--repeats`` times and the median of each is reported; the target is extraction >= 0.9x bare.

Usage::

    e2e-wsi synth --task subtype --num-slides 8 --size 4096 --out /tmp/be/cohort
    e2e-wsi preprocess --manifest /tmp/be/cohort/manifest.csv --out /tmp/be/cache --magnifications 10 \\
        --patch-size 224
    .venv/bin/python benchmarks/bench_extract.py --cache /tmp/be/cache --magnification 10
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from e2e_wsi.cache.store import PatchCache  # noqa: E402
from e2e_wsi.data.transforms import EvalTransform, normalize_images  # noqa: E402
from e2e_wsi.features.extract import ExtractConfig, encoder_from_spec, extract_features  # noqa: E402


def _batches(cache: PatchCache, mag: float, size: int, batch: int) -> list[torch.Tensor]:
    """The batches extraction encodes (per slide, ``batch`` patches at a time), decoded and resized."""
    transform = EvalTransform(size)
    out = []
    for slide in cache.slide_ids():
        n = cache.count(slide, mag)
        for start in range(0, n, batch):
            patches = cache.get_many(slide, mag, range(start, min(start + batch, n)))
            out.append(transform(torch.from_numpy(patches).permute(0, 3, 1, 2)))
    return out


def bare_forward(encoder: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Seconds for normalise + forward over all batches (what extraction cannot avoid)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            encoder(normalize_images(x, encoder.mean, encoder.std))
    return time.perf_counter() - start


def extraction(cache_dir: Path, encoder: torch.nn.Module, config: ExtractConfig) -> float:
    out = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        start = time.perf_counter()
        rows = extract_features(cache_dir, out, encoder, config)
        seconds = time.perf_counter() - start
        assert all(r["status"] == "ok" for r in rows), rows
        return seconds
    finally:
        shutil.rmtree(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--magnification", type=float, default=10.0)
    p.add_argument("--encoder", default="resnet18", help="as for `e2e-wsi extract --encoder`")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    encoder, _ = encoder_from_spec(args.encoder)
    encoder.eval()
    cache = PatchCache(args.cache)
    batches = _batches(cache, args.magnification, args.input_size, args.batch_size)
    patches = sum(len(b) for b in batches)
    config = ExtractConfig(
        magnification=args.magnification,
        batch_size=args.batch_size,
        input_size=args.input_size,
        num_workers=args.workers,
        progress=False,
        device="cpu",
    )
    print(
        f"load average {Path('/proc/loadavg').read_text().split()[:3]}; torch threads {torch.get_num_threads()}"
    )
    bare_forward(encoder, batches[:1])  # warm-up
    bare, full = [], []
    for _ in range(args.repeats):
        bare.append(bare_forward(encoder, batches))
        full.append(extraction(args.cache, encoder, config))
    b, f = statistics.median(bare), statistics.median(full)
    print(
        json.dumps(
            {
                "encoder": args.encoder,
                "input_size": args.input_size,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "patches": patches,
                "bare_patches_per_s": round(patches / b, 2),
                "extract_patches_per_s": round(patches / f, 2),
                "ratio": round(b / f, 3),
                "bare_s": [round(v, 2) for v in bare],
                "extract_s": [round(v, 2) for v in full],
            }
        )
    )
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
