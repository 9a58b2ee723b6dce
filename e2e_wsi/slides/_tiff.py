"""Pyramidal TIFF writer for synthetic slides (Aperio-SVS-like or generic tiled TIFF).

OpenSlide detects the Aperio vendor from the first page's ImageDescription starting with
``Aperio``; it then treats every tiled top-level page as a pyramid level (level 0 first) and reads
``AppMag`` / ``MPP`` from the ``|``-separated ``key = value`` pairs. Without that prefix a tiled
TIFF whose pages shrink is opened as ``generic-tiff``, which reports no objective power, and no MPP
as long as the resolution unit is not a physical one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

_APERIO_HEADER = "Aperio Image Library v12.0.15"


def _check_image(image: np.ndarray, downsamples: Sequence[int], tile: int, quality: int) -> list[int]:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    ds = [int(d) for d in downsamples]
    if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"downsamples must start at 1 and increase strictly, got {tuple(downsamples)}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16 (TIFF requirement), got {tile}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    height, width = image.shape[:2]
    if height < ds[-1] or width < ds[-1]:
        raise ValueError(f"image {width}x{height} is smaller than the largest downsample {ds[-1]}")
    return ds


def _pyramid(image: np.ndarray, downsamples: Sequence[int]) -> list[np.ndarray]:
    """Box-filtered pyramid levels; level sizes are floor(size / downsample) like scanners write.

    Exact downsamples (as OpenSlide reports them) need H and W divisible by every downsample.
    """
    height, width = image.shape[:2]
    levels = [image]
    pil = Image.fromarray(image)
    for d in downsamples[1:]:
        # reduce() averages d x d boxes in C; crop first so the level is exactly floor(size / d)
        cropped = pil.crop((0, 0, width // d * d, height // d * d))
        levels.append(np.asarray(cropped.reduce(d)))
    return levels


def _aperio_description(width: int, height: int, level: np.ndarray, tile: int, quality: int,
                        mpp: float | None, objective_power: float | None) -> str:
    lh, lw = level.shape[:2]
    if (lw, lh) == (width, height):
        head = f"{_APERIO_HEADER}\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    else:
        head = f"{_APERIO_HEADER}\r\n{width}x{height} -> {lw}x{lh} - ({tile}x{tile}) JPEG/RGB Q={quality}"
    fields = []
    if objective_power is not None:
        fields.append(f"AppMag = {objective_power:g}")
    fields.append("ScanScope ID = SYNTH")
    if mpp is not None:
        fields.append(f"MPP = {mpp:g}")
    return "|".join([head, *fields])


def write_pyramidal_tiff(
    path: str | Path,
    image: np.ndarray,
    *,
    mpp: float | None = 0.25,
    objective_power: float | None = 40,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    quality: int = 90,
) -> Path:
    """Write an RGB image as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide opens.

    With ``mpp`` or ``objective_power`` set, the file is Aperio-SVS-like: the first page's
    ImageDescription is ``Aperio Image Library ...|AppMag = 40|...|MPP = 0.25`` so OpenSlide reports
    the vendor ``aperio``, ``openslide.objective-power`` and ``openslide.mpp-x``/``-y``. With both
    ``None`` it is a generic tiled TIFF (vendor ``generic-tiff``) with no magnification metadata.

    Args:
        path: Output file (``.svs`` or ``.tif``); its parent must exist.
        image: Level-0 pixels, uint8 [H, W, 3] RGB. H and W should be divisible by every downsample
            for OpenSlide to report the downsamples exactly (level sizes are floor(size / d)).
        mpp: Microns per level-0 pixel, or ``None`` to omit it.
        objective_power: Scan magnification (``AppMag``), or ``None`` to omit it.
        downsamples: Pyramid levels as integer downsamples of level 0, starting at 1.
        tile: Tile edge in pixels (multiple of 16).
        quality: JPEG quality 1-100.

    Returns:
        The written path.

    Raises:
        ValueError: On a wrong image dtype/shape, bad downsamples, tile size or quality.
    """
    ds = _check_image(image, downsamples, tile, quality)
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive or None, got {mpp}")
    if objective_power is not None and not objective_power > 0:
        raise ValueError(f"objective_power must be positive or None, got {objective_power}")
    path = Path(path)
    levels = _pyramid(np.ascontiguousarray(image), ds)
    height, width = image.shape[:2]
    aperio = mpp is not None or objective_power is not None
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as writer:
        for i, level in enumerate(levels):
            description = (
                _aperio_description(width, height, level, tile, quality, mpp, objective_power)
                if aperio
                else None
            )
            writer.write(
                level,
                photometric="rgb",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                description=description,
                metadata=None,  # no tifffile JSON description: OpenSlide would not see "Aperio"
                subfiletype=0 if i == 0 else 1,  # reduced-resolution image
                resolution=None,  # resolution unit NONE: generic-tiff must not invent an MPP
                maxworkers=1,  # slides are already written in parallel
            )
    return path
