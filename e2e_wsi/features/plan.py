"""What an extraction does and its per-slide bookkeeping, shared by the single-process loop
(:mod:`e2e_wsi.features.extract`) and the multi-device one (:mod:`e2e_wsi.features.multi_device`).

Settings (:class:`ExtractConfig`), the shard's slides and what is already done (:func:`plan_extraction`),
the chunked patch dataset, the assembly of a slide's chunks and the atomic writes of files and summaries.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.data.transforms import EvalTransform
from e2e_wsi.features.store import (
    PatchGeometry,
    describe_difference,
    feature_path,
    make_provenance,
    pt_path,
    read_info,
    read_slide,
    settings_of,
    write_pt,
    write_slide,
)


@dataclass(frozen=True)
class ExtractConfig:
    """Settings of one extraction.

    Args:
        magnification: Cached magnification to encode; ``None``: the only one cached (error if several).
        batch_size: Patches per forward pass.
        precision: ``32``, ``16`` (fp16 autocast, CUDA only) or ``bf16``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
        input_size: Side the patches are resized/centre-cropped to; ``None``: the encoder's ``input_size``.
        shard: ``(i, n)``: this process encodes slides i, i + n, i + 2n ... of the sorted slide list.
        num_workers: DataLoader workers decoding JPEG patches.
        progress: Show a progress bar.
        devices: More than 1: a Lightning ``Trainer`` runs one process per device (DDP), each encoding
            whole slides; ``device`` is then unused.
        accelerator: Lightning accelerator of the multi-device run (``auto``, ``gpu``, ``cpu`` ...).
        pt_files: Also write ``pt_files/<slide_id>.pt`` (a plain float32 tensor [N, D]), the file CLAM's
            ``main.py`` and the official two-stage loader read.
    """

    magnification: float | None = None
    batch_size: int = 64
    precision: str = "32"
    device: str = "auto"
    input_size: int | None = None
    shard: tuple[int, int] = (0, 1)
    num_workers: int = 0
    progress: bool = True
    devices: int = 1
    accelerator: str = "auto"
    pt_files: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.precision not in ("32", "16", "bf16"):
            raise ValueError(f"precision {self.precision!r} must be 32, 16 or bf16")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"shard {i}/{n} must satisfy 0 <= i < n")


class _Chunks(Dataset):
    """Item k: one batch of one slide's patches, uint8 [b, 3, s, s], or the error that reading it raised."""

    def __init__(
        self, cache: PatchCache, jobs: Sequence[tuple[str, float, int]], batch: int, size: int
    ) -> None:
        self.cache = cache
        self.items = [
            (s, m, start, min(start + batch, n), n) for s, m, n in jobs for start in range(0, n, batch)
        ]
        self.transform = EvalTransform(size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        slide_id, mag, start, stop, n = self.items[k]
        last = stop == n
        try:
            patches = self.cache.get_many(slide_id, mag, range(start, stop))
            images = self.transform(torch.from_numpy(patches).permute(0, 3, 1, 2))
            return {"slide_id": slide_id, "last": last, "images": images, "error": ""}
        except Exception as err:  # one unreadable slide must not stop the others
            return {"slide_id": slide_id, "last": last, "images": torch.zeros(0), "error": repr(err)}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "16" and device.type != "cuda":
        warnings.warn("precision 16 needs a CUDA GPU; extracting in 32-bit", stacklevel=3)
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _pick_magnification(cache: PatchCache, slide_ids: Sequence[str], wanted: float | None) -> float:
    common = set.intersection(*(set(cache.magnifications(s)) for s in slide_ids)) if slide_ids else set()
    if wanted is not None:
        lacking = [s for s in slide_ids if float(wanted) not in cache.magnifications(s)]
        if lacking:
            raise ValueError(
                f"{len(lacking)} slide(s) have no patches at {wanted}x: {lacking[:20]}; "
                f"choose one of {sorted(common)} with --magnification"
            )
        return float(wanted)
    if len(common) != 1:
        raise ValueError(
            f"the cache holds several magnifications {sorted(common)}: choose one with --magnification"
        )
    return float(next(iter(common)))


def encoder_description(encoder: nn.Module) -> dict[str, Any]:
    """``encoder.describe()`` when the encoder has it, else its class and output width."""
    if hasattr(encoder, "describe"):
        return dict(encoder.describe())
    return {
        "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}",
        "out_dim": int(encoder.out_dim),
    }


def _done(path: Path, settings: dict[str, Any]) -> bool:
    """A slide already extracted with these settings is skipped; other settings in the folder are refused."""
    if not path.is_file():
        return False
    try:
        info = read_info(path)
    except ValueError:
        return False  # unreadable leftover: re-extract it
    theirs = settings_of(info.provenance)
    if theirs != settings:
        raise ValueError(
            f"{path} was extracted with other settings ({describe_difference(theirs, settings)}); "
            "write these features to another --out folder (one folder per encoder and settings)"
        )
    return True


@dataclass
class ExtractionPlan:
    """What one extraction does, and the per-slide bookkeeping shared by every way of running it.

    Attributes:
        cache: The patch cache.
        out_dir: The feature folder.
        slide_ids: Slides of this shard, sorted (the summary's rows, in order).
        magnification: The cached magnification encoded.
        input_size: Side the patches are resized/centre-cropped to.
        provenance: What is written beside the features (:func:`make_provenance`).
        shard: ``(i, n)`` of ``--shard``.
        rows: slide id -> summary row (``skipped`` until the slide is encoded).
        jobs: ``(slide_id, magnification, number of patches)`` of the slides still to encode.
        pt_files: Also write ``pt_files/<slide_id>.pt`` beside each ``.h5``.
    """

    cache: PatchCache
    out_dir: Path
    slide_ids: list[str]
    magnification: float
    input_size: int
    provenance: dict[str, Any]
    shard: tuple[int, int]
    rows: dict[str, dict[str, Any]]
    jobs: list[tuple[str, float, int]]
    pt_files: bool = False

    def geometry(self, slide_id: str) -> PatchGeometry:
        """The slide's patch geometry from its cache metadata (TRIDENT's and CLAM's attributes)."""
        meta = self.cache.meta(slide_id)
        info = meta["magnifications"][mag_key(self.magnification)]
        width, height = (int(v) for v in meta["dimensions"])
        patch, side = int(meta["patch_size"]), int(info["size_level0"])
        # objective power is always recorded by our tiler; the fallback is its own formula inverted
        power = meta.get("objective_power") or self.magnification * side / patch
        return PatchGeometry(
            patch_size=patch,
            size_level0=side,
            level0_magnification=float(power),
            target_magnification=float(self.magnification),
            level0_width=width,
            level0_height=height,
        )

    def record(
        self, slide_id: str, feats: np.ndarray | None, seconds: float, error: str, num_patches: int
    ) -> dict[str, Any]:
        """Write one encoded slide atomically (or record why it failed) and return its summary row."""
        row = self.rows[slide_id]
        row.update(num_patches=num_patches, seconds=round(seconds, 3))
        if error:
            row.update(status="failed", error=error)
            return row
        try:
            coords = self.cache.coords(slide_id, self.magnification)
            geometry = self.geometry(slide_id)
            write_slide(self.out_dir, slide_id, feats, coords, self.provenance, geometry)  # type: ignore[arg-type]
            if self.pt_files:
                write_pt(self.out_dir, slide_id, feats)  # type: ignore[arg-type]
            row["status"] = "ok"
        except Exception as err:  # NaN features (e.g. fp16 overflow), full disk ...: recorded, not fatal
            row.update(status="failed", error=str(err))
        return row

    def finish(self) -> list[dict[str, Any]]:
        """Write ``summary.json`` (or this shard's summary file) and return the rows in slide order."""
        ordered = [self.rows[s] for s in self.slide_ids]
        _write_summary(self.out_dir, ordered, self.provenance, self.shard)
        return ordered


def plan_extraction(
    cache_dir: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    encoder: nn.Module,
    config: ExtractConfig,
    slide_ids: Sequence[str] | None = None,
) -> ExtractionPlan:
    """Pick the shard's slides and magnification, build the provenance, and skip finished slides.

    Raises:
        ValueError: No common magnification, or the folder holds features made with other settings.
    """
    cache = PatchCache(cache_dir)
    ids = sorted(slide_ids) if slide_ids is not None else cache.slide_ids()
    ids = ids[config.shard[0] :: config.shard[1]]
    mag = _pick_magnification(cache, ids, config.magnification)
    size = int(config.input_size or getattr(encoder, "input_size", 0) or cache.meta(ids[0])["patch_size"])
    patch_size = int(cache.meta(ids[0])["patch_size"]) if ids else 0
    prov = make_provenance(
        encoder_description(encoder), mag, patch_size, input_size=size, precision=config.precision
    )
    settings = settings_of(prov)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {
        s: {"slide_id": s, "status": "skipped", "num_patches": 0, "seconds": 0.0, "error": ""} for s in ids
    }
    todo = [s for s in ids if not _done(feature_path(out_dir, s), settings)]
    if config.pt_files:  # a resumed run asked for .pt files now: write them from the finished .h5 files
        for s in sorted(set(ids) - set(todo)):
            if not pt_path(out_dir, s).is_file():
                write_pt(out_dir, s, read_slide(feature_path(out_dir, s))[0])
    jobs = [(s, mag, cache.count(s, mag)) for s in todo]
    for s, _, n in jobs:
        if n == 0:
            rows[s].update(status="failed", error=f"no patches at {mag}x")
    jobs = [j for j in jobs if j[2] > 0]
    return ExtractionPlan(cache, out_dir, ids, mag, size, prov, config.shard, rows, jobs, config.pt_files)


class SlideAssembler:
    """Collects a slide's feature batches (they arrive in order) until its last one.

    The first error of a slide fails the whole slide; later batches of that slide are dropped.
    """

    def __init__(self) -> None:
        self.current: str | None = None
        self.parts: list[torch.Tensor] = []
        self.error = ""
        self.start = time.perf_counter()

    def enter(self, slide_id: str) -> bool:
        """Note that a batch of ``slide_id`` is next (a new slide starts its clock).

        Returns:
            Whether ``slide_id`` already failed (its remaining batches need no encoding).
        """
        if slide_id != self.current:
            self.current, self.parts, self.error, self.start = slide_id, [], "", time.perf_counter()
        return bool(self.error)

    def add(
        self, slide_id: str, last: bool, feats: torch.Tensor | None, error: str
    ) -> tuple[str, np.ndarray | None, float, str] | None:
        """Add one batch: ``feats`` [b, D] on the CPU, or its ``error``.

        Returns:
            ``(slide_id, features [N, D] | None, seconds, error)`` after the slide's last batch, else ``None``.
        """
        self.enter(slide_id)
        if error or self.error:
            self.error = self.error or error
        elif feats is not None:
            self.parts.append(feats)
        if not last:
            return None
        out = None if self.error else torch.cat(self.parts).numpy()
        return slide_id, out, time.perf_counter() - self.start, self.error


def summary_name(shard: tuple[int, int]) -> str:
    """``summary.json``, or ``summary-shard-01-of-04.json`` for one shard of several."""
    index, count = shard
    return "summary.json" if count == 1 else f"summary-shard-{index:02d}-of-{count:02d}.json"


def _write_summary(
    out_dir: Path, rows: list[dict[str, Any]], prov: dict[str, Any], shard: tuple[int, int]
) -> None:
    summary = {
        "shard": list(shard),
        "params": prov,
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")},
        "slides": rows,
    }
    path = out_dir / summary_name(shard)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)  # readers never see a half-written summary
