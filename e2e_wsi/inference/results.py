"""What running a model on a slide gives back, as plain arrays (no torch, no Lightning).

Kept apart from :mod:`e2e_wsi.inference.attention` (which imports the models) so code that runs an
exported model without Lightning (``predict --onnx``, :mod:`e2e_wsi.export.runtime`) builds the same
result type that :mod:`e2e_wsi.viz` draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from e2e_wsi.errors import UserError


@dataclass
class SlideAttention:
    """Attention of one slide's patches (what :mod:`e2e_wsi.viz` draws: it only reads these fields).

    Attributes:
        slide_id: The slide.
        attention: [H, N] attention per head (each row sums to 1 over the N patches).
        coords: [N, 2] level-0 (x, y) of each patch's top-left corner.
        size_level0: Side of a patch in level-0 pixels.
        dimensions: Level-0 (width, height) of the slide.
    """

    slide_id: str
    attention: np.ndarray
    coords: np.ndarray
    size_level0: int
    dimensions: tuple[int, int]

    def __post_init__(self) -> None:
        check_coords(self.coords, self.dimensions, f"slide {self.slide_id!r}")

    @property
    def merged(self) -> np.ndarray:
        """[N] attention averaged over heads."""
        return self.attention.mean(axis=0)


def check_coords(coords: np.ndarray, dimensions: tuple[int, int], where: str) -> None:
    """Refuse patch coordinates that cannot belong to the slide: every top-left corner must be a finite
    point inside the level-0 ``dimensions`` (tiling never starts a patch outside the slide).

    Args:
        coords: [N, 2] level-0 (x, y) (any numeric dtype).
        dimensions: Level-0 (width, height).
        where: What the coordinates are (a file, a slide), for the message.

    Raises:
        UserError: Naming the first bad row and how many there are.
    """
    values = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    width, height = dimensions
    bad = ~np.isfinite(values).all(axis=1)
    bad |= (values[:, 0] < 0) | (values[:, 1] < 0) | (values[:, 0] >= width) | (values[:, 1] >= height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{where}: {int(bad.sum())} of {len(values)} patch coordinates are NaN or outside the "
            f"{width}x{height} slide (e.g. row {i}: {tuple(np.asarray(coords).reshape(-1, 2)[i].tolist())}; "
            "NaN stored as integers reads as -9223372036854775808): these coordinates do not belong to "
            "this slide; re-extract or re-preprocess it"
        )
