"""pylibCZIrw: Zeiss CZI slides, all scenes on their common plane, read through libCZI's pyramid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from e2e_wsi.slides.backends.base import NotThisFormat, SlideBackend, source_error

# Levels offered: downsamples 1, 4, 16, ... while the level keeps at least this many pixels on its
# shorter side. libCZI answers a zoomed read from the file's own pyramid tiles where the file has them.
_LEVEL_FACTOR = 4
_MIN_LEVEL_SIDE = 256
_CZI_MAGIC = b"ZISRAWFILE"


def _find(tree: Any, *keys: str) -> Any:
    """``tree[k0][k1]...`` of the parsed XML metadata, or ``None`` when any step is missing."""
    for key in keys:
        if isinstance(tree, list):
            tree = tree[0] if tree else None
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _scaling_um(metadata: dict) -> float | None:
    """Micrometres per pixel along X from ``Metadata/Scaling/Items/Distance[@Id=X]`` (metres there)."""
    items = _find(metadata, "ImageDocument", "Metadata", "Scaling", "Items", "Distance")
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, dict) and item.get("@Id") == "X":
            try:
                metres = float(item.get("Value"))
            except (TypeError, ValueError):
                return None
            return metres * 1e6 if metres > 0 and math.isfinite(metres) else None
    return None


def _objective(metadata: dict) -> float | None:
    value = _find(
        metadata, "ImageDocument", "Metadata", "Information", "Instrument", "Objectives", "Objective",
        "NominalMagnification",
    )  # fmt: skip
    try:
        power = float(value)
    except (TypeError, ValueError):
        return None
    return power if power > 0 else None


class CziBackend(SlideBackend):
    """Zeiss CZI through ``pylibCZIrw`` (``pip install 'e2e-wsi[czi]'``).

    Every scene is kept where the scanner placed it on the slide's plane (one slide = the bounding box of
    all scenes, glass between them white); channel 0 of an RGB (Bgr24/Bgr48) image is read. Levels are
    virtual: libCZI builds a zoomed read from the file's pyramid subblocks when present, else from level 0.
    """

    name = "czi"
    extensions = (".czi",)
    module = "pylibCZIrw"
    extra = "czi"
    formats = "Zeiss CZI (all scenes, RGB brightfield)"

    def __init__(self, source: str | Path) -> None:
        from pylibCZIrw import czi

        self.source = str(source)
        with open(source, "rb") as handle:
            if handle.read(16)[: len(_CZI_MAGIC)] != _CZI_MAGIC:
                raise NotThisFormat("pylibCZIrw: not a CZI file")
        try:
            self._doc = czi.CziReader(self.source)
            self._box = self._doc.total_bounding_rectangle
            self._metadata = self._doc.metadata
        except Exception as err:  # noqa: BLE001 - libCZI raises RuntimeError for anything
            raise source_error(source, "CZI file libCZI cannot open: damaged or unsupported", err) from None
        pixel = self._doc.pixel_types.get(0, "")
        if not pixel.startswith("Bgr"):
            self.close()
            raise source_error(
                source, "unsupported CZI", ValueError(f"channel 0 is {pixel}, not RGB brightfield")
            )
        width, height = int(self._box.w), int(self._box.h)
        downsamples = [1]
        while min(width, height) / (downsamples[-1] * _LEVEL_FACTOR) >= _MIN_LEVEL_SIDE:
            downsamples.append(downsamples[-1] * _LEVEL_FACTOR)
        self._downsamples = tuple(float(d) for d in downsamples)
        self._dims = tuple((max(1, width // d), max(1, height // d)) for d in downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        return _scaling_um(self._metadata)

    @property
    def objective_power(self) -> float | None:
        return _objective(self._metadata)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self._downsamples[level]
        roi = (
            self._box.x + round(x * ds),
            self._box.y + round(y * ds),
            round(width * ds),
            round(height * ds),
        )
        try:
            bgr = self._doc.read(
                roi=roi, plane={"C": 0, "Z": 0, "T": 0}, zoom=1.0 / ds, background_pixel=(1.0, 1.0, 1.0)
            )
        except Exception as err:  # noqa: BLE001 - libCZI raises RuntimeError for anything
            raise source_error(self.source, "truncated or corrupt CZI data", err) from None
        rgb = np.asarray(bgr)[..., 2::-1]
        if rgb.dtype != np.uint8:  # Bgr48: 16-bit samples
            rgb = (rgb >> 8).astype(np.uint8)
        if rgb.shape[:2] != (height, width):  # libCZI rounds zoomed sizes: pad or crop to the request
            out = np.full((height, width, 3), 255, np.uint8)
            h, w = min(height, rgb.shape[0]), min(width, rgb.shape[1])
            out[:h, :w] = rgb[:h, :w]
            rgb = out
        return np.ascontiguousarray(rgb)

    def close(self) -> None:
        self._doc.close()
