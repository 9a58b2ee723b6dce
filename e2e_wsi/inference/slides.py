"""New slides for inference: tile them like the run's training slides, reusing caches that hold them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from e2e_wsi.cache.preprocess import preprocess
from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.cache.worker import PreprocessConfig, SlideJob
from e2e_wsi.inference.params import grid_rules

# Parameters that must match for a cached slide to stand in for a fresh tiling (magnifications are
# checked separately: a cache with more magnifications than inference needs is fine).
TILING_KEYS = ("format_version", "patch_size", "jpeg_quality", "tissue_threshold", "tissue")


@dataclass
class TiledSlides:
    """Where each slide's patches are, and which slides could not be tiled.

    Attributes:
        caches: slide id -> the cache holding its patches.
        reused: Slide ids taken from an existing cache instead of being tiled again.
        failures: slide id -> one-line reason.
    """

    caches: dict[str, PatchCache] = field(default_factory=dict)
    reused: set[str] = field(default_factory=set)
    failures: dict[str, str] = field(default_factory=dict)


def reusable(meta: dict, job: SlideJob, config: PreprocessConfig) -> bool:
    """Whether a cached slide is exactly what tiling ``job`` with ``config`` would give.

    Same source file, same tiling parameters (grid rules and annotations included), the same MPP
    override, and every magnification needed.
    """
    try:
        same_file = Path(meta["source_path"]).resolve() == Path(job.path).resolve()
    except (KeyError, OSError):
        return False
    wanted = config.params(job.mpp)
    have = meta.get("params") or {}
    same = (
        all(have.get(k) == wanted[k] for k in TILING_KEYS)
        and grid_rules(have) == grid_rules(wanted)
        and have.get("annotations") == wanted.get("annotations")
        and have.get("stain_normalization") == wanted.get("stain_normalization")
        and have.get("mpp_override") == wanted["mpp_override"]
    )
    mags = {mag_key(float(m)) for m in meta.get("magnifications", {})}
    return same_file and same and set(wanted["magnifications"]) <= mags


def tile_for_inference(
    jobs: Sequence[SlideJob],
    config: PreprocessConfig,
    work_cache: str | Path,
    reuse: Sequence[str | Path] = (),
    *,
    workers: int = 0,
    progress: bool = True,
) -> TiledSlides:
    """Make every slide's patches available, tiling only those no cache already holds.

    Args:
        jobs: The slides.
        config: The run's preprocessing (evaluation magnifications only).
        work_cache: Cache folder for slides that must be tiled (resumable: re-runs reuse it).
        reuse: Existing caches (e.g. the run's training cache) whose matching slides are used as they are.
        workers: Tiling processes (0 = in this process).
        progress: Show preprocessing progress.

    Returns:
        The :class:`TiledSlides`; unreadable slides are in ``failures``, never raised.
    """
    out = TiledSlides()
    todo = []
    existing = [PatchCache(c) for c in reuse if _has_lmdb(c)]
    for job in jobs:
        hit = next(
            (c for c in existing if job.slide_id in c and reusable(c.meta(job.slide_id), job, config)), None
        )
        if hit is not None:
            out.caches[job.slide_id] = hit
            out.reused.add(job.slide_id)
        else:
            todo.append(job)
    if not todo:
        return out
    rows = preprocess(todo, work_cache, config, workers=workers, overwrite=True, qc=False, progress=progress)
    fresh = PatchCache(work_cache) if any(r["status"] == "ok" for r in rows) else None
    for row in rows:
        if row["status"] == "ok":
            out.caches[row["slide_id"]] = fresh  # type: ignore[assignment]
        else:
            out.failures[row["slide_id"]] = row["reason"]
    return out


def _has_lmdb(path: str | Path) -> bool:
    try:
        PatchCache(path)
    except (FileNotFoundError, ValueError, OSError):
        return False
    return True
