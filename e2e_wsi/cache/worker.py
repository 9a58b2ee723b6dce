"""Per-slide work of ``e2e-wsi preprocess``, run inside the worker processes.

A worker opens one slide, finds tissue, plans the grid of each magnification, reads and JPEG-encodes the
kept patches into a staging file, draws the QC image and returns the slide's metadata. It never touches
the LMDB: the single writer (the main process) commits the staged slide in one transaction.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

from e2e_wsi.annotations.geojson import AnnotationRules, annotate_tissue, write_tissue_geojson
from e2e_wsi.cache.identity import file_identity
from e2e_wsi.cache.store import FORMAT_VERSION, append_staged, mag_key
from e2e_wsi.errors import UserError
from e2e_wsi.slides.backends.base import is_url
from e2e_wsi.slides.mpp import check_mpp
from e2e_wsi.slides.reader import DEFAULT_MAX_PIXELS, Slide, SlideError, open_slide
from e2e_wsi.slides.tiling import (
    GRID_ANCHORS,
    GridAnchor,
    GridSpec,
    coverage_stats,
    encode_jpeg,
    grid_spec,
    read_patch,
    tissue_grid,
)
from e2e_wsi.slides.tissue import (
    TissueMask,
    TissueParams,
    contour_overlay,
    segment_tissue,
    segmentation_downsample,
)
from e2e_wsi.utils import DISK_FULL_ERRNOS, validate_slide_id

if TYPE_CHECKING:  # torch is imported only when a slide is stain-normalised
    from e2e_wsi.stain import StainNormalizer

MIN_MAGNIFICATION = 0.1  # documented limit (docs/tiling.md, "Limits")
_PROGRESS_EVERY = 64  # patches between progress messages (keeps queue traffic negligible)
_QC_MIN_SIDE = 768  # QC images are upscaled (nearest) to at least this longest side


class ProgressSink(Protocol):
    """Anything with ``put`` (a multiprocessing queue, or a list adapter when running inline)."""

    def put(self, item: int) -> None: ...


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings that decide the cache content (all recorded in each slide's ``params``).

    Attributes:
        magnifications: Target magnifications, e.g. ``(10.0, 5.0)``.
        patch_size: Patch side in pixels at every magnification.
        jpeg_quality: JPEG quality 1-100 of stored patches.
        tissue_threshold: A patch is always kept when its tissue fraction exceeds this (0-1).
        min_coverage: Kept patches must cover at least this share of the detected tissue; patches with
            less tissue are added, most tissue first, until they do (0 disables). See docs/tiling.md.
        grid_anchor: ``"tissue"`` centres each grid on the tissue's bounding box, ``"origin"`` starts it
            at the slide's corner.
        tissue: Tissue-detection parameters.
        mpp: Run-wide MPP override (``--mpp``), or ``None``.
        max_pixels: Slides whose level 0 has more pixels fail at once (``--max-pixels``). It decides
            which slides are cached, not what is cached, so it is not part of ``params``.
        annotations: QuPath include / exclude regions applied to the tissue mask, or ``None``.
        geojson_dir: Folder for ``<slide_id>.geojson`` tissue contours (``--geojson``), or ``None``.
        stain: Stain normaliser applied to every patch before it is stored (``--stain_normalization``),
            with the slide's own statistics from its tissue thumbnail; ``None``: patches as scanned.
        backend: Slide reader forced for every slide (``--backend``), or ``None`` for the first that reads
            each file. Backends read the same pixels (tested), so it is recorded per slide (``backend`` in the
            metadata), not part of ``params``.
    """

    magnifications: tuple[float, ...]
    patch_size: int = 256
    jpeg_quality: int = 90
    tissue_threshold: float = 0.5
    min_coverage: float = 0.95
    grid_anchor: GridAnchor = "tissue"
    tissue: TissueParams = field(default_factory=TissueParams)
    mpp: float | None = None
    max_pixels: float | None = DEFAULT_MAX_PIXELS
    annotations: AnnotationRules | None = None
    geojson_dir: str | None = None  # an output location, not a cache parameter
    stain: StainNormalizer | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        if not self.magnifications:
            raise ValueError("give at least one magnification (e.g. --magnifications 10 5)")
        keys = [mag_key(m) for m in self.magnifications]  # validates positivity
        if low := [k for k, m in zip(keys, self.magnifications, strict=True) if m < MIN_MAGNIFICATION]:
            raise UserError(
                f"--magnifications {' '.join(low)}: below the limit of {MIN_MAGNIFICATION:g}x (a 256-px patch at "
                f"{MIN_MAGNIFICATION:g}x covers 2.6 cm of tissue; docs/tiling.md, Limits)"
            )
        if len(set(keys)) != len(keys):
            raise ValueError(f"magnifications repeat: {keys}")
        if not 16 <= self.patch_size <= 4096:
            raise ValueError(f"patch size must be in 16..4096, got {self.patch_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.tissue_threshold < 1.0:
            raise ValueError(f"tissue threshold must be in [0, 1), got {self.tissue_threshold}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"min coverage must be in [0, 1], got {self.min_coverage}")
        if self.mpp is not None:
            check_mpp(self.mpp, "--mpp")
        if self.grid_anchor not in GRID_ANCHORS:
            raise ValueError(f"grid anchor must be one of {list(GRID_ANCHORS)}, got {self.grid_anchor!r}")

    def params(self, slide_mpp: float | None) -> dict[str, Any]:
        """JSON-ready parameters for one slide; equal dicts mean an identical cache entry."""
        return {
            "format_version": FORMAT_VERSION,
            "patch_size": self.patch_size,
            "magnifications": [mag_key(m) for m in self.magnifications],
            "jpeg_quality": self.jpeg_quality,
            "tissue_threshold": self.tissue_threshold,
            "min_coverage": self.min_coverage,
            "grid_anchor": self.grid_anchor,
            "tissue": self.tissue.to_dict(),
            "mpp_override": slide_mpp if slide_mpp is not None else self.mpp,
            **({"annotations": self.annotations.to_dict()} if self.annotations else {}),
            **({"stain_normalization": self.stain.to_dict()} if self.stain else {}),
        }


@dataclass(frozen=True)
class SlideJob:
    """One slide to preprocess.

    Attributes:
        slide_id: Id from the manifest or file name (validated by the worker, may be bad).
        path: Slide file, DICOM folder, or fsspec URL (a string).
        mpp: Per-slide MPP override, or ``None``.
        origin: Where the job came from, for messages (e.g. ``manifest.csv line 3``).
    """

    slide_id: str
    path: Path | str
    mpp: float | None = None
    origin: str = ""


def process_slide(
    job: SlideJob,
    config: PreprocessConfig,
    staging_dir: Path,
    qc_dir: Path | None,
    progress: ProgressSink | None,
) -> dict[str, Any]:
    """Preprocess one slide into a staging file; never raises for a bad slide.

    Args:
        job: The slide.
        config: Run settings.
        staging_dir: Where ``<slide_id>.bin`` (length-prefixed JPEGs, magnification by magnification) goes.
        qc_dir: Where ``<slide_id>.png`` goes, or ``None`` to skip QC images.
        progress: Receives patch counts as they are encoded.

    Returns:
        ``{"slide_id", "path", "status": "ok", "meta", "staging", "seconds"}`` or
        ``{"slide_id", "path", "status": "failed", "reason", "seconds"}``.
    """
    start = time.perf_counter()
    record: dict[str, Any] = {"slide_id": job.slide_id, "path": str(job.path)}
    try:
        slide_id = validate_slide_id(job.slide_id)
        with open_slide(
            job.path, config.backend, slide_mpp=job.mpp, global_mpp=config.mpp, max_pixels=config.max_pixels
        ) as slide:
            meta, staging = _tile_slide(slide, slide_id, job, config, staging_dir, qc_dir, progress)
        record.update(status="ok", meta=meta, staging=str(staging))
    except SlideError as err:
        record.update(status="failed", reason=err.reason)
    except ValueError as err:  # invalid slide id
        record.update(status="failed", reason=" ".join(str(err).split()))
    except Exception as err:  # noqa: BLE001 - one bad slide must never stop the batch
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            record.update(
                status="failed",
                disk_full=True,  # preprocess stops: every later slide would fail alike
                reason=f"cannot write {err.filename or staging_dir} ({err.strerror}): free disk space in "
                "the cache folder and re-run preprocess (slides already committed are kept and skipped)",
            )
        else:
            record.update(
                status="failed", reason=f"unexpected {type(err).__name__}: {' '.join(str(err).split())}"
            )
    record["seconds"] = round(time.perf_counter() - start, 3)
    return record


Grid = tuple[np.ndarray, np.ndarray]  # (coords int64 [n, 2], tissue fractions float64 [n])


def _tile_slide(
    slide: Slide,
    slide_id: str,
    job: SlideJob,
    config: PreprocessConfig,
    staging_dir: Path,
    qc_dir: Path | None,
    progress: ProgressSink | None,
) -> tuple[dict[str, Any], Path]:
    """Detect tissue, plan the grids, stage the patches and draw the QC image of one open slide."""
    identity = file_identity(job.path)  # before reading: a file replaced meanwhile is re-tiled next time
    tissue = detect_tissue(slide, config.tissue)
    # QuPath include/exclude regions edit the mask; tissue contours go out as GeoJSON (e2e_wsi.annotations).
    if config.annotations is not None:
        tissue = annotate_tissue(tissue, slide_id, slide.dimensions, config.annotations)
        if not tissue.mask.any():
            rules = config.annotations
            raise SlideError(
                slide.path,
                f"annotation removed all tissue: the regions of {rules.file_for(slide_id)} (include "
                f"{list(rules.include)}, exclude {list(rules.exclude)}) leave none of the detected tissue; check "
                "the file's classes and coordinates, or --include-classes/--exclude-classes",
            )
    if config.geojson_dir is not None:
        write_tissue_geojson(tissue, Path(config.geojson_dir) / f"{slide_id}.geojson")
    specs = [grid_spec(slide, m, config.patch_size) for m in config.magnifications]
    grids = plan_grids(slide, specs, tissue, config)
    stats = [
        coverage_stats(tissue, coords, spec.size_level0)
        for spec, (coords, _) in zip(specs, grids, strict=True)
    ]
    staging = staging_dir / f"{slide_id}.bin"
    _stage_patches(slide, specs, grids, config, staging, progress, _patch_normaliser(config, tissue))
    if qc_dir is not None:
        _write_qc(qc_dir / f"{slide_id}.png", tissue, grids[0][0], specs[0], stats[0])
    meta = _slide_meta(slide, slide_id, job, config, tissue, specs, grids, stats)
    return {**meta, "source_identity": identity}, staging


def detect_tissue(slide: Slide, params: TissueParams) -> TissueMask:
    """The slide's tissue mask; raises :class:`SlideError` when there is none."""
    seg_ds = segmentation_downsample(slide.dimensions, params)
    tissue = segment_tissue(slide.read_downsampled(seg_ds), seg_ds, slide.resolution.mpp, params)
    if not tissue.mask.any():
        raise SlideError(
            slide.path,
            f"no tissue found (HSV saturation never above {tissue.threshold:g}); check the slide or "
            "lower --saturation_threshold",
        )
    return tissue


def plan_grids(
    slide: Slide, specs: list[GridSpec], tissue: TissueMask, config: PreprocessConfig
) -> list[Grid]:
    """Kept patches of each magnification; raises :class:`SlideError` when none is kept at all."""
    grids = [
        tissue_grid(
            slide.dimensions,
            spec,
            tissue,
            config.tissue_threshold,
            min_coverage=config.min_coverage,
            anchor=config.grid_anchor,
        )
        for spec in specs
    ]
    if sum(len(coords) for coords, _ in grids) == 0:
        raise SlideError(
            slide.path,
            f"no patch has a tissue fraction above {config.tissue_threshold:g} (tissue covers "
            f"{tissue.fraction:.2%} of the slide); lower --tissue-threshold if this is expected",
        )
    return grids


def _stage_patches(
    slide: Slide,
    specs: list[GridSpec],
    grids: list[Grid],
    config: PreprocessConfig,
    staging: Path,
    progress: ProgressSink | None,
    normalise: Any = None,
) -> None:
    """Read and JPEG-encode every kept patch into the staging file, magnification by magnification.

    ``normalise`` (uint8 [H, W, 3] -> uint8 [H, W, 3]) recolours each patch first (stain normalisation).
    """
    pending = 0
    with open(staging, "wb") as handle:
        for spec, (coords, _) in zip(specs, grids, strict=True):
            for xy in coords:
                patch = read_patch(slide, spec, xy, config.patch_size)
                if normalise is not None:
                    patch = Image.fromarray(normalise(np.asarray(patch.convert("RGB"))))
                append_staged(handle, encode_jpeg(patch, config.jpeg_quality))
                pending += 1
                if progress is not None and pending == _PROGRESS_EVERY:
                    progress.put(pending)
                    pending = 0
    if progress is not None and pending:
        progress.put(pending)


def _patch_normaliser(config: PreprocessConfig, tissue: TissueMask) -> Any:
    """The slide's patch recolouring (its statistics from the tissue thumbnail), or ``None``."""
    if config.stain is None:
        return None
    import torch

    pixels = tissue.thumbnail[tissue.mask]
    if len(pixels) < 16:
        raise ValueError("stain normalisation: too little tissue on the thumbnail to estimate the stains")
    stain, source = config.stain, config.stain.source_stats(pixels)

    def normalise(patch: np.ndarray) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(patch)).permute(2, 0, 1)[None]
        return stain.apply(images, source)[0].permute(1, 2, 0).numpy()

    return normalise


def _slide_meta(
    slide: Slide,
    slide_id: str,
    job: SlideJob,
    config: PreprocessConfig,
    tissue: TissueMask,
    specs: list[GridSpec],
    grids: list[Grid],
    stats: list[tuple[float, float]],
) -> dict[str, Any]:
    """The slide's JSON metadata (see docs/architecture.md)."""
    res = slide.resolution
    return {
        "format_version": FORMAT_VERSION,
        "slide_id": slide_id,
        # Absolute, so heatmaps and QC find the slide from any working directory.
        "source_path": str(job.path) if is_url(job.path) else str(Path(job.path).resolve()),
        "mpp": res.mpp,
        "objective_power": res.objective_power,
        "resolution_source": res.source,
        "backend": slide.backend,  # absent in caches written before reader backends: OpenSlide read those
        "dimensions": list(slide.dimensions),
        "patch_size": config.patch_size,
        "magnifications": {
            mag_key(spec.magnification): {
                "count": len(coords),
                "size_level0": spec.size_level0,
                "downsample": spec.downsample,
                "level": spec.level,
                "tissue_coverage": round(coverage, 4),
                "background_share": round(background, 4),
                "coords": coords.tolist(),
                "tissue_fractions": np.round(fractions, 4).tolist(),
            }
            for spec, (coords, fractions), (coverage, background) in zip(specs, grids, stats, strict=True)
        },
        "tissue_fraction": round(tissue.fraction, 6),
        "params": config.params(job.mpp),
    }


def _write_qc(
    path: Path, tissue: TissueMask, coords: np.ndarray, spec: GridSpec, stats: tuple[float, float]
) -> None:
    """Thumbnail with tissue outlines (green), the first magnification's kept patches (blue) and its
    coverage figures written in the top-left corner."""
    thumbnail = tissue.thumbnail
    scale = max(1, math.ceil(_QC_MIN_SIDE / max(thumbnail.shape[:2])))
    image = Image.fromarray(thumbnail).resize(
        (thumbnail.shape[1] * scale, thumbnail.shape[0] * scale), Image.Resampling.NEAREST
    )
    outline = np.asarray(
        Image.fromarray(contour_overlay(tissue.mask)).resize(image.size, Image.Resampling.NEAREST)
    )
    pixels = np.array(image)
    pixels[outline] = (0, 200, 0)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    factor = scale / tissue.downsample
    side = spec.size_level0 * factor
    for x, y in coords:
        draw.rectangle([x * factor, y * factor, x * factor + side, y * factor + side], outline=(30, 60, 220))
    coverage, background = stats
    text = (
        f"{mag_key(spec.magnification)}x: {len(coords)} patches, tissue covered {coverage:.1%}, "
        f"background {background:.1%}"
    )
    box = draw.textbbox((6, 6), text)
    draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=(255, 255, 255))
    draw.text((6, 6), text, fill=(0, 0, 0))
    image.save(path)
