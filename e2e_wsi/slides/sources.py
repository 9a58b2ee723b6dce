"""What counts as one slide on disk: a file with a slide extension, or a DICOM folder (one series).

The one place that decides file-or-folder, used by ``preprocess --slides_dir``, manifests, ``predict
--slides`` and everything that checks a slide is still there (heatmaps, overlays, feature runs).
"""

from __future__ import annotations

from pathlib import Path

from e2e_wsi.slides.backends import BACKENDS, is_dicom_folder
from e2e_wsi.slides.backends.base import is_url

# Suffixes of single-file slides any backend reads. ``.dcm`` is not one: a DICOM slide is its folder.
SLIDE_EXTENSIONS: tuple[str, ...] = tuple(
    sorted(
        {ext for cls in BACKENDS.values() for ext in cls.extensions if ext != ".dcm" and ext.count(".") == 1}
    )
)


def is_slide_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder that is one slide (a DICOM WSI series)."""
    return not is_url(path) and is_dicom_folder(Path(path))


def slide_exists(source: str | Path) -> bool:
    """Whether a slide source is there: a file, a DICOM folder, or a URL (checked when it is opened)."""
    if is_url(source):
        return True
    path = Path(source)
    return path.is_file() or is_slide_folder(path)


def slide_id_of(source: str | Path) -> str:
    """The default slide id of a source: the file name without its extension (``.ome.tif`` counts as
    one), or the folder's name."""
    path = Path(str(source).rstrip("/"))
    if path.is_dir():
        return path.name
    stem = path.stem
    return stem[: -len(".ome")] if stem.lower().endswith(".ome") else stem


def find_slides(folder: str | Path) -> list[Path]:
    """The slides in a folder (not recursive), sorted: slide files and DICOM sub-folders.

    A folder that is itself a DICOM series is one slide (``[folder]``), so pointing at it never turns its
    per-level ``.dcm`` files into separate slides.

    Raises:
        FileNotFoundError: If ``folder`` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"slides folder {folder} not found")
    if is_slide_folder(folder):
        return [folder]
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS) or (p.is_dir() and is_slide_folder(p))
    )
