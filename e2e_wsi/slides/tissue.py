"""CLAM-style tissue detection on a low-resolution view of a slide.

Steps (as in CLAM's ``segmentTissue``): HSV saturation, median blur, threshold (fixed or Otsu),
morphological closing, then drop small tissue regions and fill small holes while larger holes stay
background (so patches over lumens or tears are discarded). Region and hole sizes are physical
(square micrometres) so the same parameters work at any scan resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage


@dataclass(frozen=True)
class TissueParams:
    """Parameters of tissue detection (everything here changes the output, so it goes in the cache params).

    Attributes:
        seg_downsample: Downsample of the view the mask is computed on (level-0 pixels per mask pixel).
        max_side: Cap on the longest side of that view; the downsample grows for very large slides.
        saturation_threshold: Fixed HSV-saturation threshold (0-255); with ``use_otsu`` it is a floor
            under Otsu's value, so a blank slide's JPEG noise never becomes tissue.
        use_otsu: Threshold with Otsu's method (floored by ``saturation_threshold``).
        median_kernel: Median blur kernel size in mask pixels (odd).
        close_kernel: Side of the square closing element in mask pixels (0 disables closing).
        min_region_um2: Tissue regions smaller than this area (um^2) are dropped.
        min_hole_um2: Holes smaller than this area (um^2) are filled; larger holes stay background.
    """

    seg_downsample: float = 16.0
    max_side: int = 4096
    saturation_threshold: int = 8
    use_otsu: bool = False
    median_kernel: int = 7
    close_kernel: int = 4
    min_region_um2: float = 20_000.0
    min_hole_um2: float = 5_000.0

    def __post_init__(self) -> None:
        if self.median_kernel < 1 or self.median_kernel % 2 == 0:
            raise ValueError(f"median_kernel must be an odd positive integer, got {self.median_kernel}")
        if not 0 <= self.saturation_threshold <= 255:
            raise ValueError(f"saturation_threshold must be in 0..255, got {self.saturation_threshold}")
        if self.seg_downsample < 1:
            raise ValueError(f"seg_downsample must be >= 1, got {self.seg_downsample}")

    def to_dict(self) -> dict[str, float | int | bool]:
        """JSON-ready copy of the parameters."""
        return asdict(self)


@dataclass
class TissueMask:
    """A binary tissue mask and the view it was computed on.

    Attributes:
        mask: bool [h, w], True on tissue.
        downsample: Level-0 pixels per mask pixel (the same along x and y).
        thumbnail: uint8 RGB [h, w, 3], the view the mask was computed on (used for QC images).
        threshold: The saturation threshold actually applied.
    """

    mask: np.ndarray
    downsample: float
    thumbnail: np.ndarray
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def segmentation_downsample(dimensions: tuple[int, int], params: TissueParams) -> float:
    """Downsample used for the tissue view: ``seg_downsample``, larger if the view would exceed ``max_side``."""
    return max(params.seg_downsample, max(dimensions) / params.max_side)


def _filter_regions(mask: np.ndarray, min_region_px: float, min_hole_px: float) -> np.ndarray:
    """Drop small components, fill small holes, keep large holes as background."""
    labels, n = ndimage.label(mask)
    if n:
        areas = np.bincount(labels.ravel())
        keep = areas >= min_region_px
        keep[0] = False
        mask = keep[labels]
    # Holes are background components that do not touch the border.
    background, n_bg = ndimage.label(~mask)
    if n_bg:
        areas = np.bincount(background.ravel())
        border = np.unique(
            np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
        )
        small = areas < min_hole_px
        small[0] = False
        small[border] = False
        mask = mask | small[background]
    return mask


def segment_tissue(thumbnail: np.ndarray, downsample: float, mpp: float, params: TissueParams) -> TissueMask:
    """Compute the tissue mask of a low-resolution RGB view.

    Args:
        thumbnail: uint8 RGB [h, w, 3] view of the slide at ``downsample``.
        downsample: Level-0 pixels per thumbnail pixel.
        mpp: Micrometres per level-0 pixel (turns the area parameters into pixels).
        params: Detection parameters.

    Returns:
        The :class:`TissueMask`.
    """
    hsv = Image.fromarray(thumbnail, "RGB").convert("HSV")
    saturation = hsv.getchannel("S").filter(ImageFilter.MedianFilter(params.median_kernel))
    sat = np.asarray(saturation)
    threshold = float(params.saturation_threshold)
    if params.use_otsu:
        from skimage.filters import threshold_otsu  # imported here: slow import, only needed with Otsu

        threshold = max(threshold, float(threshold_otsu(sat)))
    mask = sat > threshold
    if params.close_kernel > 0:
        # Pad so closing does not erode tissue that touches the image border.
        pad = params.close_kernel
        padded = np.pad(mask, pad, mode="edge")
        closed = ndimage.binary_closing(padded, structure=np.ones((params.close_kernel,) * 2, bool))
        mask = closed[pad:-pad, pad:-pad]
    um2_per_px = (downsample * mpp) ** 2
    mask = _filter_regions(mask, params.min_region_um2 / um2_per_px, params.min_hole_um2 / um2_per_px)
    return TissueMask(mask=mask, downsample=downsample, thumbnail=thumbnail, threshold=threshold)


def tissue_fractions(mask: TissueMask, coords: np.ndarray, size_level0: int) -> np.ndarray:
    """Fraction of tissue inside square level-0 windows, from an integral image of the mask.

    Args:
        mask: The tissue mask.
        coords: int64 [n, 2] level-0 (x, y) of each window's top-left corner.
        size_level0: Window side in level-0 pixels.

    Returns:
        float64 [n], each in [0, 1]. Window edges are rounded to whole mask pixels; the part of a window
        beyond the slide's edge counts as glass.
    """
    h, w = mask.mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.mask, axis=0, dtype=np.int64), axis=1)
    ds = mask.downsample
    x0 = np.floor(coords[:, 0] / ds).astype(np.int64)
    y0 = np.floor(coords[:, 1] / ds).astype(np.int64)
    x1 = np.maximum(np.ceil((coords[:, 0] + size_level0) / ds).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.ceil((coords[:, 1] + size_level0) / ds).astype(np.int64), y0 + 1)
    area = (x1 - x0) * (y1 - y0)  # the whole window, also where it overhangs the slide
    x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def contour_overlay(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of the mask (tissue outlines and hole outlines), bool [h, w]."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def mask_area_um2(mask: TissueMask, mpp: float) -> float:
    """Tissue area in square micrometres."""
    return float(mask.mask.sum()) * (mask.downsample * mpp) ** 2


__all__ = [
    "TissueMask",
    "TissueParams",
    "contour_overlay",
    "mask_area_um2",
    "segment_tissue",
    "segmentation_downsample",
    "tissue_fractions",
]
