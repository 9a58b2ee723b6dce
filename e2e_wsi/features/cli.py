"""``e2e-wsi extract``: encode every cached patch once into ``FEATURES/<slide_id>.h5`` (two-stage, stage 1)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e2e_wsi.cli_common import ArgumentParser


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r} must look like i/n, e.g. 0/4") from None
    return i, n


def _default_workers(device: str) -> int:
    import torch

    on_gpu = device != "cpu" and (device != "auto" or torch.cuda.is_available())
    return 2 if on_gpu else 0


def _single_device(device: str, accelerator: str) -> str:
    """``--device``, or the device ``--accelerator`` names when ``--device`` is left at ``auto``."""
    if device != "auto" or accelerator == "auto":
        return device
    return {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu", "mps": "mps"}.get(accelerator, accelerator)


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi extract`` command line."""
    p = ArgumentParser(
        prog="e2e-wsi extract",
        description="Encode every cached patch with a patch encoder and write FEATURES/<slide_id>.h5 "
        "(datasets features [N, D] and coords [N, 2], level-0 x, y) plus summary.json. Resumable: "
        "finished slides are skipped.",
    )
    p.add_argument("--cache", type=Path, nargs="+", required=True, help="patch cache dir(s) from preprocess")
    p.add_argument("--out", type=Path, required=True, help="feature folder to write")
    p.add_argument(
        "--encoder",
        required=True,
        help="resnet18 | resnet50 | timm:NAME | hf-hub:ORG/NAME | encoder.yaml | RUN | RUN/checkpoints/x.ckpt "
        "(YAML and run configs may name only allow-listed classes: docs/security.md)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="resnet: none|imagenet|FILE (default none); timm: pretrained|FILE (hf-hub ids: pretrained)",
    )
    p.add_argument(
        "--magnification",
        type=float,
        default=None,
        help="cached magnification to encode (default: the only one cached)",
    )
    p.add_argument("--batch_size", type=int, default=64, help="patches per forward pass")
    p.add_argument("--precision", choices=("32", "16", "bf16"), default="32", help="autocast precision")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--input_size", type=int, default=None, help="resize/crop side (default: the encoder's)")
    p.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: this process's share of the slides")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="N > 1: one process per device through a Lightning Trainer (DDP), each encoding whole slides",
    )
    p.add_argument(
        "--accelerator",
        default="auto",
        help="Lightning accelerator with --devices (auto, gpu, cpu); with one device it picks --device",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers decoding patches (default: 2 on a GPU, 0 on CPU where they would compete "
        "with the encoder for the same cores)",
    )
    p.add_argument("--slides", nargs="*", default=None, help="only these slide ids")
    p.add_argument("--seed", type=int, default=0, help="seed of randomly initialised encoder weights")
    p.add_argument(
        "--pt_files",
        action="store_true",
        help="also write FEATURES/pt_files/<slide_id>.pt (features only, a plain tensor), the files CLAM's "
        "main.py and the official two-stage code read (default: off, the .h5 files only)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0)) == 0


def main(argv: list[str] | None = None) -> int:
    """Run ``e2e-wsi extract``; returns 0 when every slide is ok or skipped, 1 when some failed."""
    args = build_parser().parse_args(argv)
    import torch

    from e2e_wsi.features.extract import ExtractConfig, encoder_from_spec, extract_features

    torch.manual_seed(args.seed)  # random-init encoders: the same weights on every (resumed) run
    device = _single_device(args.device, args.accelerator)
    encoder, run_size = encoder_from_spec(args.encoder, args.weights)
    config = ExtractConfig(
        magnification=args.magnification,
        batch_size=args.batch_size,
        precision=args.precision,
        device=device,
        input_size=args.input_size or run_size,
        shard=args.shard,
        num_workers=args.workers if args.workers is not None else _default_workers(device),
        progress=not args.quiet,
        devices=args.devices,
        accelerator=args.accelerator,
        pt_files=args.pt_files,
    )
    rows = extract_features(args.cache, args.out, encoder, config, args.slides)
    if args.devices > 1 and not _is_rank_zero():
        return 1 if any(r["status"] == "failed" for r in rows) else 0  # rank 0 reports for all ranks
    failed = [r for r in rows if r["status"] == "failed"]
    done = sum(r["status"] == "ok" for r in rows)
    print(
        f"e2e-wsi extract: {done} extracted, {len(rows) - done - len(failed)} already done, {len(failed)} failed"
    )
    for r in failed:
        print(f"  {r['slide_id']}: {r['error']}", file=sys.stderr)
    print(f"e2e-wsi extract: features in {args.out.resolve()}")
    return 1 if failed else 0
