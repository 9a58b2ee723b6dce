"""Attention heatmaps on slide thumbnails, top-attention mosaics, and localisation scores.

Everything here works on plain arrays (attention per patch, level-0 coordinates, a thumbnail): this
package only draws. Running a model on a slide lives in :mod:`e2e_wsi.inference.attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import matplotlib

matplotlib.use("Agg")  # headless: heatmaps are written to files, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.stats import rankdata  # noqa: E402

from e2e_wsi.annotations.geojson import DEFAULT_LESION, lesion_mask  # noqa: E402
from e2e_wsi.errors import UserError  # noqa: E402
from e2e_wsi.evaluation.localization import patch_lesion_labels  # noqa: E402,F401  (re-exported for viz callers)
from e2e_wsi.tasks import get_task_spec, spec_of_predictions  # noqa: E402
from e2e_wsi.tasks.metrics import binary_auroc  # noqa: E402
from e2e_wsi.utils import validate_slide_id  # noqa: E402


class AttentionMap(Protocol):
    """What a heatmap draws: attention per patch and where the patches lie (plain arrays).

    :class:`e2e_wsi.inference.attention.SlideAttention` is the one the model-running code produces; any
    object with these fields can be drawn.

    Attributes:
        slide_id: The slide.
        attention: [H, N] attention per head.
        coords: [N, 2] level-0 (x, y) of each patch's top-left corner.
        size_level0: Side of a patch in level-0 pixels.
        dimensions: Level-0 (width, height) of the slide.
        merged: [N] attention averaged over heads.
    """

    slide_id: str
    attention: np.ndarray
    coords: np.ndarray
    size_level0: int
    dimensions: tuple[int, int]

    @property
    def merged(self) -> np.ndarray: ...


@dataclass(frozen=True)
class HeatmapOptions:
    """How heatmaps are drawn and what they are scored against: the options every heatmap path shares.

    Attributes:
        top_k: Patches in the top-attention mosaic.
        method: Colour normalisation, ``rank`` or ``percentile`` (:func:`normalize_scores`).
        per_head: Add one small map per attention head.
        mask: A ground-truth PNG for the slide (255 = lesion).
        mask_dir: Folder of ground-truth masks ``<slide_id>.png``.
        annotations_dir: Folder of QuPath ``<slide_id>.geojson`` lesion annotations.
    """

    top_k: int = 16
    method: str = "rank"
    per_head: bool = False
    mask: str | Path | None = None
    mask_dir: str | Path | None = None
    annotations_dir: str | Path | None = None

    def truth(self, slide_id: str, dimensions: tuple[int, int]) -> np.ndarray | None:
        """The slide's ground truth from ``mask``/``mask_dir``/``annotations_dir`` (:func:`find_truth_mask`)."""
        return find_truth_mask(
            slide_id,
            dimensions,
            mask=self.mask,
            mask_dir=self.mask_dir,
            annotations_dir=self.annotations_dir,
        )


def check_mask_shape(mask: np.ndarray, dimensions: tuple[int, int], where: str) -> None:
    """Refuse a ground-truth mask whose aspect ratio is not the slide's (it would be stretched).

    The mask may be any downsample of the slide; its sides may differ from the exact ratio by the
    rounding of one pixel (plus 1%).

    Raises:
        UserError: Naming the mask, both shapes and what to do.
    """
    h, w = mask.shape[:2]
    width, height = dimensions
    expected_h = w * height / max(width, 1)
    if abs(h - expected_h) > 1.0 + 0.01 * max(h, expected_h):
        raise UserError(
            f"{where}: the mask is {w}x{h} pixels but the slide is {width}x{height}: its aspect ratio differs, "
            "so it is not a mask of this slide (a mask covers the whole slide at any downsample)"
        )


def normalize_scores(scores: np.ndarray, method: str = "rank") -> np.ndarray:
    """Map raw attention to [0, 1] for display.

    Raw attention is extremely skewed (a few patches hold most of it), so a linear colour scale shows
    one bright dot. ``rank`` gives each patch its percentile rank (uniform colours over the slide);
    ``percentile`` clips to the 1st-99th percentile and rescales linearly.

    Args:
        scores: [N] attention values.
        method: ``rank`` or ``percentile``.

    Returns:
        [N] values in [0, 1].
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    if method == "rank":
        if scores.size == 1:
            return np.ones(1)
        return (rankdata(scores, method="average") - 1) / (scores.size - 1)
    if method == "percentile":
        lo, hi = np.percentile(scores, [1, 99])
        return np.clip((scores - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    raise ValueError(f"unknown normalisation {method!r}: use 'rank' or 'percentile'")


def overlay_grid(att: AttentionMap, values: np.ndarray, thumb_shape: tuple[int, int]) -> np.ndarray:
    """Rasterise per-patch values onto the thumbnail grid.

    Args:
        att: The slide's attention (coordinates, patch size, dimensions).
        values: [N] values in [0, 1].
        thumb_shape: (height, width) of the thumbnail.

    Returns:
        [h, w] float array, NaN where no patch lies (shown transparent).
    """
    h, w = thumb_shape
    sx, sy = w / att.dimensions[0], h / att.dimensions[1]
    grid = np.full((h, w), np.nan)
    for (x, y), v in zip(att.coords, values, strict=True):
        x0, y0 = int(x * sx), int(y * sy)
        x1 = max(x0 + 1, int(round((x + att.size_level0) * sx)))
        y1 = max(y0 + 1, int(round((y + att.size_level0) * sy)))
        region = grid[y0:y1, x0:x1]
        # Overlapping patches (several scales) keep the highest value.
        grid[y0:y1, x0:x1] = np.fmax(region, v)
    return grid


def find_truth_mask(
    slide_id: str,
    dimensions: tuple[int, int],
    *,
    mask: str | Path | None = None,
    mask_dir: str | Path | None = None,
    annotations_dir: str | Path | None = None,
    lesion_classes: tuple[str, ...] = DEFAULT_LESION,
) -> np.ndarray | None:
    """The ground truth a heatmap is scored against, if the user gave one.

    In order: ``mask`` (a PNG covering the slide, 255 = lesion), ``mask_dir/<slide_id>.png`` (e.g. a
    synthetic cohort's ``masks/``), the lesion annotations of ``annotations_dir/<slide_id>.geojson``
    (QuPath export, classes ``lesion_classes``). Nothing is guessed from the slide's location.

    Args:
        slide_id: The slide.
        dimensions: Its level-0 (width, height) (to rasterise annotations).
        mask: Explicit mask file.
        mask_dir: Folder of ``<slide_id>.png`` masks.
        annotations_dir: Folder of ``<slide_id>.geojson`` annotations.
        lesion_classes: Annotation classes that are lesion.

    Returns:
        uint8 [h, w] or ``None`` when no ground truth exists for the slide.

    Raises:
        FileNotFoundError: If ``mask`` is given but missing.
        UserError: If a mask's aspect ratio is not the slide's.
        ValueError: If an annotation file is invalid (names the file).
    """
    if mask is not None:
        if not Path(mask).is_file():
            raise FileNotFoundError(f"ground-truth mask {mask} not found")
        return _read_mask(Path(mask), dimensions)
    safe = validate_slide_id(slide_id)
    if mask_dir is not None and (Path(mask_dir) / f"{safe}.png").is_file():
        return _read_mask(Path(mask_dir) / f"{safe}.png", dimensions)
    if annotations_dir is not None and (Path(annotations_dir) / f"{safe}.geojson").is_file():
        return lesion_mask(Path(annotations_dir) / f"{safe}.geojson", dimensions, names=lesion_classes)
    return None


def _read_mask(path: Path, dimensions: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(Image.open(path).convert("L"))
    check_mask_shape(mask, dimensions, f"ground-truth mask {path}")
    return mask


def localization_summary(att: AttentionMap, labels: np.ndarray) -> dict:
    """How well attention finds lesion patches.

    Returns:
        ``auroc`` (merged attention vs patch lesion labels; ``None`` if only one kind of patch),
        ``auroc_per_head``, ``attention_on_lesion`` (share of merged attention on lesion patches),
        ``lesion_share`` (share of patches that are lesion: the chance level of the previous number),
        counts.
    """
    merged = att.merged
    n_lesion = int(labels.sum())
    defined = 0 < n_lesion < len(labels)

    def _auc(scores: np.ndarray) -> float | None:
        return float(binary_auroc(labels, scores)[0]) if defined else None

    return {
        "slide_id": att.slide_id,
        "n_patches": int(len(labels)),
        "n_lesion_patches": n_lesion,
        "auroc": _auc(merged),
        "auroc_per_head": [_auc(a) for a in att.attention],
        "attention_on_lesion": float(merged[labels].sum() / max(merged.sum(), 1e-12)),
        "lesion_share": float(n_lesion / max(len(labels), 1)),
    }


def format_caption(
    prediction: Mapping[str, np.ndarray],
    class_names: Sequence[str] | None = None,
    localisation: Mapping[str, float | None] | None = None,
    kind: str | None = None,
) -> str:
    """A caption people read: the task spec's words for the prediction; localisation AUROCs.

    Probabilities and risks get 3 digits (``0.999``; risks and values 3 significant digits), AUROCs 2.

    Args:
        prediction: One slide's ``task.predict`` output: ``probs`` [K] or [1, K], ``risk`` or ``pred``
            [] / [1].
        class_names: Names of the K classes; default ``class 0`` .. ``class K-1``.
        localisation: Label -> AUROC (``None`` when undefined), e.g. ``{"pixel": 0.93, "patch": 0.9}``.
        kind: The task kind; ``None`` finds it from the prediction's keys.

    Returns:
        E.g. ``predicted: tumour (p = 0.999) | lesion localisation AUROC: pixel 0.93, patch 0.90``.
    """
    parts = []
    if prediction:
        spec = get_task_spec(kind) if kind is not None else spec_of_predictions(prediction)
        parts.append(spec.caption(prediction, class_names))
    if localisation:
        aucs = ", ".join(
            f"{label} {'n/a' if auc is None else f'{auc:.2f}'}" for label, auc in localisation.items()
        )
        parts.append(f"lesion localisation AUROC: {aucs}")
    return " | ".join(parts)


def render_heatmap(
    att: AttentionMap,
    thumbnail: np.ndarray,
    top_patches: np.ndarray,
    out_path: str | Path,
    *,
    method: str = "rank",
    per_head: bool = False,
    caption: str = "",
    cmap: str = "jet",
    alpha: float = 0.45,
    rasterize: Callable[[AttentionMap, np.ndarray, tuple[int, int]], np.ndarray] | None = None,
    title: str | None = None,
) -> Path:
    """Write the heatmap figure: thumbnail + overlay + colour bar, top-k mosaic, optional per-head maps.

    Args:
        att: The slide's attention.
        thumbnail: [h, w, 3] uint8 RGB thumbnail of the whole slide.
        top_patches: [k, p, p, 3] uint8 patches with the highest merged attention, best first.
        out_path: PNG path.
        method: Display normalisation (``rank`` or ``percentile``), stated in the colour bar label.
        per_head: Add one small map per head.
        caption: Text under the title (e.g. the localisation AUROC).
        cmap: Matplotlib colour map.
        alpha: Overlay opacity.
        rasterize: ``(att, values [N], (h, w)) -> [h, w]`` map, NaN where no patch lies; default
            :func:`overlay_grid` (flat squares). Overlapping heatmaps pass a blending rasteriser.
        title: Title of the main map (default: the slide id and the number of heads).

    Returns:
        The PNG path.
    """
    rasterize = rasterize or overlay_grid
    heads = att.attention.shape[0] if per_head else 0
    rows = 2 if heads else 1
    fig = plt.figure(figsize=(14, 6.5 + (2.5 if heads else 0)), dpi=100)
    grid = fig.add_gridspec(rows, 2, width_ratios=[3, 2], height_ratios=[3, 1] if heads else [1])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(thumbnail)
    values = rasterize(att, normalize_scores(att.merged, method), thumbnail.shape[:2])
    image = ax.imshow(values, cmap=cmap, alpha=alpha, norm=Normalize(0, 1), interpolation="nearest")
    ax.set_title(title or f"{att.slide_id}: attention (mean over {att.attention.shape[0]} heads)")
    ax.axis("off")
    label = "attention percentile rank" if method == "rank" else "attention (1st-99th percentile, linear)"
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.01, label=label)
    _mosaic(fig.add_subplot(grid[0, 1]), top_patches)
    if heads:
        sub = grid[1, :].subgridspec(1, heads)
        # Each head's panel is a couple of hundred pixels wide: resampling the full thumbnail for every
        # head made per-head figures ~5x slower to save, so they get a box-reduced copy.
        small = _reduce(thumbnail, max_side=320)
        for j in range(heads):
            hax = fig.add_subplot(sub[0, j])
            hax.imshow(small)
            hv = rasterize(att, normalize_scores(att.attention[j], method), small.shape[:2])
            hax.imshow(hv, cmap=cmap, alpha=alpha, norm=Normalize(0, 1), interpolation="nearest")
            hax.set_title(f"head {j}", fontsize=9)
            hax.axis("off")
    if caption:
        fig.suptitle(caption, fontsize=11, y=0.02, va="bottom")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, bbox_inches="tight")
    plt.close(fig)
    return out_path


def _reduce(image: np.ndarray, max_side: int) -> np.ndarray:
    """[h, w, 3] uint8 image box-averaged by an integer factor so its longer side is about ``max_side``."""
    factor = max(1, max(image.shape[:2]) // max_side)
    return image if factor == 1 else np.asarray(Image.fromarray(image).reduce(factor))


def _mosaic(ax, patches: np.ndarray) -> None:
    """Top-k patches in a square grid, best first (row-major)."""
    ax.axis("off")
    k = len(patches)
    if k == 0:
        return
    cols = int(np.ceil(np.sqrt(k)))
    rows = int(np.ceil(k / cols))
    p = patches.shape[1]
    canvas = np.full((rows * (p + 4), cols * (p + 4), 3), 255, dtype=np.uint8)
    for i, patch in enumerate(patches):
        r, c = divmod(i, cols)
        canvas[r * (p + 4) : r * (p + 4) + p, c * (p + 4) : c * (p + 4) + p] = patch
    ax.imshow(canvas)
    ax.set_title(f"top {k} patches by attention")
