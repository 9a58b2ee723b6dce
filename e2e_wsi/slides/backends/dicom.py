"""wsidicom: DICOM whole-slide images (a folder of ``.dcm`` files, one per level, is one slide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2e_wsi.slides.backends.base import NotThisFormat, SlideBackend, source_error

DICOM_SUFFIX = ".dcm"


def is_dicom_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding ``.dcm`` files (one DICOM WSI series = one slide)."""
    if not path.is_dir():
        return False
    return any(child.suffix.lower() == DICOM_SUFFIX and child.is_file() for child in path.iterdir())


class DicomBackend(SlideBackend):
    """DICOM WSI through ``wsidicom`` (``pip install 'e2e-wsi[dicom]'``).

    The source is a folder of one series' ``.dcm`` files (or one of its files); the first pyramid of the
    series is read. MPP comes from the Pixel Spacing of the base level; DICOM states no objective power.
    """

    name = "dicom"
    extensions = (DICOM_SUFFIX,)
    reads_folders = True
    reads_urls = False
    module = "wsidicom"
    extra = "dicom"
    formats = "DICOM WSI (a folder of .dcm files, one per level)"

    def __init__(self, source: str | Path) -> None:
        from wsidicom import WsiDicom
        from wsidicom.errors import WsiDicomNotFoundError

        self.source = str(source)
        path = Path(source)
        folder = path if path.is_dir() else path.parent
        try:
            self._wsi = WsiDicom.open(folder)
        except WsiDicomNotFoundError as err:
            raise NotThisFormat(f"wsidicom: no DICOM WSI series in {folder} ({err})") from None
        except Exception as err:  # noqa: BLE001 - pydicom/wsidicom raise many types for damaged files
            raise source_error(
                source, "DICOM WSI that wsidicom cannot open: damaged or incomplete", err
            ) from None
        levels = list(self._wsi.levels)
        base = levels[0].size
        self._levels = levels
        self._dims = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        self._downsamples = tuple(base.width / lv.size.width for lv in levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    @property
    def mpp(self) -> float | None:
        spacing = self._levels[0].mpp  # micrometres per pixel
        return float(spacing.width) if spacing is not None and spacing.width > 0 else None

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        try:
            array = self._wsi.read_region((x, y), self._levels[level].level, (width, height), as_array=True)
        except Exception as err:  # noqa: BLE001 - any decoder failure is damaged slide data
            raise source_error(self.source, "truncated or corrupt DICOM frames", err) from None
        return np.ascontiguousarray(np.asarray(array)[..., :3], dtype=np.uint8)

    def close(self) -> None:
        self._wsi.close()
