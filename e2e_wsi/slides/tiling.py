"""Patch grids at target magnifications, and reading a patch from the best pyramid level.

A patch of ``patch_size`` pixels at magnification ``m`` covers ``size_level0 = round(patch_size *
native / m)`` level-0 pixels. Grids are non-overlapping and, by default, centred on the tissue's
bounding box (see docs/tiling.md for why); coordinates are level-0 (x, y) of each patch's top-left
corner, so every magnification maps back onto the same slide.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal

import imagecodecs
import numpy as np
from PIL import Image

from e2e_wsi.slides.reader import Slide, SlideError
from e2e_wsi.slides.tissue import TissueMask, tissue_fractions

# A target a little above the native magnification (e.g. 40x asked of a 39.6x scan) is read at level 0
# and resized; beyond this the patches would be upsampled blur, so the slide fails instead.
_MAX_UPSAMPLE = 1.05
# Documented limits (docs/tiling.md, "Limits"): the region read for one patch at its pyramid level is at
# most MAX_READ_SIDE pixels a side (8192^2 RGBA = 256 MB per read), and a patch may not cover more than the
# whole slide. Beyond them a magnification far below the slide's pyramid asked for gigabytes per patch.
MAX_READ_SIDE = 8192


@dataclass(frozen=True)
class GridSpec:
    """How one magnification is cut from a slide.

    Attributes:
        magnification: Target magnification (e.g. 10.0).
        downsample: Level-0 pixels per output pixel (native magnification / target).
        size_level0: Side of a patch in level-0 pixels.
        level: Pyramid level the patches are read from.
        read_size: Side of the region read at that level (resized to the patch size if it differs).
    """

    magnification: float
    downsample: float
    size_level0: int
    level: int
    read_size: int


def grid_spec(slide: Slide, magnification: float, patch_size: int) -> GridSpec:
    """Plan the reading of one magnification.

    Args:
        slide: The open slide (its resolution must be resolved).
        magnification: Target magnification.
        patch_size: Output patch side in pixels.

    Returns:
        The :class:`GridSpec`.

    Raises:
        SlideError: If the target magnification is above the slide's native one.
    """
    native = slide.resolution.objective_power
    downsample = native / magnification
    if downsample * _MAX_UPSAMPLE < 1.0:
        raise SlideError(
            slide.path,
            f"slide is {native:g}x ({slide.resolution.mpp:g} um/px) and cannot give {magnification:g}x; "
            "drop that magnification or fix the slide's mpp",
        )
    size_level0 = max(1, round(patch_size * downsample))
    width, height = slide.dimensions
    if size_level0 > max(width, height):
        raise SlideError(
            slide.path,
            f"a {patch_size}-px patch at {magnification:g}x covers {size_level0} level-0 pixels, more than the "
            f"whole {width}x{height} slide ({native:g}x): use a higher magnification or a smaller patch size",
        )
    level = slide.best_level(downsample)
    read_size = max(1, round(size_level0 / slide.level_downsamples[level]))
    if read_size > MAX_READ_SIDE:
        raise SlideError(
            slide.path,
            f"{magnification:g}x would read {read_size}x{read_size} pixels per patch from the nearest pyramid "
            f"level (downsample {slide.level_downsamples[level]:g}; the limit is {MAX_READ_SIDE}): the slide "
            "has no level near that magnification; use a higher magnification or add pyramid levels",
        )
    return GridSpec(magnification, downsample, size_level0, level, read_size)


GridAnchor = Literal["tissue", "origin"]
GRID_ANCHORS: tuple[str, ...] = ("tissue", "origin")


def full_grid(dimensions: tuple[int, int], size_level0: int) -> np.ndarray:
    """All whole, non-overlapping patch positions from the level-0 origin, row-major.

    Args:
        dimensions: Level-0 (width, height).
        size_level0: Patch side in level-0 pixels.

    Returns:
        int64 [n, 2] level-0 (x, y) of each top-left corner.
    """
    width, height = dimensions
    xs = np.arange(0, width - size_level0 + 1, size_level0, dtype=np.int64)
    ys = np.arange(0, height - size_level0 + 1, size_level0, dtype=np.int64)
    return _mesh(xs, ys)


def _mesh(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def _anchored_axis(lo: int, hi: int, extent: int, size: int) -> np.ndarray:
    """Patch starts covering ``[lo, hi)`` of an axis of length ``extent``, centred on that span.

    The grid is shifted so it ends inside the slide when it can; a patch only overhangs the slide edge
    when the span rounded up to whole patches is longer than the slide (it is then read as white glass).
    """
    n = max(1, math.ceil((hi - lo) / size))
    start = lo - (n * size - (hi - lo)) // 2
    start = max(0, min(start, extent - n * size))
    return start + size * np.arange(n, dtype=np.int64)


def tissue_bbox(mask: TissueMask, dimensions: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Level-0 ``(x0, y0, x1, y1)`` bounding box of the tissue (``None`` without tissue)."""
    rows, cols = np.any(mask.mask, axis=1), np.any(mask.mask, axis=0)
    if not rows.any():
        return None
    ds = mask.downsample
    r0, r1 = np.flatnonzero(rows)[[0, -1]]
    c0, c1 = np.flatnonzero(cols)[[0, -1]]
    width, height = dimensions
    return (
        int(c0 * ds),
        int(r0 * ds),
        min(width, math.ceil((c1 + 1) * ds)),
        min(height, math.ceil((r1 + 1) * ds)),
    )


def candidate_grid(
    dimensions: tuple[int, int], size_level0: int, mask: TissueMask, anchor: GridAnchor = "tissue"
) -> np.ndarray:
    """The non-overlapping grid patches are chosen from, row-major.

    Args:
        dimensions: Level-0 (width, height).
        size_level0: Patch side in level-0 pixels.
        mask: Tissue mask (its bounding box anchors the grid).
        anchor: ``"tissue"``: the grid is centred on the tissue bounding box, so tissue at the right and
            bottom edges is not lost to the remainder of a grid started at the origin; ``"origin"``:
            whole patches from the level-0 origin (CLAM without contours, our pre-0.2 behaviour).

    Returns:
        int64 [n, 2] level-0 (x, y) of each top-left corner.
    """
    if anchor not in GRID_ANCHORS:
        raise ValueError(f"grid anchor must be one of {list(GRID_ANCHORS)}, got {anchor!r}")
    if anchor == "origin":
        return full_grid(dimensions, size_level0)
    box = tissue_bbox(mask, dimensions)
    if box is None:
        return np.zeros((0, 2), dtype=np.int64)
    x0, y0, x1, y1 = box
    width, height = dimensions
    return _mesh(_anchored_axis(x0, x1, width, size_level0), _anchored_axis(y0, y1, height, size_level0))


def select_patches(
    fractions: np.ndarray,
    tissue_px: np.ndarray,
    threshold: float,
    min_coverage: float,
    tissue_total: float,
) -> np.ndarray:
    """Which candidate patches to keep: above ``threshold``, then the most-tissue ones until covered.

    Every patch with a tissue fraction above ``threshold`` is kept. If those hold less than
    ``min_coverage`` of the tissue, patches are added in decreasing order of tissue fraction until they
    do. For a given amount of tissue that order adds the least background (a patch's background is
    its area times ``1 - fraction``), so this is the least-background way to reach the coverage.

    Args:
        fractions: float64 [n] tissue fraction of each candidate.
        tissue_px: [n] tissue mask pixels inside each candidate (the windows do not overlap).
        threshold: Fraction (exclusive) above which a patch is always kept.
        min_coverage: Target share of the tissue inside kept patches, in [0, 1]; 0 disables.
        tissue_total: Tissue mask pixels of the whole slide.

    Returns:
        bool [n] keep mask.
    """
    keep = fractions > threshold
    if min_coverage <= 0 or tissue_total <= 0:
        return keep
    needed = min(min_coverage, 1.0) * tissue_total - float(tissue_px[keep].sum())
    if needed <= 0:
        return keep
    rest = np.flatnonzero(~keep & (tissue_px > 0))
    rest = rest[np.argsort(-fractions[rest], kind="stable")]
    gains = np.cumsum(tissue_px[rest])
    take = int(np.searchsorted(gains, needed)) + 1  # the shortest prefix that reaches the need
    keep[rest[:take]] = True
    return keep


def _windows(mask: TissueMask, coords: np.ndarray, size_level0: int) -> tuple[np.ndarray, ...]:
    """Mask-pixel rectangles ``(r0, r1, c0, c1)`` of patches, edges rounded so a grid's windows tile."""
    ds = mask.downsample
    h, w = mask.mask.shape
    c0 = np.round(coords[:, 0] / ds).astype(np.int64)
    r0 = np.round(coords[:, 1] / ds).astype(np.int64)
    c1 = np.maximum(np.round((coords[:, 0] + size_level0) / ds).astype(np.int64), c0 + 1)
    r1 = np.maximum(np.round((coords[:, 1] + size_level0) / ds).astype(np.int64), r0 + 1)
    return np.clip(r0, 0, h), np.clip(r1, 0, h), np.clip(c0, 0, w), np.clip(c1, 0, w)


def _tissue_pixels(mask: TissueMask, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """Tissue mask pixels inside each patch window, int64 [n] (integral image)."""
    h, w = mask.mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.mask, axis=0, dtype=np.int64), axis=1)
    r0, r1, c0, c1 = _windows(mask, coords, size_level0)
    return integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]


def tissue_grid(
    dimensions: tuple[int, int],
    spec: GridSpec,
    mask: TissueMask,
    threshold: float,
    *,
    min_coverage: float = 0.0,
    anchor: GridAnchor = "origin",
) -> tuple[np.ndarray, np.ndarray]:
    """Patches of one magnification chosen from a tissue mask.

    The mask is the only input about tissue: a caller who restricts tiling (annotations, exclusions)
    edits ``mask.mask`` before calling this.

    Args:
        dimensions: Level-0 (width, height).
        spec: The magnification's grid plan.
        mask: Tissue mask of the slide.
        threshold: Tissue fraction (exclusive) in [0, 1) above which a patch is always kept.
        min_coverage: Share of the tissue area the kept patches must cover (see :func:`select_patches`).
        anchor: Where the grid starts (see :func:`candidate_grid`).

    Returns:
        ``(coords, fractions)``: int64 [n, 2] kept level-0 (x, y) in row-major order, float64 [n] their
        tissue fractions.
    """
    coords = candidate_grid(dimensions, spec.size_level0, mask, anchor)
    if len(coords) == 0:
        return coords, np.zeros(0)
    fractions = tissue_fractions(mask, coords, spec.size_level0)
    pixels = _tissue_pixels(mask, coords, spec.size_level0)
    keep = select_patches(fractions, pixels, threshold, min_coverage, float(mask.mask.sum()))
    return coords[keep], fractions[keep]


def coverage_stats(mask: TissueMask, coords: np.ndarray, size_level0: int) -> tuple[float, float]:
    """How well kept patches fit the tissue, measured on the mask's pixels.

    Args:
        mask: Tissue mask of the slide.
        coords: int64 [n, 2] level-0 (x, y) of the kept patches.
        size_level0: Patch side in level-0 pixels.

    Returns:
        ``(tissue_coverage, background_share)``: share of the tissue area inside kept patches, and share
        of the kept patches' area that is not tissue (glass, holes, or beyond the slide's edge).
    """
    tissue = int(mask.mask.sum())
    if len(coords) == 0:
        return (0.0 if tissue else 1.0), 0.0
    covered = np.zeros(mask.mask.shape, dtype=bool)
    for r0, r1, c0, c1 in zip(*_windows(mask, coords, size_level0), strict=True):
        covered[r0:r1, c0:c1] = True
    inside = int((covered & mask.mask).sum())
    total_area = len(coords) * (size_level0 / mask.downsample) ** 2
    coverage = inside / tissue if tissue else 1.0
    return float(coverage), float(min(1.0, max(0.0, 1.0 - inside / total_area)))


def read_patch(slide: Slide, spec: GridSpec, xy: tuple[int, int], patch_size: int) -> Image.Image:
    """Read one patch at a magnification, resized to ``patch_size`` when the level does not match.

    Args:
        slide: The open slide.
        spec: The magnification's grid plan.
        xy: Level-0 (x, y) of the top-left corner.
        patch_size: Output side in pixels.

    Returns:
        PIL RGB image [patch_size, patch_size].
    """
    img = slide.read_rgb((int(xy[0]), int(xy[1])), spec.level, (spec.read_size, spec.read_size))
    if spec.read_size != patch_size:
        # BOX = area averaging, the right anti-aliasing for the (usual) downscale.
        img = img.resize((patch_size, patch_size), Image.Resampling.BOX)
    return img


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """JPEG-encode an RGB patch with libjpeg-turbo (imagecodecs; faster than PIL, see benchmarks)."""
    return bytes(imagecodecs.jpeg8_encode(np.asarray(img), level=quality))


def decode_jpeg(data: bytes | memoryview) -> np.ndarray:
    """Decode JPEG bytes to uint8 RGB [H, W, 3]."""
    array = imagecodecs.jpeg8_decode(data)
    if array.ndim == 2:  # grey JPEG written by another tool
        array = np.repeat(array[:, :, None], 3, axis=2)
    return array


def pil_encode_jpeg(img: Image.Image, quality: int) -> bytes:
    """PIL JPEG encoder, kept for the codec comparison in the benchmark."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
