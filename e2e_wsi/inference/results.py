"""What running a model on a slide gives back, as plain arrays (no torch, no Lightning).

Kept apart from :mod:`e2e_wsi.inference.attention` (which imports the models) so code that runs an
exported model without Lightning (``predict --onnx``, :mod:`e2e_wsi.export.runtime`) builds the same
result type that :mod:`e2e_wsi.viz` draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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

    @property
    def merged(self) -> np.ndarray:
        """[N] attention averaged over heads."""
        return self.attention.mean(axis=0)
