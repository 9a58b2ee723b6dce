"""Heatmaps of trained models: attention drawn on the slide, top patches, localisation scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.data.transforms import OFFICIAL_EVAL_CROP_FRACTION
from e2e_wsi.inference.predict import slide_attention
from e2e_wsi.models.module import SlideModule
from e2e_wsi.slides.reader import SlideError, open_slide
from e2e_wsi.slides.sources import slide_exists
from e2e_wsi.viz.heatmap import (
    SlideAttention,
    find_truth_mask,
    format_caption,
    localization_summary,
    patch_lesion_labels,
    render_heatmap,
)


def thumbnail_of(meta: dict, max_side: int = 1400) -> np.ndarray:
    """RGB thumbnail of a cached slide's source file, or a white canvas when the file is not reachable.

    Args:
        meta: The slide's cache metadata (``dimensions``, ``source_path``).
        max_side: Longest side of the thumbnail in pixels.

    Returns:
        uint8 [h, w, 3].
    """
    w, h = meta["dimensions"]
    scale = max_side / max(w, h)
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    source = Path(meta.get("source_path", ""))
    if slide_exists(source):
        try:
            with open_slide(source, meta.get("backend"), global_mpp=meta.get("mpp")) as slide:
                view = slide.read_downsampled(max(w, h) / max_side)
            return np.asarray(Image.fromarray(view).resize(size, Image.Resampling.BOX))
        except SlideError:
            pass  # a moved or damaged source still gets its heatmap, on white
    return np.full((size[1], size[0], 3), 255, dtype=np.uint8)


def write_heatmap(
    att: SlideAttention,
    cache: PatchCache,
    magnification: float,
    out_dir: Path,
    *,
    prediction: str,
    truth: np.ndarray | None = None,
    top_k: int = 16,
    method: str = "rank",
    per_head: bool = False,
    thumbnail: np.ndarray | None = None,
) -> dict:
    """``OUT/<slide_id>.png`` (+ ``<slide_id>.localization.json`` when a truth mask is given).

    Args:
        att: The slide's attention (patches in cache order of ``magnification`` first).
        cache: The cache holding the slide's patches (for the top-attention mosaic).
        magnification: The magnification of the mosaic patches (the first evaluation one).
        out_dir: Output folder.
        prediction: Text of the prediction (:func:`e2e_wsi.viz.heatmap.format_caption`), shown in the caption.
        truth: uint8 ground truth (255 = lesion) covering the slide, or ``None``.
        top_k: Patches in the mosaic.
        method: Colour normalisation (``rank`` or ``percentile``).
        per_head: Add one map per head.
        thumbnail: The slide's thumbnail; default: read from the source slide.

    Returns:
        ``png``, ``localization`` (or ``None``), ``prediction``.
    """
    meta = cache.meta(att.slide_id)
    n_main = cache.count(att.slide_id, magnification)
    order = [int(i) for i in np.argsort(-att.merged) if i < n_main][:top_k]
    top = cache.get_many(att.slide_id, magnification, order) if order else np.zeros((0, 1, 1, 3), np.uint8)
    return write_heatmap_figure(
        att,
        thumbnail if thumbnail is not None else thumbnail_of(meta),
        top,
        out_dir,
        prediction=prediction,
        truth=truth,
        method=method,
        per_head=per_head,
    )


def write_heatmap_figure(
    att: SlideAttention,
    thumbnail: np.ndarray,
    top: np.ndarray,
    out_dir: Path,
    *,
    prediction: str,
    truth: np.ndarray | None = None,
    method: str = "rank",
    per_head: bool = False,
) -> dict:
    """``OUT/<slide_id>.png`` from a thumbnail and top patches, scored against ``truth`` when given.

    Args:
        att: The slide's attention.
        thumbnail: [h, w, 3] uint8 thumbnail of the whole slide (or a white canvas of its shape).
        top: [k, p, p, 3] uint8 patches with the highest attention, best first (k may be 0).
        out_dir: Output folder.
        prediction: Text of the prediction, shown in the caption.
        truth: uint8 ground truth (255 = lesion) covering the slide, or ``None``.
        method: Colour normalisation (``rank`` or ``percentile``).
        per_head: Add one map per head.

    Returns:
        ``png``, ``localization`` (or ``None``), ``prediction``.
    """
    loc, caption = None, prediction
    if truth is not None:
        labels = patch_lesion_labels(att.coords, att.size_level0, truth, att.dimensions)
        loc = localization_summary(att, labels)
        auc = "n/a" if loc["auroc"] is None else f"{loc['auroc']:.2f}"
        caption += (
            f" | lesion localisation AUROC: patch {auc} "
            f"({loc['n_lesion_patches']}/{loc['n_patches']} lesion patches; "
            f"{100 * loc['attention_on_lesion']:.1f}% of attention on lesion)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{att.slide_id}.png"
    tmp = out_dir / f".{att.slide_id}.tmp.png"
    render_heatmap(att, thumbnail, top, tmp, method=method, per_head=per_head, caption=caption)
    os.replace(tmp, png)
    if loc is not None:
        path = out_dir / f"{att.slide_id}.localization.json"
        tmp_json = path.with_name(f".{path.name}.tmp")
        tmp_json.write_text(json.dumps(loc, indent=2) + "\n")
        os.replace(tmp_json, path)
    return {"png": str(png), "localization": loc, "prediction": prediction}


def make_heatmap(
    model: SlideModule,
    cache: PatchCache,
    slide_id: str,
    out_dir: Path,
    *,
    magnifications: list[float],
    patch_size: int,
    top_k: int = 16,
    method: str = "rank",
    per_head: bool = False,
    mask: str | Path | None = None,
    mask_dir: str | Path | None = None,
    annotations_dir: str | Path | None = None,
    class_names: list[str] | None = None,
    crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
) -> dict:
    """Heatmap of one cached slide from a model (the ``e2e-wsi heatmap`` of one slide).

    The ground truth, when any, is ``mask`` (a PNG), else ``mask_dir/<slide_id>.png``, else the lesion
    annotations of ``annotations_dir/<slide_id>.geojson`` (see :func:`e2e_wsi.viz.heatmap.find_truth_mask`).

    Returns:
        A summary dict: ``png``, ``localization`` (or ``None``), ``prediction``.
    """
    att, out = slide_attention(model, cache, slide_id, magnifications, patch_size, crop_fraction)
    pred = model.task.predict(out["outputs"])
    text = format_caption({k: v[0].numpy() for k, v in pred.items()}, class_names, kind=model.task.kind)
    truth = find_truth_mask(
        slide_id, att.dimensions, mask=mask, mask_dir=mask_dir, annotations_dir=annotations_dir
    )
    return write_heatmap(
        att,
        cache,
        magnifications[0],
        Path(out_dir),
        prediction=text,
        truth=truth,
        top_k=top_k,
        method=method,
        per_head=per_head,
    )
