"""Slides: reader backends behind one :class:`Slide` front, tissue detection, tiling, pyramid writers."""

from e2e_wsi.slides.errors import SlideError
from e2e_wsi.slides.reader import Slide, open_slide
from e2e_wsi.slides.sources import SLIDE_EXTENSIONS, find_slides, is_slide_folder, slide_exists, slide_id_of

__all__ = [
    "SLIDE_EXTENSIONS",
    "Slide",
    "SlideError",
    "find_slides",
    "is_slide_folder",
    "open_slide",
    "slide_exists",
    "slide_id_of",
]
