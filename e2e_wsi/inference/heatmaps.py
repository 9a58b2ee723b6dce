"""Heatmaps of trained models: run the model (:mod:`e2e_wsi.inference.attention`), then draw
(:mod:`e2e_wsi.viz`): attention on the slide, top patches, localisation scores, overlapping-patch maps.

Every heatmap path takes its drawing and ground-truth choices as one :class:`HeatmapOptions`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.data.transforms import OFFICIAL_EVAL_CROP_FRACTION
from e2e_wsi.errors import UserError
from e2e_wsi.inference.attention import SlideAttention, overlap_attention, read_patches, slide_attention
from e2e_wsi.models.module import SlideModule
from e2e_wsi.slides.reader import Slide, SlideError, open_slide
from e2e_wsi.slides.sources import slide_exists
from e2e_wsi.slides.tissue import TissueParams
from e2e_wsi.viz.heatmap import (
    HeatmapOptions,
    format_caption,
    localization_summary,
    patch_lesion_labels,
    render_heatmap,
)
from e2e_wsi.viz.overlap import OverlapHeatmapFiles, draw_overlap_heatmap

DEFAULT_OPTIONS = HeatmapOptions()


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
    options: HeatmapOptions = DEFAULT_OPTIONS,
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
        options: Mosaic size, colour normalisation, per-head maps.
        thumbnail: The slide's thumbnail; default: read from the source slide.

    Returns:
        ``png``, ``localization`` (or ``None``), ``prediction``.
    """
    meta = cache.meta(att.slide_id)
    n_main = cache.count(att.slide_id, magnification)
    order = [int(i) for i in np.argsort(-att.merged) if i < n_main][: options.top_k]
    top = cache.get_many(att.slide_id, magnification, order) if order else np.zeros((0, 1, 1, 3), np.uint8)
    return write_heatmap_figure(
        att,
        thumbnail if thumbnail is not None else thumbnail_of(meta),
        top,
        out_dir,
        prediction=prediction,
        truth=truth,
        options=options,
    )


def write_heatmap_figure(
    att: SlideAttention,
    thumbnail: np.ndarray,
    top: np.ndarray,
    out_dir: Path,
    *,
    prediction: str,
    truth: np.ndarray | None = None,
    options: HeatmapOptions = DEFAULT_OPTIONS,
) -> dict:
    """``OUT/<slide_id>.png`` from a thumbnail and top patches, scored against ``truth`` when given.

    Args:
        att: The slide's attention.
        thumbnail: [h, w, 3] uint8 thumbnail of the whole slide (or a white canvas of its shape).
        top: [k, p, p, 3] uint8 patches with the highest attention, best first (k may be 0).
        out_dir: Output folder.
        prediction: Text of the prediction, shown in the caption.
        truth: uint8 ground truth (255 = lesion) covering the slide, or ``None``.
        options: Colour normalisation and per-head maps.

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
    render_heatmap(
        att, thumbnail, top, tmp, method=options.method, per_head=options.per_head, caption=caption
    )
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
    options: HeatmapOptions = DEFAULT_OPTIONS,
    class_names: list[str] | None = None,
    crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
) -> dict:
    """Heatmap of one cached slide from a model (the ``e2e-wsi heatmap`` of one slide).

    The ground truth, when any, comes from ``options`` (:meth:`HeatmapOptions.truth`).

    Returns:
        A summary dict: ``png``, ``localization`` (or ``None``), ``prediction``.
    """
    att, out = slide_attention(model, cache, slide_id, magnifications, patch_size, crop_fraction)
    pred = model.task.predict(out["outputs"])
    text = format_caption({k: v[0].numpy() for k, v in pred.items()}, class_names, kind=model.task.kind)
    return write_heatmap(
        att,
        cache,
        magnifications[0],
        Path(out_dir),
        prediction=text,
        truth=options.truth(slide_id, att.dimensions),
        options=options,
    )


def make_overlap_heatmap(
    model: SlideModule,
    slide: Slide,
    slide_id: str,
    out_dir: str | Path,
    *,
    magnification: float,
    patch_size: int,
    eval_patch_size: int,
    overlap: float,
    eval_crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
    tissue_params: TissueParams | None = None,
    tissue_threshold: float = 0.5,
    truth: np.ndarray | None = None,
    class_names: list[str] | None = None,
    prediction: dict[str, np.ndarray] | None = None,
    thumbnail_side: int = 1400,
    options: HeatmapOptions = DEFAULT_OPTIONS,
    progress: Callable[[int, int], None] | None = None,
) -> OverlapHeatmapFiles:
    """Overlapping-patch heatmap of one slide: score the patches, then draw the figure PNG, the overlay
    TIFF and (with a truth) the localisation JSON (:func:`e2e_wsi.viz.overlap.draw_overlap_heatmap`).

    Args:
        model: The run's model.
        slide: The open slide.
        slide_id: Its id (names the files).
        out_dir: Output folder.
        magnification, patch_size, eval_patch_size, overlap, eval_crop_fraction, tissue_params,
        tissue_threshold:
            As in :func:`e2e_wsi.inference.attention.overlap_attention`.
        truth: Ground-truth mask, uint8 [h, w] (255 = lesion, 0 = background), or ``None``.
        class_names: Names of the classes for the caption.
        prediction: The slide's prediction to caption (e.g. from its cached bag, matching
            ``predictions.csv``); default: the prediction on the overlapping patches.
        thumbnail_side: Longest side of the figure's thumbnail.
        options: Mosaic size, normalisation before blending (``rank``, as CLAM), per-head maps.
        progress: Called with (patches done, total) while patches are scored.

    Returns:
        The :class:`~e2e_wsi.viz.overlap.OverlapHeatmapFiles`; ``seconds`` has ``read``, ``model``,
        ``figure`` and ``overlay``.
    """
    result = overlap_attention(
        model,
        slide,
        slide_id,
        magnification=magnification,
        patch_size=patch_size,
        eval_patch_size=eval_patch_size,
        overlap=overlap,
        eval_crop_fraction=eval_crop_fraction,
        tissue_params=tissue_params,
        tissue_threshold=tissue_threshold,
        progress=progress,
    )
    att = result.attention
    if prediction is None:
        prediction = {k: v.numpy() for k, v in model.task.predict(result.outputs).items()}
    order = np.argsort(-att.merged)[: options.top_k]
    top = read_patches(slide, result.spec, att.coords[order], patch_size).permute(0, 2, 3, 1).numpy()
    files = draw_overlap_heatmap(
        att,
        slide,
        out_dir,
        tissue=result.tissue,
        stride=result.stride,
        overlap=overlap,
        prediction=prediction,
        top=top,
        truth=truth,
        class_names=class_names,
        options=options,
        thumbnail_side=thumbnail_side,
    )
    files.seconds = {**result.seconds, **files.seconds}
    return files


def make_overlap_heatmap_from_cache_meta(
    model: SlideModule,
    meta: dict,
    out_dir: str | Path,
    *,
    magnification: float,
    eval_patch_size: int,
    overlap: float,
    **kwargs,
) -> OverlapHeatmapFiles:
    """:func:`make_overlap_heatmap` for a cached slide: the slide file, MPP override, patch size and tissue
    settings come from its cache metadata, so the patches are cut as the cached ones were.

    Args:
        model: The run's model.
        meta: The slide's cache metadata (``PatchCache.meta``).
        out_dir: Output folder.
        magnification: The run's main magnification.
        eval_patch_size: The run's ``eval_patch_size``.
        overlap: Share of a patch shared with its neighbour, in [0, 1).
        **kwargs: Passed on to :func:`make_overlap_heatmap` (truth, class_names, prediction, options, ...).

    Raises:
        UserError: If the slide file is gone (the message says which file).
    """
    source = Path(meta.get("source_path", ""))
    if not slide_exists(source):
        raise UserError(
            f"slide {meta.get('slide_id')!r}: file {source} not found; overlapping heatmaps read the slide "
            "itself: put it back there, or draw the heatmap without --overlap"
        )
    params = meta.get("params") or {}
    tissue = TissueParams(**params["tissue"]) if params.get("tissue") else TissueParams()
    with open_slide(source, meta.get("backend"), slide_mpp=params.get("mpp_override")) as slide:
        return make_overlap_heatmap(
            model,
            slide,
            meta["slide_id"],
            out_dir,
            magnification=magnification,
            patch_size=int(meta["patch_size"]),
            eval_patch_size=eval_patch_size,
            overlap=overlap,
            tissue_params=tissue,
            tissue_threshold=float(params.get("tissue_threshold", 0.5)),
            **kwargs,
        )
