"""Registry of slide reader backends, and the one function that picks one for a file.

Order matters when no backend is forced: OpenSlide first (the default wherever it reads the file), then
plain images (cheap to probe, and they refuse pyramids), then tiffslide, DICOM and CZI. A backend can ask to
go before OpenSlide for files it reads better (tiffslide for ``.ome.tif``, whose SubIFD pyramid OpenSlide
does not see). A backend whose
library is not installed is skipped; asking for it by name says which extra to install.
"""

from __future__ import annotations

from pathlib import Path

from e2e_wsi.errors import UserError
from e2e_wsi.slides.backends.base import NotThisFormat, SlideBackend, is_url
from e2e_wsi.slides.backends.czi import CziBackend
from e2e_wsi.slides.backends.dicom import DicomBackend, is_dicom_folder
from e2e_wsi.slides.backends.image import PlainImageBackend
from e2e_wsi.slides.backends.openslide import OpenSlideBackend
from e2e_wsi.slides.backends.tiffslide import TiffSlideBackend
from e2e_wsi.slides.errors import SlideError

BACKENDS: dict[str, type[SlideBackend]] = {}


def register_backend(cls: type[SlideBackend]) -> type[SlideBackend]:
    """Add a backend to the registry (after the ones already there); usable as a class decorator."""
    if cls.name in BACKENDS:
        raise ValueError(f"slide backend {cls.name!r} is registered twice")
    BACKENDS[cls.name] = cls
    return cls


for _cls in (OpenSlideBackend, PlainImageBackend, TiffSlideBackend, DicomBackend, CziBackend):
    register_backend(_cls)

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def backend_names() -> list[str]:
    """Names of all registered backends, in the order they are tried."""
    return list(BACKENDS)


def get_backend(name: str) -> type[SlideBackend]:
    """The backend class called ``name``.

    Raises:
        UserError: If no backend has that name (the message lists them).
    """
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r} is not a slide backend; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def _forced(source: str | Path, name: str) -> SlideBackend:
    cls = get_backend(name)
    if not cls.available():
        raise SlideError(source, f"backend {name!r} needs {cls.module}: {cls.install_hint()}")
    try:
        return cls(source)
    except NotThisFormat as verdict:
        raise SlideError(source, f"not a format the {name!r} backend reads ({verdict.reason})") from None


def _candidates(source: str | Path) -> list[type[SlideBackend]]:
    """Backends to try: those preferring the source, then those claiming it (registry order), then the rest."""
    if is_url(source):
        return [cls for cls in BACKENDS.values() if cls.reads_urls]
    if Path(source).is_dir():
        return [cls for cls in BACKENDS.values() if cls.reads_folders]
    preferring = [cls for cls in BACKENDS.values() if cls.prefers(source)]
    claiming = [cls for cls in BACKENDS.values() if cls.claims(source) and cls not in preferring]
    rest = [cls for cls in BACKENDS.values() if cls not in preferring + claiming and not cls.reads_folders]
    return preferring + claiming + rest


def open_backend(source: str | Path, name: str | None = None) -> SlideBackend:
    """Open ``source`` (a file, a DICOM folder or an fsspec URL) with backend ``name`` or the first that reads it.

    Args:
        source: Slide file, folder or URL.
        name: Force this backend (``--backend``); ``None`` tries them in registry order.

    Returns:
        The open backend.

    Raises:
        SlideError: If the forced backend is missing or refuses the file, if the file is damaged, or if no
            backend reads it (the message names the backends tried and those not installed).
    """
    if name is not None:
        return _forced(source, name)
    verdicts: list[str] = []
    damaged: SlideError | None = None
    missing: list[type[SlideBackend]] = []
    tried: list[str] = []
    for cls in _candidates(source):
        if not cls.available():
            missing.append(cls)
            continue
        tried.append(cls.name)
        try:
            return cls(source)
        except NotThisFormat as verdict:
            verdicts.append(verdict.reason)
        except SlideError as err:
            damaged = damaged or err  # a reader that knows the format says it is damaged: keep trying others
    if damaged is not None:
        raise damaged
    raise SlideError(source, _nobody_reads(source, ", ".join(tried), verdicts, missing))


def _nobody_reads(
    source: str | Path, tried: str, verdicts: list[str], missing: list[type[SlideBackend]]
) -> str:
    """The message for a source no installed backend reads: what it is, what was tried, what to install."""
    hint = ""
    if missing:
        hint = "; not installed: " + ", ".join(f"{c.name} ({c.install_hint()})" for c in missing)
    if not is_url(source) and Path(source).is_dir():
        if is_dicom_folder(Path(source)):
            return (
                f"DICOM folder that no installed backend reads ({'; '.join(verdicts) or 'none tried'}){hint}"
            )
        return f"folder without a DICOM WSI series (.dcm files); a folder is a slide only for DICOM{hint}"
    head = b""
    if not is_url(source):
        with open(source, "rb") as handle:
            head = handle.read(4)
    if head in _TIFF_MAGIC:
        return (
            "TIFF file no backend can open: truncated or corrupt (re-copy it), or an unsupported layout "
            f"(tried {tried}: {'; '.join(verdicts)}){hint}"
        )
    return (
        f"not a slide format any backend reads (backends: {', '.join(BACKENDS)}; tried {tried}: "
        f"{'; '.join(verdicts)}){hint}"
    )


__all__ = [
    "BACKENDS",
    "NotThisFormat",
    "SlideBackend",
    "backend_names",
    "get_backend",
    "is_dicom_folder",
    "open_backend",
    "register_backend",
]
