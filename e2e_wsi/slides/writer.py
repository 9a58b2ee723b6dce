"""Pyramidal TIFF writer (Aperio SVS, OME-TIFF or generic tiled TIFF): synthetic slides and heatmap overlays.

**Aperio SVS** (``fmt="svs"`` with metadata) follows the layout Aperio scanners write, which OpenSlide,
tifffile/tiffslide and Bio-Formats all parse the same way: page 0 is the tiled full-resolution level, page
1 a small *stripped* thumbnail, then every reduced level as an ordinary tiled page (NewSubfileType 0;
only the label and macro images of a real scan carry 1 and 9). Each page's ImageDescription starts with
``Aperio``; the first carries ``AppMag`` and ``MPP`` as ``|``-separated ``key = value`` pairs. OpenSlide
takes the tiled pages as levels and the stripped one as the ``thumbnail`` associated image; tifffile's SVS
series takes page 0 plus pages 2.. as the pyramid and page 1 as the thumbnail, so a file without the
thumbnail page loses its second level (the bug this layout fixes).

**OME-TIFF** (``fmt="ome-tiff"``): level 0 is the only top-level page, the reduced levels are its SubIFDs
(NewSubfileType 1), the OME-XML states ``PhysicalSizeX/Y`` in micrometres and the TIFF resolution tags
state the same in pixels per centimetre. tifffile, tiffslide and Bio-Formats read the pyramid from the
SubIFDs; OpenSlide (generic TIFF) sees level 0 only.

Without metadata the file is a generic tiled TIFF (levels as top-level pages, resolution unit NONE so no
reader invents an MPP), which OpenSlide opens as ``generic-tiff`` with no objective power or MPP.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

_APERIO_HEADER = "Aperio Image Library v12.0.15"
# Longest side of the Aperio thumbnail page (scanners write about 1024 x 768).
_THUMBNAIL_SIDE = 1024

TiffFormat = Literal["svs", "ome-tiff"]
TIFF_FORMATS: tuple[str, ...] = ("svs", "ome-tiff")


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


def _reduced(base: np.ndarray, factor: int, size: tuple[int, int]) -> np.ndarray:
    """Box-filtered downsample of ``base`` by an integer ``factor`` to exactly ``size`` (h, w)."""
    if factor == 1:
        return base[: size[0], : size[1]]
    pil = Image.fromarray(base)
    # reduce() averages factor x factor boxes in C; crop first so the result is exactly ``size``
    return np.asarray(pil.crop((0, 0, size[1] * factor, size[0] * factor)).reduce(factor))


def _upsampled_tiles(base: np.ndarray, factor: int, size: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
    """Tiles (row-major, edge tiles padded) of ``base`` upsampled bilinearly by ``factor``.

    Works one tile row at a time, so a level-0 image never exists in memory as a whole. For even
    factors >= 4 the band is interpolated to half the target size and then pixel-doubled: 3x faster
    than bilinear at full size and indistinguishable once a reader downsamples by 2 or more.
    """
    pil = Image.fromarray(base)
    height, width = size
    double = factor >= 4 and factor % 2 == 0 and tile % 2 == 0
    for r0 in range(0, height, tile):
        r1 = min(r0 + tile, height)
        box = (0.0, r0 / factor, width / factor, r1 / factor)
        if double:
            half = pil.resize(((width + 1) // 2, (r1 - r0 + 1) // 2), Image.Resampling.BILINEAR, box=box)
            band = np.asarray(half.resize((half.width * 2, half.height * 2), Image.Resampling.NEAREST))
            band = band[: r1 - r0, :width]
        else:
            band = np.asarray(pil.resize((width, r1 - r0), Image.Resampling.BILINEAR, box=box))
        for c0 in range(0, width, tile):
            piece = band[:, c0 : c0 + tile]
            if piece.shape[:2] != (tile, tile):
                piece = np.pad(
                    piece,
                    ((0, tile - piece.shape[0]), (0, tile - piece.shape[1]), (0, 0)),
                    constant_values=255,
                )
            yield piece


def _aperio_description(
    width: int,
    height: int,
    level_size: tuple[int, int],
    tile: int,
    quality: int,
    mpp: float | None,
    objective_power: float | None,
) -> str:
    lh, lw = level_size
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
    fmt: TiffFormat = "svs",
) -> Path:
    """Write an RGB image as a tiled, JPEG-compressed pyramidal TIFF that OpenSlide and tiffslide open.

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
        fmt: ``"svs"`` (Aperio layout; generic tiled TIFF without metadata) or ``"ome-tiff"`` (SubIFDs).

    Returns:
        The written path.

    Raises:
        ValueError: On a wrong image dtype/shape, bad downsamples, tile size, quality or format.
    """
    ds = _check_image(image, downsamples, tile, quality)
    return write_levels(
        path,
        np.ascontiguousarray(image),
        1,
        image.shape[:2],
        mpp=mpp,
        objective_power=objective_power,
        downsamples=ds,
        tile=tile,
        quality=quality,
        fmt=fmt,
    )


def write_levels(
    path: str | Path,
    base: np.ndarray,
    base_downsample: int,
    size: tuple[int, int],
    *,
    mpp: float | None,
    objective_power: float | None,
    downsamples: Sequence[int],
    tile: int,
    quality: int,
    fmt: TiffFormat = "svs",
) -> Path:
    """Write a pyramid whose pixels come from ``base``, an image at downsample ``base_downsample``.

    Levels at or below the base resolution are box-reduced from it; finer levels (e.g. level 0 of a
    slide painted at 10x) are upsampled bilinearly tile row by tile row while they are encoded.

    Args:
        path: Output file.
        base: RGB uint8 [h, w, 3] with h, w >= size / base_downsample.
        base_downsample: Downsample of ``base`` relative to level 0.
        size: Level-0 (H, W).
        mpp, objective_power, downsamples, tile, quality, fmt: As in :func:`write_pyramidal_tiff`.

    Returns:
        The written path.
    """
    _check_metadata(mpp, objective_power)
    if fmt not in TIFF_FORMATS:
        raise ValueError(f"TIFF format must be one of {list(TIFF_FORMATS)}, got {fmt!r}")
    path = Path(path)
    height, width = (int(v) for v in size)
    layout = _Layout(mpp, objective_power, (height, width), tile, quality)
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31, ome=fmt == "ome-tiff") as writer:
        for i, d in enumerate(downsamples):
            level_size = (height // d, width // d)  # floor, like scanners: exact when divisible
            data, shape = _level_pixels(base, base_downsample, d, level_size, tile)
            if fmt == "ome-tiff":
                layout.write_ome_level(writer, data, shape, i, d, len(downsamples))
            else:
                layout.write_svs_level(writer, data, shape, i, level_size)
                if i == 0 and layout.aperio:
                    layout.write_thumbnail(writer, base, base_downsample)
    return path


class _Layout:
    """How each page of one pyramid is written (the metadata and compression shared by all pages)."""

    def __init__(
        self,
        mpp: float | None,
        objective_power: float | None,
        size: tuple[int, int],
        tile: int,
        quality: int,
    ) -> None:
        self.mpp, self.objective_power, self.size, self.tile, self.quality = (
            mpp,
            objective_power,
            size,
            tile,
            quality,
        )
        self.aperio = mpp is not None or objective_power is not None
        self.common = {
            "dtype": np.uint8,
            "photometric": "rgb",
            "compression": "jpeg",
            "compressionargs": {"level": quality},
            "maxworkers": 1,  # slides are already written in parallel
        }

    def write_svs_level(
        self,
        writer: tifffile.TiffWriter,
        data: np.ndarray | Iterator[np.ndarray],
        shape: tuple[int, int, int] | None,
        index: int,
        level_size: tuple[int, int],
    ) -> None:
        """A tiled top-level page (NewSubfileType 0, as Aperio writes every level)."""
        height, width = self.size
        description = (
            _aperio_description(
                width, height, level_size, self.tile, self.quality, self.mpp, self.objective_power
            )
            if self.aperio
            else None
        )
        if not self.aperio and index > 0:
            # generic tiled TIFF: reduced levels flagged as such, the one convention generic readers share
            extra = {"subfiletype": 1}
        else:
            extra = {"subfiletype": 0}
        writer.write(
            data,
            shape=shape,
            tile=(self.tile, self.tile),
            description=description,
            metadata=None,  # no tifffile JSON description: OpenSlide would not see "Aperio"
            resolution=None,  # Aperio states MPP in the description; generic: unit NONE, no invented MPP
            **extra,
            **self.common,
        )

    def write_thumbnail(self, writer: tifffile.TiffWriter, base: np.ndarray, base_downsample: int) -> None:
        """Aperio's page 1: a small stripped JPEG of the whole slide (OpenSlide's ``thumbnail`` image)."""
        height, width = self.size
        scale = _THUMBNAIL_SIDE / max(height, width)
        thumb_size = (max(1, round(width * scale)), max(1, round(height * scale)))
        visible = Image.fromarray(base).crop((0, 0, width // base_downsample, height // base_downsample))
        thumbnail = np.asarray(visible.resize(thumb_size, Image.Resampling.BOX))
        description = f"{_APERIO_HEADER}\r\n{width}x{height} -> {thumb_size[0]}x{thumb_size[1]} - "
        writer.write(
            thumbnail,
            description=description,
            metadata=None,
            subfiletype=0,
            rowsperstrip=16,
            resolution=None,
            **self.common,
        )

    def write_ome_level(
        self,
        writer: tifffile.TiffWriter,
        data: np.ndarray | Iterator[np.ndarray],
        shape: tuple[int, int, int] | None,
        index: int,
        downsample: int,
        levels: int,
    ) -> None:
        """Level 0 as the OME image with ``levels - 1`` SubIFDs; reduced levels fill those SubIFDs."""
        kwargs: dict = {"tile": (self.tile, self.tile), **self.common}
        if self.mpp is not None:
            pixels_per_cm = 1e4 / (self.mpp * downsample)
            kwargs.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
        if index == 0:
            # A UUID from the content's name and size, not the clock: the same cohort gives the same bytes.
            height, width = self.size
            name = f"e2e-wsi:{width}x{height}:{self.mpp}:{self.quality}:{levels}"
            metadata: dict = {"axes": "YXS", "UUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name))}
            if self.mpp is not None:
                metadata.update(
                    PhysicalSizeX=self.mpp,
                    PhysicalSizeXUnit="µm",
                    PhysicalSizeY=self.mpp,
                    PhysicalSizeYUnit="µm",
                )
            writer.write(data, shape=shape, subifds=levels - 1, metadata=metadata, **kwargs)
        else:
            writer.write(data, shape=shape, subfiletype=1, metadata=None, **kwargs)


def _check_metadata(mpp: float | None, objective_power: float | None) -> None:
    if mpp is not None and not mpp > 0:
        raise ValueError(f"mpp must be positive or None, got {mpp}")
    if objective_power is not None and not objective_power > 0:
        raise ValueError(f"objective_power must be positive or None, got {objective_power}")


def _level_pixels(
    base: np.ndarray, base_downsample: int, downsample: int, level_size: tuple[int, int], tile: int
) -> tuple[np.ndarray | Iterator[np.ndarray], tuple[int, int, int] | None]:
    """The pixels of one level for ``TiffWriter.write``: ``(data, shape)``.

    A level at or below the base resolution is box-reduced into one array (``shape`` None); a finer
    one is a generator of upsampled tile rows, so level 0 of a large slide never exists in memory.
    """
    if downsample >= base_downsample and downsample % base_downsample == 0:
        return _reduced(base, downsample // base_downsample, level_size), None
    if base_downsample % downsample:
        raise ValueError(f"downsample {downsample} is not a divisor of the base downsample {base_downsample}")
    return _upsampled_tiles(base, base_downsample // downsample, level_size, tile), (*level_size, 3)


SLIDE_FORMATS: tuple[str, ...] = ("svs", "ome-tiff", "dicom")


def slide_suffix(fmt: str, with_metadata: bool = True) -> str:
    """The file suffix of a slide written in ``fmt`` (``""`` for DICOM: the slide is a folder)."""
    if fmt not in SLIDE_FORMATS:
        raise ValueError(f"slide format must be one of {list(SLIDE_FORMATS)}, got {fmt!r}")
    return {"svs": ".svs" if with_metadata else ".tif", "ome-tiff": ".ome.tif", "dicom": ""}[fmt]


def write_slide_levels(
    path: str | Path,
    base: np.ndarray,
    base_downsample: int,
    size: tuple[int, int],
    *,
    fmt: str = "svs",
    mpp: float | None,
    objective_power: float | None,
    downsamples: Sequence[int],
    tile: int,
    quality: int,
    key: str = "",
) -> Path:
    """:func:`write_levels` in any of :data:`SLIDE_FORMATS`; DICOM is a folder ``path`` of one file per level.

    DICOM is written from an Aperio TIFF next to it whose JPEG tiles are copied (then the TIFF is removed),
    so the DICOM copy has exactly the SVS's pixels. It needs ``mpp`` (DICOM requires a pixel spacing).

    Args:
        key: Seed of the DICOM UIDs (the slide id); unused by the TIFF formats.
        Others: As in :func:`write_levels`.

    Returns:
        The written file or folder.
    """
    slide_suffix(fmt)
    if fmt != "dicom":
        return write_levels(
            path, base, base_downsample, size, mpp=mpp, objective_power=objective_power,
            downsamples=downsamples, tile=tile, quality=quality, fmt=fmt,  # type: ignore[arg-type]
        )  # fmt: skip
    if mpp is None:
        raise ValueError("DICOM slides need a pixel spacing: give an mpp (synth: drop --no-metadata)")
    from e2e_wsi.slides.dicom_writer import tiff_to_dicom

    folder = Path(path)
    staging = folder.with_name(f".{folder.name}.dicom-source.svs")
    try:
        write_levels(
            staging, base, base_downsample, size, mpp=mpp, objective_power=objective_power,
            downsamples=downsamples, tile=tile, quality=quality,
        )  # fmt: skip
        tiff_to_dicom(staging, folder, mpp=mpp, key=key or folder.name)
    finally:
        staging.unlink(missing_ok=True)
    return folder
