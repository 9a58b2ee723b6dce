"""The one front to slides: open through a reader backend, resolve the resolution, read RGB regions.

:class:`Slide` (or :func:`open_slide`) opens a file, a DICOM folder or an fsspec URL through the backend
that reads it (:mod:`e2e_wsi.slides.backends`: OpenSlide by default, tiffslide, wsidicom, pylibCZIrw or
plain images) or the one forced with ``backend=``; the rest of the code only sees :class:`Slide`.

A slide's *native magnification* is what the scanner's objective gave (OpenSlide's
``openslide.objective-power``); its *MPP* is the size of a level-0 pixel in micrometres (``openslide.mpp-x``;
every backend reports both under these two keys). They are linked by the
usual convention ``magnification = 10 / mpp`` (0.25 um/px ~ 40x, 0.5 um/px ~ 20x). Either may be
overridden per slide (a manifest ``mpp`` column) or for the whole run (``--mpp``); an MPP override wins
over the file's metadata. A slide with neither and no override cannot be tiled at a magnification and
fails with a :class:`SlideError` saying which override to give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from e2e_wsi.slides.backends import open_backend
from e2e_wsi.slides.backends.base import SlideBackend, is_url
from e2e_wsi.slides.errors import SlideError
from e2e_wsi.slides.sources import slide_exists

# Relative slack when matching a pyramid level to a requested downsample: level sizes are rounded, so a
# "4x" level is often 3.998x or 4.002x, and we want it picked for a 4x request.
_LEVEL_SLACK = 0.01

# Refuse slides whose level 0 has more pixels than this (``--max-pixels``): the largest scans we know of
# are about 2e10 px (200,000 x 100,000); a larger claim is a damaged or hostile header.
DEFAULT_MAX_PIXELS = 3e10
# Even a level-0 of blank glass stored as JPEG tiles takes about 1 byte per 200 px (a 256 x 256 white
# tile is ~300 B at quality 50+), plus the pyramid. Ten times fewer bytes than that means the file
# cannot hold the pixels it claims (e.g. a sparse TIFF with a forged size), and reading it would decode
# a huge, empty level 0 for nothing.
_MAX_PIXELS_PER_BYTE = 2000
# Formats whose pixels live in one file (MIRAX, VMS and DICOM keep them in sibling files or folders).
_SINGLE_FILE_FORMATS = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".czi")


@dataclass(frozen=True)
class Resolution:
    """Resolution of a slide's level 0.

    Attributes:
        mpp: Micrometres per level-0 pixel.
        objective_power: Native magnification of level 0 (e.g. 40.0).
        source: Where the values came from: ``"metadata"``, ``"slide override"`` or ``"global override"``.
    """

    mpp: float
    objective_power: float
    source: str


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def resolve_resolution(
    properties: dict[str, str] | object,
    path: str | Path,
    *,
    slide_mpp: float | None = None,
    global_mpp: float | None = None,
) -> Resolution:
    """Decide a slide's MPP and native magnification.

    Priority: per-slide MPP override, then the global ``--mpp``, then the file's ``openslide.mpp-x`` and
    ``openslide.objective-power`` (one is derived from the other when only one is present).

    Args:
        properties: The slide's OpenSlide properties mapping.
        path: The slide path, for the error message.
        slide_mpp: Per-slide override (manifest ``mpp`` column), or ``None``.
        global_mpp: Run-wide override (``--mpp``), or ``None``.

    Returns:
        The resolved :class:`Resolution`.

    Raises:
        SlideError: If an override is not a positive number, or nothing gives the magnification.
    """
    for name, value in (("per-slide mpp", slide_mpp), ("--mpp", global_mpp)):
        if value is not None and _positive_float(value) is None:
            raise SlideError(
                path, f"{name} override {value!r} is not a positive number of micrometres per pixel"
            )
    if slide_mpp is not None:
        mpp = float(slide_mpp)
        return Resolution(mpp, 10.0 / mpp, "slide override")
    if global_mpp is not None:
        mpp = float(global_mpp)
        return Resolution(mpp, 10.0 / mpp, "global override")
    get = properties.get  # type: ignore[attr-defined]
    mpp_meta = _positive_float(get(openslide.PROPERTY_NAME_MPP_X))
    power = _positive_float(get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if mpp_meta is None and power is None:
        raise SlideError(
            path,
            "no magnification metadata (openslide.objective-power and openslide.mpp-x are missing); "
            "give the microns per pixel with an 'mpp' column in the manifest or --mpp",
        )
    if mpp_meta is None:
        mpp_meta = 10.0 / power  # type: ignore[operator]
    if power is None:
        power = 10.0 / mpp_meta
    return Resolution(mpp_meta, power, "metadata")


def check_dimensions(path: str | Path, dimensions: tuple[int, int], max_pixels: float | None) -> None:
    """Fail fast on a slide whose claimed size is absurd, before anything reads its pixels.

    Args:
        path: The slide file, folder or URL (the size check against the bytes runs on single local files).
        dimensions: Level-0 (width, height) the file claims.
        max_pixels: Largest accepted ``width * height`` (``None``: no limit).

    Raises:
        SlideError: If the level 0 is larger than ``max_pixels``, or a single-file slide is far too small
            to hold that many pixels.
    """
    width, height = dimensions
    pixels = float(width) * float(height)
    if max_pixels is not None and pixels > max_pixels:
        raise SlideError(
            path,
            f"claims {width:,} x {height:,} px ({pixels:.2g} px), more than --max-pixels {max_pixels:.2g}; "
            "if the slide is genuine, raise --max-pixels",
        )
    if not is_url(path) and Path(path).suffix.lower() in _SINGLE_FILE_FORMATS:
        size = Path(path).stat().st_size
        if pixels > _MAX_PIXELS_PER_BYTE * max(size, 1):
            raise SlideError(
                path,
                f"claims {width:,} x {height:,} px but the file has only {size / 1e6:.1f} MB "
                f"({pixels / max(size, 1):,.0f} px per byte; real slides need far more bytes): a damaged or "
                "forged header, or a sparse file; re-export the slide",
            )


class Slide:
    """An open whole-slide image with its resolved resolution, read through one backend.

    Args:
        path: Slide file, DICOM folder, or fsspec URL (tiffslide).
        slide_mpp: Per-slide MPP override, or ``None``.
        global_mpp: Run-wide MPP override, or ``None``.
        max_pixels: Refuse a level 0 with more pixels than this (``None``: no limit on the size; the
            check of the size against the file's bytes still runs).
        backend: Backend name to force (``--backend``), or ``None`` for the first that reads the file.

    Attributes:
        path: The source as given (a :class:`~pathlib.Path`; a URL stays a string).
        backend: Name of the backend that reads it (``"openslide"``, ``"tiffslide"``, ...).
        resolution: The resolved :class:`Resolution`.

    Raises:
        SlideError: If the source is missing, unreadable, of a format no backend reads, claims implausible
            dimensions, or has no usable magnification.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        slide_mpp: float | None = None,
        global_mpp: float | None = None,
        max_pixels: float | None = DEFAULT_MAX_PIXELS,
        backend: str | None = None,
    ) -> None:
        self.path: Path | str = path if is_url(path) else Path(path)
        if (
            not slide_exists(path) and not Path(path).is_dir()
        ):  # a folder: the backends say why it is no slide
            raise SlideError(path, "file not found (check the path column / slides folder)")
        self._reader: SlideBackend = open_backend(self.path, backend)
        self.backend = self._reader.name
        try:
            check_dimensions(self.path, self._reader.dimensions, max_pixels)
            properties = {
                openslide.PROPERTY_NAME_MPP_X: self._reader.mpp,
                openslide.PROPERTY_NAME_OBJECTIVE_POWER: self._reader.objective_power,
            }
            self.resolution = resolve_resolution(properties, path, slide_mpp=slide_mpp, global_mpp=global_mpp)
        except SlideError:
            self._reader.close()
            raise

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self._reader.dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample factor of each pyramid level."""
        return self._reader.level_downsamples

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each pyramid level."""
        return self._reader.level_dimensions

    def best_level(self, downsample: float) -> int:
        """The coarsest level that is at least as fine as ``downsample`` (with rounding slack)."""
        best = 0
        for level, level_ds in enumerate(self._reader.level_downsamples):
            if level_ds <= downsample * (1.0 + _LEVEL_SLACK):
                best = level
        return best

    def read_rgb(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """Read a region as an RGB image; pixels outside the scan are white.

        Args:
            location: Level-0 (x, y) of the top-left corner.
            level: Pyramid level to read from.
            size: (width, height) in pixels of that level.

        Returns:
            PIL RGB image of ``size``.

        Raises:
            SlideError: If the backend fails (e.g. a truncated file whose tiles cannot be decoded).
        """
        return self._reader.read_region(location, level, size)

    def read_downsampled(self, downsample: float, chunk: int = 4096) -> np.ndarray:
        """The whole slide at a given downsample, read chunk by chunk from the best level.

        Args:
            downsample: Level-0 pixels per output pixel (e.g. 16).
            chunk: Side in pixels of the pieces read from the chosen level, bounding memory.

        Returns:
            uint8 RGB array [ceil(h / downsample), ceil(w / downsample), 3].
        """
        width, height = self.dimensions
        out_w, out_h = max(1, math.ceil(width / downsample)), max(1, math.ceil(height / downsample))
        level = self.best_level(downsample)
        level_ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        scale = level_ds / downsample  # output pixels per level pixel
        canvas = Image.new("RGB", (out_w, out_h), (255, 255, 255))
        for ly in range(0, level_h, chunk):
            for lx in range(0, level_w, chunk):
                cw, ch = min(chunk, level_w - lx), min(chunk, level_h - ly)
                piece = self.read_rgb((round(lx * level_ds), round(ly * level_ds)), level, (cw, ch))
                ox, oy = round(lx * scale), round(ly * scale)
                ow = max(1, min(out_w - ox, round((lx + cw) * scale) - ox))
                oh = max(1, min(out_h - oy, round((ly + ch) * scale) - oy))
                canvas.paste(piece.resize((ow, oh), Image.Resampling.BOX), (ox, oy))
        return np.asarray(canvas)

    def close(self) -> None:
        """Release the backend's handles."""
        self._reader.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_slide(
    path: str | Path,
    backend: str | None = None,
    *,
    slide_mpp: float | None = None,
    global_mpp: float | None = None,
    max_pixels: float | None = DEFAULT_MAX_PIXELS,
) -> Slide:
    """Open a slide through ``backend`` or the first backend that reads it (see :class:`Slide`)."""
    return Slide(path, slide_mpp=slide_mpp, global_mpp=global_mpp, max_pixels=max_pixels, backend=backend)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Resolution",
    "Slide",
    "SlideError",
    "check_dimensions",
    "open_slide",
    "resolve_resolution",
]
