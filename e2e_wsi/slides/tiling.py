"""Patch grids at target magnifications, and reading a patch from the best pyramid level.

A patch of ``patch_size`` pixels at magnification ``m`` covers ``size_level0 = round(patch_size *
native / m)`` level-0 pixels. Grids are non-overlapping, start at the level-0 origin and hold only
whole patches; coordinates are level-0 (x, y) of each patch's top-left corner, so every magnification
maps back onto the same slide.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import imagecodecs
import numpy as np
from PIL import Image

from e2e_wsi.slides.reader import Slide, SlideError
from e2e_wsi.slides.tissue import TissueMask, tissue_fractions

# A target a little above the native magnification (e.g. 40x asked of a 39.6x scan) is read at level 0
# and resized; beyond this the patches would be upsampled blur, so the slide fails instead.
_MAX_UPSAMPLE = 1.05


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
    level = slide.best_level(downsample)
    read_size = max(1, round(size_level0 / slide.level_downsamples[level]))
    return GridSpec(magnification, downsample, size_level0, level, read_size)


def full_grid(dimensions: tuple[int, int], size_level0: int) -> np.ndarray:
    """All whole, non-overlapping patch positions, row-major.

    Args:
        dimensions: Level-0 (width, height).
        size_level0: Patch side in level-0 pixels.

    Returns:
        int64 [n, 2] level-0 (x, y) of each top-left corner.
    """
    width, height = dimensions
    xs = np.arange(0, width - size_level0 + 1, size_level0, dtype=np.int64)
    ys = np.arange(0, height - size_level0 + 1, size_level0, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def tissue_grid(
    dimensions: tuple[int, int], spec: GridSpec, mask: TissueMask, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Grid positions whose tissue fraction exceeds ``threshold``.

    Args:
        dimensions: Level-0 (width, height).
        spec: The magnification's grid plan.
        mask: Tissue mask of the slide.
        threshold: Minimum tissue fraction (exclusive) in [0, 1).

    Returns:
        ``(coords, fractions)``: int64 [n, 2] kept level-0 (x, y), float64 [n] their tissue fractions.
    """
    coords = full_grid(dimensions, spec.size_level0)
    if len(coords) == 0:
        return coords, np.zeros(0)
    fractions = tissue_fractions(mask, coords, spec.size_level0)
    keep = fractions > threshold
    return coords[keep], fractions[keep]


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
