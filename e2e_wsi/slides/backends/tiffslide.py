"""tiffslide: TIFF, SVS and OME-TIFF through tifffile (no C library), also from fsspec URLs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2e_wsi.slides.backends.base import NotThisFormat, SlideBackend, is_url, positive_property, source_error
from e2e_wsi.slides.errors import SlideError


class TiffSlideBackend(SlideBackend):
    """Slides through ``tiffslide`` (``pip install 'e2e-wsi[tiffslide]'``).

    Reads local files and fsspec URLs (``s3://``, ``gs://``, ``https://``; credentials come from the
    user's environment, as fsspec finds them).
    """

    name = "tiffslide"
    extensions = (".svs", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".ndpi", ".scn", ".bif")
    reads_urls = True
    module = "tiffslide"
    extra = "tiffslide"
    formats = "SVS, OME-TIFF (SubIFD pyramids), generic TIFF, also from s3:// gs:// https:// URLs"

    @classmethod
    def prefers(cls, source: str | Path) -> bool:
        """OME-TIFF: its pyramid lives in SubIFDs, which OpenSlide does not see (it would read level 0 only)."""
        return str(source).lower().endswith((".ome.tif", ".ome.tiff"))

    def __init__(self, source: str | Path) -> None:
        import tifffile
        import tiffslide

        self.source = str(source)
        try:
            self._slide = tiffslide.TiffSlide(self.source)
            self._dims = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        except (tifffile.TiffFileError, ValueError, KeyError, IndexError) as err:
            if not is_url(source) and not _is_tiff(Path(source)):
                raise NotThisFormat(f"tiffslide: not a TIFF ({err})") from None
            raise source_error(source, "TIFF file tiffslide cannot open: truncated or corrupt", err) from None
        except OSError as err:
            raise SlideError(source, f"cannot read {self.source}: {err}") from None

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def mpp(self) -> float | None:
        import tiffslide

        return positive_property(self._slide.properties.get(tiffslide.PROPERTY_NAME_MPP_X))

    @property
    def objective_power(self) -> float | None:
        import tiffslide

        return positive_property(self._slide.properties.get(tiffslide.PROPERTY_NAME_OBJECTIVE_POWER))

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        try:
            array = self._slide.read_region(
                (round(x * ds), round(y * ds)), level, (width, height), as_array=True
            )
        except Exception as err:  # noqa: BLE001 - any decoder failure is damaged slide data
            raise source_error(self.source, "truncated or corrupt slide data", err) from None
        array = np.asarray(array)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        return np.ascontiguousarray(array[..., :3], dtype=np.uint8)

    def close(self) -> None:
        self._slide.close()


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False
