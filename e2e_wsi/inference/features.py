"""Attention of two-stage (feature) runs over a slide's stored features, and their heatmaps.

A feature run's model (``SlideModule`` with a ``PrecomputedFeatures`` encoder) reads ``features`` [N, D]
from ``FEATURES/<slide_id>.h5``; its attention is drawn at the file's ``coords`` (level-0 top-left corners).
A patch covers ``patch_size_level0`` level-0 pixels when the file records it (our files since this
attribute exists, TRIDENT's, CLAM's patch attributes), else ``patch_size * objective_power /
magnification`` from the provenance and the slide file. Without either the side is the coordinates' grid
step. Without a slide file the canvas is white, sized from the coordinates' extent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from e2e_wsi.features.store import FeatureFolder, settings_of
from e2e_wsi.inference.attention import SlideAttention, predict_bag
from e2e_wsi.inference.heatmaps import DEFAULT_OPTIONS, thumbnail_of, write_heatmap_figure
from e2e_wsi.inference.results import check_coords
from e2e_wsi.models.encoders import PrecomputedFeatures
from e2e_wsi.models.module import _compare_settings
from e2e_wsi.runs.loading import LoadedRun
from e2e_wsi.slides.backends.base import is_url
from e2e_wsi.slides.reader import Slide, open_slide
from e2e_wsi.slides.sources import slide_exists
from e2e_wsi.utils import grid_step, validate_slide_id
from e2e_wsi.viz.heatmap import HeatmapOptions, format_caption

# Patch side assumed for a single-patch slide of a folder without provenance: CLAM's and TRIDENT's default.
_DEFAULT_PATCH = 256


@dataclass(frozen=True)
class SlideFile:
    """The whole-slide image behind a slide's features, when known.

    Attributes:
        path: The slide file, DICOM folder or URL, or ``None`` (the heatmap is drawn on a white canvas).
        mpp: Per-slide MPP override (the manifest's ``mpp`` column), or ``None``.
    """

    path: Path | None = None
    mpp: float | None = None


def is_feature_run(loaded: LoadedRun) -> bool:
    """Whether the run learned on precomputed features (two-stage) rather than on patches."""
    return isinstance(loaded.model.encoder, PrecomputedFeatures)


def slide_file_from_manifest(manifest: str | Path | None, slide_id: str) -> SlideFile:
    """The slide's file from a manifest's ``path`` column (relative to the manifest) and ``mpp`` column.

    Returns:
        ``SlideFile()`` when there is no manifest, no ``path`` column, no row, or the file is gone (a moved
        slide still gets its heatmap, on white).
    """
    from e2e_wsi.tables import read_table

    if manifest is None or not Path(manifest).is_file():
        return SlideFile()
    table = read_table(manifest)
    if "path" not in table.columns:
        return SlideFile()
    rows = table[table["slide_id"] == slide_id]
    if rows.empty or not isinstance(rows["path"].iloc[0], str):
        return SlideFile()
    text = rows["path"].iloc[0]
    mpp_text = rows["mpp"].iloc[0] if "mpp" in rows.columns else None
    mpp = float(mpp_text) if isinstance(mpp_text, str) and mpp_text.strip() else None
    if is_url(text):  # an fsspec URL (tiffslide): checked when it is opened
        return SlideFile(text, mpp)  # type: ignore[arg-type]
    raw = Path(text)
    path = raw if raw.is_absolute() else Path(manifest).parent / raw
    return SlideFile(path if slide_exists(path) else None, mpp)


def feature_geometry(
    coords: np.ndarray, provenance: dict[str, Any] | None, slide: Slide | None
) -> tuple[int, tuple[int, int]]:
    """Side of a patch in level-0 pixels and the slide's level-0 (width, height).

    Args:
        coords: [N, 2] level-0 (x, y) of the patches' top-left corners.
        provenance: The features' provenance (``patch_size_level0``, else ``magnification`` and
            ``patch_size``), or ``None``.
        slide: The open slide file, or ``None``.

    Returns:
        ``(size_level0, (width, height))``; without a slide, the extent of the patches.
    """
    prov = provenance or {}
    if prov.get("patch_size_level0"):  # recorded by extract (and TRIDENT/CLAM): the exact cached side
        side = int(prov["patch_size_level0"])
    elif slide is not None and "patch_size" in prov and "magnification" in prov:
        power = slide.resolution.objective_power
        # The formula of the tiling (e2e_wsi.slides.tiling.grid_spec), so squares match the cached patches.
        side = max(1, round(int(provenance["patch_size"]) * power / float(provenance["magnification"])))
    else:
        side = grid_step(coords) or int((provenance or {}).get("patch_size", _DEFAULT_PATCH))
    if slide is not None:
        return side, tuple(slide.dimensions)  # type: ignore[return-value]
    far = coords.max(axis=0) + side
    return side, (int(far[0]), int(far[1]))


def feature_attention(
    loaded: LoadedRun, folder: FeatureFolder, slide_id: str, slide_file: SlideFile | None = None
) -> tuple[SlideAttention, dict[str, torch.Tensor]]:
    """Attention of a feature run over every stored feature of a slide.

    Args:
        loaded: A feature run (:func:`is_feature_run`).
        folder: The feature folder holding ``<slide_id>.h5``.
        slide_id: The slide.
        slide_file: The slide file (for the patch side and dimensions), if known.

    Returns:
        (the slide's attention, one value per feature and head at the file's ``coords``; the model's
        outputs: ``outputs`` [1, K], ``attention`` [1, H, N] and the task's predictions).

    Raises:
        ValueError: The slide has no features, or they were made by another encoder or with other
            settings than the run's training features (the difference is named).
        SlideError: The given slide file cannot be read.
    """
    if not is_feature_run(loaded):
        raise ValueError(f"{loaded.checkpoint} is a patch (end-to-end) run: its attention needs patches")
    validate_slide_id(slide_id)
    if slide_id not in folder:
        raise ValueError(f"slide {slide_id!r} has no features in {folder.path}: run `e2e-wsi extract` on it")
    info = folder.info(slide_id)
    _compare_settings(loaded.model.feature_settings, settings_of(info.provenance), folder.path)
    features, coords = folder.read(slide_id)
    slide_file = slide_file or SlideFile()
    out = predict_bag(loaded.model, torch.from_numpy(features))
    if slide_file.path is not None:
        with open_slide(slide_file.path, slide_mpp=slide_file.mpp) as slide:
            side, dims = feature_geometry(coords, info.provenance, slide)
    else:
        check_coords(coords, (2**62, 2**62), f"features of slide {slide_id!r} in {folder.path}")
        side, dims = feature_geometry(coords, info.provenance, None)
    check_coords(coords, dims, f"features of slide {slide_id!r} in {folder.path}")
    att = SlideAttention(slide_id, out["attention"][0].float().numpy(), coords, side, dims)
    return att, out


def top_patches_from_slide(slide_file: SlideFile, att: SlideAttention, k: int, side: int) -> np.ndarray:
    """The ``k`` patches with the highest attention, read from the slide file at ``side`` pixels.

    Returns:
        uint8 [k, side, side, 3], best first; [0, 1, 1, 3] without a slide file.
    """
    order = [int(i) for i in np.argsort(-att.merged)[:k]]
    if slide_file.path is None or not order:
        return np.zeros((0, 1, 1, 3), np.uint8)
    patches = []
    with open_slide(slide_file.path, slide_mpp=slide_file.mpp) as slide:
        level = slide.best_level(att.size_level0 / side)
        read = max(1, round(att.size_level0 / slide.level_downsamples[level]))
        for i in order:
            x, y = (int(v) for v in att.coords[i])
            image = slide.read_rgb((x, y), level, (read, read)).resize(
                (side, side), Image.Resampling.BILINEAR
            )
            patches.append(np.asarray(image))
    return np.stack(patches)


def make_feature_heatmap(
    loaded: LoadedRun,
    folder: FeatureFolder,
    slide_id: str,
    out_dir: str | Path,
    *,
    slide_file: SlideFile | None = None,
    options: HeatmapOptions = DEFAULT_OPTIONS,
) -> dict:
    """Heatmap of one slide from a feature run (the ``e2e-wsi heatmap`` of a two-stage run).

    The ground truth is found as for patch runs (:meth:`e2e_wsi.viz.heatmap.HeatmapOptions.truth`).

    Returns:
        A summary dict: ``png``, ``localization`` (or ``None``), ``prediction``, ``attention`` (the
        :class:`SlideAttention`).

    Raises:
        ValueError: A ground truth is asked for without a slide file: the mask could not be placed.
    """
    slide_file = slide_file or SlideFile()
    att, out = feature_attention(loaded, folder, slide_id, slide_file)
    pred = {k: v[0].numpy() for k, v in loaded.model.task.predict(out["outputs"]).items()}
    text = format_caption(pred, loaded.data.get("class_names"), kind=loaded.task_kind)
    truth = options.truth(slide_id, att.dimensions)
    if truth is not None and slide_file.path is None:
        raise ValueError(
            f"scoring {slide_id!r} against a ground truth needs its slide file (for its dimensions): pass "
            "--slide_path, or use a manifest with a `path` column"
        )
    meta = {"dimensions": att.dimensions, "source_path": str(slide_file.path or ""), "mpp": slide_file.mpp}
    side = int((settings_of(folder.info(slide_id).provenance) or {}).get("patch_size", 128))
    summary = write_heatmap_figure(
        att,
        thumbnail_of(meta),
        top_patches_from_slide(slide_file, att, options.top_k, min(side, 256)),
        Path(out_dir),
        prediction=text,
        truth=truth,
        options=options,
    )
    return {**summary, "attention": att}
