"""Overlapping-patch attention heatmaps (CLAM-style) and a zoomable high-resolution overlay.

The cache holds a non-overlapping grid, so a heatmap drawn from it is a chessboard of flat squares. Here
patches are read again from the slide itself on a grid whose stride is ``(1 - overlap)`` of a patch, at
the run's magnification and patch size and only on tissue (:func:`overlap_grid`); the model scores them
(:func:`e2e_wsi.inference.attention.overlap_attention`, not here: this module only draws), and each
output pixel gets the mean of the (rank-normalised) attention of every patch that covers it: sum of
weights / coverage. The result is a smooth map at any resolution.

Outputs per slide: the figure PNG (thumbnail + smooth map + top patches, caption for people), a
pyramidal TIFF overlay at a higher resolution that OpenSlide and QuPath open, and a localisation JSON
(patch- and pixel-level AUROC) when a ground-truth mask exists.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from e2e_wsi.evaluation.metrics import binary_auroc
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.tissue import TissueMask, tissue_fractions
from e2e_wsi.slides.writer import write_pyramidal_tiff
from e2e_wsi.viz.heatmap import (
    AttentionMap,
    HeatmapOptions,
    format_caption,
    localization_summary,
    normalize_scores,
    patch_lesion_labels,
    render_heatmap,
)

# Longest side of the high-resolution overlay TIFF: 4096 px keeps the RGB image, the blended map and
# its coverage under ~0.4 GB while still being ~3x finer than the PNG figure's thumbnail.
OVERLAY_MAX_SIDE = 4096


# ------------------------------------------------------------------------------------------ pure parts
def overlap_stride(size_level0: int, overlap: float) -> int:
    """Grid step in level-0 pixels for patches of ``size_level0`` overlapping by ``overlap``.

    Raises:
        ValueError: Unless ``0 <= overlap < 1``.
    """
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1) (e.g. 0.5-0.9), got {overlap}")
    return max(1, round(size_level0 * (1.0 - overlap)))


def overlap_grid(
    dimensions: tuple[int, int], size_level0: int, stride: int, tissue: TissueMask, threshold: float
) -> np.ndarray:
    """Overlapping patch positions whose tissue fraction exceeds ``threshold``.

    Args:
        dimensions: Level-0 (width, height).
        size_level0: Patch side in level-0 pixels.
        stride: Step between neighbouring patches in level-0 pixels.
        tissue: The slide's tissue mask.
        threshold: Minimum tissue fraction (exclusive), as used when the cache was built.

    Returns:
        int64 [N, 2] level-0 (x, y) of each kept patch's top-left corner, row-major.
    """
    width, height = dimensions
    xs = np.arange(0, width - size_level0 + 1, stride, dtype=np.int64)
    ys = np.arange(0, height - size_level0 + 1, stride, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    if len(coords) == 0:
        return coords
    return coords[tissue_fractions(tissue, coords, size_level0) > threshold]


def blend_patch_values(
    coords: np.ndarray,
    values: np.ndarray,
    size_level0: int,
    dimensions: tuple[int, int],
    out_shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Blend per-patch values into a per-pixel map: sum of the covering patches' values / coverage.

    Each patch is a box of output pixels (its level-0 square scaled to ``out_shape``); a pixel's value
    is the mean of the values of all boxes that contain it. Done with summed-area (difference) arrays,
    so the cost is O(N + h * w) whatever the overlap.

    Args:
        coords: [N, 2] level-0 (x, y) of each patch's top-left corner.
        values: [N] value of each patch (e.g. rank-normalised attention in [0, 1]).
        size_level0: Patch side in level-0 pixels.
        dimensions: Level-0 (width, height) of the slide.
        out_shape: (h, w) of the output map.

    Returns:
        ``(blended, coverage)``: float64 [h, w] blended values (NaN where no patch lies) and int64
        [h, w] the number of patches covering each pixel.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(coords) != len(values):
        raise ValueError(f"{len(coords)} patch coordinates but {len(values)} values")
    h, w = (int(v) for v in out_shape)
    sx, sy = w / dimensions[0], h / dimensions[1]
    x0 = np.clip(np.rint(coords[:, 0] * sx).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.rint(coords[:, 1] * sy).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.rint((coords[:, 0] + size_level0) * sx).astype(np.int64), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.rint((coords[:, 1] + size_level0) * sy).astype(np.int64), y0 + 1), 1, h)
    total = _box_sum((h, w), x0, y0, x1, y1, values)
    coverage = np.rint(_box_sum((h, w), x0, y0, x1, y1, np.ones(len(values)))).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        blended = np.where(coverage > 0, total / np.maximum(coverage, 1), np.nan)
    return blended, coverage


def _box_sum(
    shape: tuple[int, int], x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, v: np.ndarray
) -> np.ndarray:
    """[h, w] sum of ``v`` over the boxes [y0:y1, x0:x1] via a 2-D difference array."""
    h, w = shape
    diff = np.zeros((h + 1, w + 1), dtype=np.float64)
    np.add.at(diff, (y0, x0), v)
    np.add.at(diff, (y0, x1), -v)
    np.add.at(diff, (y1, x0), -v)
    np.add.at(diff, (y1, x1), v)
    np.cumsum(diff, axis=0, out=diff)
    np.cumsum(diff, axis=1, out=diff)
    return diff[:h, :w]


def pixel_localization(blended: np.ndarray, truth: np.ndarray) -> dict:
    """Pixel-level lesion-localisation AUROC of a blended map against a ground-truth mask.

    Only pixels that are tissue in the truth (value > 0) and covered by at least one patch count.

    Args:
        blended: [h, w] blended attention (NaN where uncovered), at the truth mask's resolution.
        truth: [h, w] uint8 (0 background, 128 tissue, 255 lesion).

    Returns:
        ``pixel_auroc`` (``None`` when the counted pixels are all lesion or all not),
        ``n_pixels``, ``n_lesion_pixels``.
    """
    if blended.shape != truth.shape:
        raise ValueError(f"map {blended.shape} and truth mask {truth.shape} differ in shape")
    counted = np.isfinite(blended) & (truth > 0)
    lesion = truth[counted] == 255
    n_lesion = int(lesion.sum())
    defined = 0 < n_lesion < lesion.size
    auc = float(binary_auroc(lesion, blended[counted])[0]) if defined else None
    return {"pixel_auroc": auc, "n_pixels": int(lesion.size), "n_lesion_pixels": n_lesion}


def compose_overlay(
    rgb: np.ndarray, values: np.ndarray, cmap: str = "jet", alpha: float = 0.45, band: int = 512
) -> np.ndarray:
    """Colour-map ``values`` over ``rgb`` where they are finite; the tissue shows through elsewhere.

    Args:
        rgb: uint8 [h, w, 3] slide image.
        values: [h, w] values in [0, 1], NaN where no patch lies.
        cmap: Matplotlib colour map.
        alpha: Opacity of the colours.
        band: Rows processed at once (bounds the float temporaries).

    Returns:
        uint8 [h, w, 3].
    """
    import matplotlib

    colours = matplotlib.colormaps[cmap]
    out = rgb.copy()
    for r0 in range(0, rgb.shape[0], band):
        v = values[r0 : r0 + band]
        covered = np.isfinite(v)
        mapped = colours(np.nan_to_num(v), bytes=True)[..., :3].astype(np.float32)
        mixed = (1 - alpha) * rgb[r0 : r0 + band].astype(np.float32) + alpha * mapped
        out[r0 : r0 + band][covered] = np.clip(np.rint(mixed[covered]), 0, 255).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------- file outputs
def tissue_at(tissue: TissueMask, shape: tuple[int, int]) -> np.ndarray:
    """The tissue mask resampled (nearest) to ``shape`` (h, w): bool [h, w]."""
    image = Image.fromarray(tissue.mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 0


def blended_on_tissue(
    att: AttentionMap, values: np.ndarray, shape: tuple[int, int], tissue: TissueMask | None
) -> np.ndarray:
    """[h, w] blended map of ``values`` (see :func:`blend_patch_values`), NaN off tissue and off patches.

    Patches reach past the tissue edge (they need only ``tissue_threshold`` of tissue), so the map is
    clipped to the tissue mask: background never gets a colour.
    """
    blended = blend_patch_values(att.coords, values, att.size_level0, att.dimensions, shape)[0]
    if tissue is not None:
        blended[~tissue_at(tissue, shape)] = np.nan
    return blended


def overlay_downsample(dimensions: tuple[int, int], max_side: int = OVERLAY_MAX_SIDE) -> int:
    """Smallest power-of-two downsample whose image has its longest side within ``max_side``."""
    return 2 ** max(0, math.ceil(math.log2(max(dimensions) / max_side)))


def write_overlay_tiff(
    path: str | Path,
    slide: Slide,
    att: AttentionMap,
    values: np.ndarray,
    tissue: TissueMask | None = None,
    *,
    max_side: int = OVERLAY_MAX_SIDE,
    cmap: str = "jet",
    alpha: float = 0.45,
) -> Path:
    """Write the blended attention over the tissue as a pyramidal TIFF (OpenSlide / QuPath open it).

    The image is the slide at :func:`overlay_downsample` with the colour map blended in; its MPP and
    magnification are the slide's scaled by that downsample, so QuPath shows real micrometres. Written
    to a temporary file and renamed, so a killed job never leaves half a TIFF.

    Args:
        path: Output ``.tif``.
        slide: The open slide.
        att: The slide's overlapping-patch attention.
        values: [N] per-patch values in [0, 1] (e.g. rank-normalised attention).
        tissue: Tissue mask to clip the colours to, or ``None``.
        max_side: Cap on the overlay's longest side in pixels.
        cmap, alpha: Colour map and its opacity.

    Returns:
        The written path.
    """
    ds = overlay_downsample(slide.dimensions, max_side)
    rgb = slide.read_downsampled(ds)
    blended = blended_on_tissue(att, values, rgb.shape[:2], tissue)
    image = compose_overlay(rgb, blended, cmap, alpha)
    del rgb, blended
    levels = [d for d in (1, 4, 16, 64) if min(image.shape[:2]) // d >= 256] or [1]
    res = slide.resolution
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write_pyramidal_tiff(
            tmp, image, mpp=res.mpp * ds, objective_power=res.objective_power / ds, downsamples=levels
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class OverlapHeatmapFiles:
    """What :func:`make_overlap_heatmap` wrote and found.

    Attributes:
        png: The figure.
        overlay: The high-resolution pyramidal TIFF overlay.
        localization: The localisation JSON, or ``None`` without a truth mask.
        caption: The figure's caption (prediction, localisation AUROC).
        summary: Localisation numbers (patch- and pixel-level), or ``None``.
        n_patches: Overlapping patches scored.
        seconds: Wall time of each step: ``read``, ``model`` (see :class:`OverlapAttention`),
            ``figure`` (blending, thumbnail, PNG) and ``overlay`` (the TIFF).
    """

    png: Path
    overlay: Path
    localization: Path | None
    caption: str
    summary: dict | None
    n_patches: int
    seconds: dict[str, float] = field(default_factory=dict)


def draw_overlap_heatmap(
    att: AttentionMap,
    slide: Slide,
    out_dir: str | Path,
    *,
    tissue: TissueMask | None,
    stride: int,
    overlap: float,
    prediction: Mapping[str, np.ndarray],
    top: np.ndarray,
    truth: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    options: HeatmapOptions = HeatmapOptions(),  # noqa: B008 - frozen dataclass, safe default
    thumbnail_side: int = 1400,
) -> OverlapHeatmapFiles:
    """Draw an overlapping-patch heatmap: figure PNG, overlay TIFF and (with a truth) localisation JSON.

    Args:
        att: Attention over the overlapping patches (:func:`e2e_wsi.inference.attention.overlap_attention`).
        slide: The open slide (thumbnail and overlay background).
        out_dir: Output folder.
        tissue: Tissue mask the maps are clipped to, or ``None``.
        stride: Grid step of the patches in level-0 pixels (recorded in the localisation JSON).
        overlap: Share of a patch shared with its neighbour (for the title).
        prediction: The slide's prediction to caption (``probs`` [K] or ``risk``).
        top: uint8 [k, p, p, 3] patches with the highest attention, best first.
        truth: Ground-truth mask, uint8 [h, w] (255 = lesion, 0 = background), or ``None``.
        class_names: Names of the classes for the caption.
        options: Colour normalisation (blending uses it too: ``rank`` as CLAM) and per-head maps.
        thumbnail_side: Longest side of the figure's thumbnail.

    Returns:
        The :class:`OverlapHeatmapFiles` (``seconds``: ``figure`` and ``overlay``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    values = normalize_scores(att.merged, options.method)
    summary = None
    localisation: dict[str, float | None] = {}
    if truth is not None:
        labels = patch_lesion_labels(att.coords, att.size_level0, truth, att.dimensions)
        blended, _ = blend_patch_values(att.coords, values, att.size_level0, att.dimensions, truth.shape)
        summary = {**localization_summary(att, labels), **pixel_localization(blended, truth)}
        summary.update(overlap=overlap, stride_level0=stride)
        localisation = {"pixel": summary["pixel_auroc"], "patch": summary["auroc"]}
    caption = format_caption(prediction, class_names, localisation or None)
    t0 = time.perf_counter()
    scale = thumbnail_side / max(slide.dimensions)
    thumbnail = slide.read_downsampled(1.0 / scale) if scale < 1 else slide.read_downsampled(1.0)
    png = render_heatmap(
        att,
        thumbnail,
        top,
        out_dir / f"{att.slide_id}.png",
        method=options.method,
        per_head=options.per_head,
        caption=caption,
        rasterize=lambda a, v, shape: blended_on_tissue(a, v, shape, tissue),
        title=f"{att.slide_id}: attention on {len(att.coords)} patches overlapping by {overlap:g}",
    )
    t1 = time.perf_counter()
    overlay = write_overlay_tiff(out_dir / f"{att.slide_id}.overlay.tif", slide, att, values, tissue)
    seconds = {"figure": t1 - t0, "overlay": time.perf_counter() - t1}
    loc_path = None
    if summary is not None:
        loc_path = out_dir / f"{att.slide_id}.localization.json"
        tmp = loc_path.with_name(f".{loc_path.name}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, loc_path)
    return OverlapHeatmapFiles(png, overlay, loc_path, caption, summary, len(att.coords), seconds)
