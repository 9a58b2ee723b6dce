"""The contract every slide reader backend fulfils, and the errors a backend raises.

A backend wraps one library made for one family of formats (OpenSlide, tiffslide, wsidicom, pylibCZIrw,
Pillow/tifffile) and presents a slide the same way: level-0 dimensions, a pyramid of levels with their
downsamples, the MPP and objective power the file states (``None`` when it states none), and RGB regions
addressed in level-0 coordinates. :class:`e2e_wsi.slides.reader.Slide` is the one front the rest of the
code uses; it picks a backend through :func:`e2e_wsi.slides.backends.open_backend`.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from e2e_wsi.slides.errors import SlideError

WHITE = (255, 255, 255)


class NotThisFormat(Exception):  # noqa: N818 - a verdict, not a failure: the next backend is tried
    """Raised by a backend's constructor when the file is not in a format it reads (try the next one).

    Attributes:
        reason: One line for the final message when no backend reads the file.
    """

    def __init__(self, reason: str) -> None:
        self.reason = " ".join(reason.split())
        super().__init__(self.reason)


def positive_property(value: object) -> float | None:
    """A slide property (MPP, objective power) as a positive float; ``None`` when absent or unusable."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def is_url(source: str | Path) -> bool:
    """Whether ``source`` is an fsspec URL (``s3://``, ``gs://``, ``https://``...) rather than a local path."""
    return isinstance(source, str) and "://" in source


class SlideBackend(ABC):
    """One reader library behind :class:`~e2e_wsi.slides.reader.Slide`.

    Subclasses declare what they read in class attributes and implement the constructor (open, or raise
    :class:`NotThisFormat` / :class:`SlideError`), the geometry properties and :meth:`_read_level`.

    Attributes:
        name: Backend name (``--backend NAME``, the cache's ``backend`` key).
        extensions: Lower-case file suffixes this backend reads.
        reads_folders: Whether a folder is one slide for it (DICOM: one file per level).
        reads_urls: Whether it opens fsspec URLs.
        module: The library it imports (checked with :func:`importlib.util.find_spec`).
        extra: The ``pip install 'e2e-wsi[extra]'`` that installs the library, ``None`` for a core one.
        formats: Human words for the formats table and messages.
    """

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]] = ()
    reads_folders: ClassVar[bool] = False
    reads_urls: ClassVar[bool] = False
    module: ClassVar[str]
    extra: ClassVar[str | None] = None
    formats: ClassVar[str] = ""

    @classmethod
    def available(cls) -> bool:
        """Whether the backend's library is installed."""
        return importlib.util.find_spec(cls.module) is not None

    @classmethod
    def install_hint(cls) -> str:
        """What to install for this backend."""
        return f"pip install 'e2e-wsi[{cls.extra}]'" if cls.extra else f"pip install {cls.module}"

    @classmethod
    def claims(cls, source: str | Path) -> bool:
        """Whether ``source`` looks like this backend's format (by suffix, folder layout or URL)."""
        if is_url(source):
            return cls.reads_urls and str(source).lower().endswith(cls.extensions)
        path = Path(source)
        if path.is_dir():
            return cls.reads_folders
        return path.suffix.lower() in cls.extensions

    @classmethod
    def prefers(cls, source: str | Path) -> bool:
        """Whether this backend should be tried before OpenSlide for ``source`` (it reads it better)."""
        return False

    @abstractmethod
    def __init__(self, source: str | Path) -> None:
        """Open ``source``.

        Raises:
            NotThisFormat: If the file is not in a format this backend reads.
            SlideError: If it is, but cannot be read (damaged, unsupported variant).
        """

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each level, level 0 first."""

    @property
    @abstractmethod
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per pixel of each level (1.0 first)."""

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    @abstractmethod
    def mpp(self) -> float | None:
        """Micrometres per level-0 pixel stated by the file, or ``None``."""

    @property
    def objective_power(self) -> float | None:
        """Objective magnification stated by the file, or ``None``."""
        return None

    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Pixels of a rectangle that lies inside the level.

        Args:
            level: Pyramid level.
            x, y: Top-left corner in that level's pixels (0 <= x, x + width <= level width; same for y).
            width, height: Size in that level's pixels (>= 1).

        Returns:
            uint8 RGB [height, width, 3].
        """

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """An RGB region; what lies outside the slide is white glass (as OpenSlide's transparent pixels).

        Args:
            location: Level-0 (x, y) of the top-left corner.
            level: Pyramid level to read from.
            size: (width, height) in that level's pixels.

        Returns:
            PIL RGB image of ``size``.
        """
        ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        x, y = int(location[0] // ds), int(location[1] // ds)
        width, height = size
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if x0 == x and y0 == y and x1 - x0 == width and y1 - y0 == height:
            return Image.fromarray(self._read_level(level, x, y, width, height))
        canvas = Image.new("RGB", (width, height), WHITE)
        if x1 > x0 and y1 > y0:
            canvas.paste(Image.fromarray(self._read_level(level, x0, y0, x1 - x0, y1 - y0)), (x0 - x, y0 - y))
        return canvas

    def close(self) -> None:  # noqa: B027 - optional: backends holding nothing open need no close
        """Release the file handles."""


def source_error(source: str | Path, what: str, err: BaseException) -> SlideError:
    """A :class:`SlideError` for a library failure, in one line (``what: library message``)."""
    return SlideError(source, f"{what}: {type(err).__name__}: {err}")
