"""Which patches are lesion patches: the ground truth that attention is scored against.

Used by the heatmap localisation scores (:mod:`e2e_wsi.viz.heatmap`) and by the mechanism measures of the
many-patch benchmark (:mod:`e2e_wsi.evaluation.mechanism`).
"""

from __future__ import annotations

import numpy as np


def patch_lesion_labels(
    coords: np.ndarray,
    size_level0: int,
    truth: np.ndarray,
    dimensions: tuple[int, int],
    min_fraction: float = 0.25,
) -> np.ndarray:
    """Label each patch as lesion when at least ``min_fraction`` of its area is lesion in the truth mask.

    Args:
        coords: [N, 2] level-0 (x, y).
        size_level0: Patch side in level-0 pixels.
        truth: [h, w] uint8 ground truth (255 = lesion), covering the whole slide.
        dimensions: Level-0 (width, height).
        min_fraction: Share of lesion pixels that makes a patch a lesion patch.

    Returns:
        [N] bool.
    """
    lesion = truth == 255
    sx, sy = truth.shape[1] / dimensions[0], truth.shape[0] / dimensions[1]
    labels = np.zeros(len(coords), dtype=bool)
    for i, (x, y) in enumerate(coords):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int((x + size_level0) * sx)), max(y0 + 1, int((y + size_level0) * sy))
        box = lesion[y0:y1, x0:x1]
        labels[i] = box.size > 0 and box.mean() >= min_fraction
    return labels
