"""DICOM WSI from a pyramidal TIFF written by :mod:`e2e_wsi.slides.writer`, through wsidicom's writer.

Each tiled level of the TIFF becomes one DICOM VL Whole Slide Microscopy instance (TILED_FULL, JPEG
baseline) in the output folder; the JPEG tiles are copied as they are, so every reader decodes the same
pixels from the DICOM copy as from the TIFF. UIDs are derived from a key (the slide id), so the same
cohort gets the same UIDs; only the instance creation date/time differs between runs.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import numpy as np

_EXTRA = "pip install 'e2e-wsi[dicom]'"


def require_wsidicom() -> None:
    try:
        import wsidicom  # noqa: F401
    except ImportError:
        raise ValueError(f"writing DICOM needs wsidicom: {_EXTRA}") from None


def _tiff_level_data(tif: Any, page: Any, mpp_um: float) -> Any:
    """A wsidicom ``ImageData`` serving one tiled TIFF page's JPEG tiles unchanged."""
    from pydicom.uid import JPEGBaseline8Bit
    from wsidicom.codec import Encoder, JpegSettings
    from wsidicom.geometry import Point, Size, SizeMm
    from wsidicom.instance import ImageData

    class TiffLevelData(ImageData):
        def __init__(self) -> None:
            super().__init__(Encoder.create_for_settings(JpegSettings()))
            self._per_row = -(-page.imagewidth // page.tilewidth)
            self._spacing = SizeMm(mpp_um / 1000.0, mpp_um / 1000.0)

        transfer_syntax = property(lambda self: JPEGBaseline8Bit)
        image_size = property(lambda self: Size(page.imagewidth, page.imagelength))
        tile_size = property(lambda self: Size(page.tilewidth, page.tilelength))
        pixel_spacing = property(lambda self: self._spacing)
        imaged_size = property(
            lambda self: SizeMm(
                self._spacing.width * page.imagewidth, self._spacing.height * page.imagelength
            )
        )
        samples_per_pixel = property(lambda self: 3)
        bits = property(lambda self: 8)
        photometric_interpretation = property(lambda self: "YBR_FULL_422")  # JPEG baseline, YCbCr
        image_coordinate_system = property(lambda self: None)
        thread_safe = property(lambda self: False)
        lossy_compression = property(lambda self: None)
        transcoder = property(lambda self: None)

        def get_encoded_tile(self, tile: Point, z: float, path: str) -> bytes:
            index = tile.y * self._per_row + tile.x
            handle = tif.filehandle
            handle.seek(page.dataoffsets[index])
            return handle.read(page.databytecounts[index])

        def get_decoded_tile(self, tile_point: Point, z: float, path: str, cache: bool = True) -> np.ndarray:
            import imagecodecs

            return imagecodecs.jpeg_decode(self.get_encoded_tile(tile_point, z, path))

    return TiffLevelData()


def _metadata(key: str, mpp: float) -> Any:
    from pydicom.uid import generate_uid
    from wsidicom.geometry import SizeMm
    from wsidicom.metadata import (
        Equipment,
        Image,
        Label,
        OpticalPath,
        Patient,
        Pyramid,
        Series,
        Slide,
        SlideSample,
        Study,
        WsiMetadata,
    )

    def uid(role: str) -> Any:
        return generate_uid(entropy_srcs=["e2e-wsi", key, role])

    return WsiMetadata(
        study=Study(uid=uid("study")),
        series=Series(uid=uid("series")),
        patient=Patient(),
        equipment=Equipment(manufacturer="e2e-wsi", model_name="synth"),
        slide=Slide(identifier=key, samples=[SlideSample(identifier=f"{key}-sample", uid=uid("sample"))]),
        pyramid=Pyramid(
            image=Image(pixel_spacing=SizeMm(mpp / 1000.0, mpp / 1000.0)),
            optical_paths=[OpticalPath()],
            uid=uid("pyramid"),
        ),
        label=Label(),
        frame_of_reference_uid=uid("frame-of-reference"),
        dimension_organization_uids=[uid("dimension-organization")],
    )


def tiff_to_dicom(tiff_path: str | Path, out_dir: str | Path, *, mpp: float, key: str) -> list[Path]:
    """Write the tiled levels of a pyramidal TIFF as a DICOM WSI series in ``out_dir`` (one file per level).

    Args:
        tiff_path: A JPEG-tiled pyramidal TIFF (Aperio layout from :mod:`e2e_wsi.slides.writer`).
        out_dir: Output folder (created; it should hold only this slide).
        mpp: Micrometres per level-0 pixel (DICOM Pixel Spacing is required).
        key: Seed of the UIDs (e.g. the slide id): the same key gives the same UIDs.

    Returns:
        The written ``.dcm`` files.

    Raises:
        ValueError: If wsidicom is not installed or the TIFF has no JPEG-tiled level.
    """
    require_wsidicom()
    import tifffile
    from pydicom.uid import generate_uid
    from wsidicom import WsiDicom
    from wsidicom.instance import WsiDataset, WsiInstance
    from wsidicom.metadata import ImageType
    from wsidicom.metadata.schema.dicom.wsi import WsiMetadataDicomSchema
    from wsidicom.source import Source

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tif = tifffile.TiffFile(tiff_path)
    pages = [p for p in tif.pages if p.is_tiled and p.compression == 7]  # 7: JPEG
    if not pages:
        tif.close()
        raise ValueError(f"{tiff_path}: no JPEG-tiled level to copy into DICOM")
    base = WsiMetadataDicomSchema().dump(_metadata(key, mpp), ImageType.VOLUME)
    width0 = pages[0].imagewidth
    levels = [
        WsiInstance.create_instance(
            _tiff_level_data(tif, page, mpp * width0 / page.imagewidth),
            copy.deepcopy(base),
            ImageType.VOLUME,
            i,
        )
        for i, page in enumerate(pages)
    ]

    class TiffSource(Source):
        base_dataset = property(lambda self: WsiDataset(copy.deepcopy(base)))
        level_instances = property(lambda self: levels)
        label_instances = property(lambda self: [])
        overview_instances = property(lambda self: [])
        thumbnail_instances = property(lambda self: [])
        annotation_instances = property(lambda self: [])

        def close(self) -> None:
            tif.close()

    counter = itertools.count()
    with WsiDicom(TiffSource()) as wsi:
        written = wsi.save(
            out_dir,
            uid_generator=lambda: generate_uid(entropy_srcs=["e2e-wsi", key, "sop", str(next(counter))]),
            workers=1,
            include_labels=False,
            include_overviews=False,
            include_thumbnails=False,
        )
    return [Path(str(p)) for p in written]
