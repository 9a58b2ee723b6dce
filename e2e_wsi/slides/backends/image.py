"""Plain images (PNG, JPEG, non-pyramidal TIFF) read whole and downsampled in memory.

For TMA cores, small biopsies and exported regions: the file is decoded once, its levels (downsamples 1,
4, 16, ... down to a few hundred pixels) are box-filtered in memory, and regions are cut from them. Images
larger than :data:`PLAIN_IMAGE_MAX_PIXELS` are refused here (convert them to a pyramidal TIFF, or let
tiffslide read a large plain TIFF tile by tile).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from e2e_wsi.slides.backends.base import NotThisFormat, SlideBackend, source_error

# 2**28 px (16,384 x 16,384) is 0.8 GB of RGB level 0 in memory; beyond it a pyramid belongs in the file.
PLAIN_IMAGE_MAX_PIXELS = 2**28
_LEVEL_FACTOR = 4
_MIN_LEVEL_SIDE = 256
# Resolutions a microscope gives (um/px). A file resolution outside this range is a screen default
# (72 or 96 dpi is 353 or 265 um/px), not a scan's, and is ignored: the user gives --mpp.
_PLAUSIBLE_MPP = (0.05, 50.0)
_TIFF_UNIT_UM = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}  # RESUNIT inch, cm, mm, um


def _plausible(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp):
        return None
    return mpp if _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None


def _to_rgb8(array: np.ndarray) -> np.ndarray:
    """Any grey / RGB / RGBA array of 8 or 16 bits as uint8 RGB [H, W, 3]."""
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"{array.dtype} samples (expected 8- or 16-bit brightfield RGB)")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"image of shape {array.shape} is not RGB")
    return np.ascontiguousarray(array[..., :3])


def _read_tiff(path: Path) -> tuple[np.ndarray, float | None]:
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except tifffile.TiffFileError as err:
        raise NotThisFormat(f"image: TIFF that tifffile cannot parse ({err}): truncated or corrupt") from None
    with tif:
        series = tif.series[0]
        if len(series.levels) > 1:
            raise NotThisFormat("image: a pyramidal TIFF (read it with openslide or tiffslide)")
        page = series.pages[0]
        if page.is_tiled:  # tiles are for readers that fetch regions: openslide or tiffslide
            raise NotThisFormat("image: a tiled TIFF (read it with openslide or tiffslide)")
        pixels = int(page.imagewidth) * int(page.imagelength)
        if pixels > PLAIN_IMAGE_MAX_PIXELS:
            raise NotThisFormat(
                f"image: plain TIFF of {pixels:.3g} px is above the in-memory limit of "
                f"{PLAIN_IMAGE_MAX_PIXELS:.3g} px (tiffslide reads it tile by tile)"
            )
        mpp = None
        tags = page.tags
        if "XResolution" in tags and "ResolutionUnit" in tags:
            scale = _TIFF_UNIT_UM.get(int(tags["ResolutionUnit"].value))
            num, den = tags["XResolution"].value
            if scale is not None and num > 0:
                mpp = _plausible(scale * den / num)
        return _to_rgb8(page.asarray()), mpp


def _read_pillow(path: Path) -> tuple[np.ndarray, float | None]:
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size check below replaces Pillow's bomb guard
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > PLAIN_IMAGE_MAX_PIXELS:
                raise NotThisFormat(
                    f"image: {width}x{height} px is above the limit of {PLAIN_IMAGE_MAX_PIXELS:.3g} px"
                )
            dpi = img.info.get("dpi")
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise NotThisFormat(f"image: not an image Pillow reads ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    mpp = _plausible(25400.0 / float(dpi[0])) if dpi and float(dpi[0]) > 0 else None
    return rgb, mpp


class PlainImageBackend(SlideBackend):
    """PNG / JPEG through Pillow and non-pyramidal TIFF through tifffile (core dependencies)."""

    name = "image"
    extensions = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
    module = "PIL"
    formats = f"PNG, JPEG, non-pyramidal TIFF up to {PLAIN_IMAGE_MAX_PIXELS:.3g} px (read whole)"

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        path = Path(source)
        with open(path, "rb") as handle:
            tiff = handle.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
        try:
            base, self._mpp = _read_tiff(path) if tiff else _read_pillow(path)
        except NotThisFormat:
            raise
        except (ValueError, OSError) as err:
            raise source_error(
                source, "image that cannot be decoded: truncated, corrupt or not RGB", err
            ) from None
        self._levels = [base]
        while min(self._levels[-1].shape[:2]) // _LEVEL_FACTOR >= _MIN_LEVEL_SIDE:
            self._levels.append(np.asarray(Image.fromarray(self._levels[-1]).reduce(_LEVEL_FACTOR)))
        height, width = base.shape[:2]
        self._dims = tuple(
            (width // _LEVEL_FACTOR**i, height // _LEVEL_FACTOR**i) for i in range(len(self._levels))
        )
        self._levels = [lv[:h, :w] for lv, (w, h) in zip(self._levels, self._dims, strict=True)]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(_LEVEL_FACTOR**i) for i in range(len(self._levels)))

    @property
    def mpp(self) -> float | None:
        return self._mpp

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return np.ascontiguousarray(self._levels[level][y : y + height, x : x + width])

    def close(self) -> None:
        self._levels = []
