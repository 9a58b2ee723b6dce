"""Running a trained model on one slide: the one place where slides, patches or features meet a model.

Three sources, one result type (:class:`SlideAttention`, plain arrays that :mod:`e2e_wsi.viz` draws):

- :func:`slide_attention`: every cached patch of a slide (the patch cache, as ``test`` sees it);
- :func:`e2e_wsi.inference.features.feature_attention`: a two-stage run's stored features;
- :func:`overlap_attention`: overlapping patches read again from the slide file (smooth CLAM-style maps).

Each goes through :func:`predict_bag` or, when patches are read chunk by chunk, through the model's public
``encode_patches``/``aggregate`` (the same weights ``forward`` uses, EMA included). ``predict``,
``heatmap`` and the overlapping heatmaps all call these functions; nothing else runs a model on a slide
outside a Lightning loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from e2e_wsi.cache.store import PatchCache, mag_key
from e2e_wsi.data.datasets import Bag, EvalBagDataset
from e2e_wsi.data.transforms import OFFICIAL_EVAL_CROP_FRACTION, EvalTransform
from e2e_wsi.errors import UserError
from e2e_wsi.inference.results import SlideAttention
from e2e_wsi.models.module import SlideModule
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.tiling import GridSpec, grid_spec, read_patch
from e2e_wsi.slides.tissue import TissueMask, TissueParams, segment_tissue, segmentation_downsample
from e2e_wsi.utils import validate_slide_id
from e2e_wsi.viz.overlap import overlap_grid, overlap_stride


def predict_bag(model: SlideModule, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    """Run a model on one bag without gradients; patches are encoded ``model.eval_chunk_size`` at a time.

    Args:
        model: The trained model.
        images: uint8 [N, 3, h, w] patches of the bag (features [N, D] for a feature model).
        mask: bool [N] (False = padding), or ``None``.

    Returns:
        ``outputs`` [1, K], ``attention`` [1, H, N] and the task's predictions (``probs`` [1, K],
        ``risk`` [1] or ``pred`` [1]).
    """
    with model.evaluating():
        out = model(images[None], None if mask is None else mask[None])
    return {"outputs": out["outputs"], "attention": out["attention"], **model.task.predict(out["outputs"])}


def cached_bag(
    cache: PatchCache,
    slide_id: str,
    magnifications: list[float],
    patch_size: int,
    crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
) -> dict:
    """Every cached patch of a slide as the evaluation dataset gives it (``images``, ``mask``, ``coords``,
    ``magnification``).

    Raises:
        UserError: The slide is not in the cache.
    """
    validate_slide_id(slide_id)
    if slide_id not in cache:
        raise UserError(f"slide {slide_id!r} is not in the cache; `e2e-wsi cache info` lists the slides")
    dataset = EvalBagDataset(
        cache,
        [Bag(slide_id, (slide_id,), {})],
        magnifications,
        EvalTransform(patch_size, crop_fraction=crop_fraction),
    )
    return dataset[0]


def cached_attention(
    cache: PatchCache, slide_id: str, magnifications: list[float], item: dict, attention: np.ndarray
) -> SlideAttention:
    """:class:`SlideAttention` of a cached bag (``item`` from :func:`cached_bag`), attention [H, N]."""
    meta = cache.meta(slide_id)
    main = meta["magnifications"][mag_key(magnifications[0])]
    return SlideAttention(
        slide_id=slide_id,
        attention=attention,
        coords=item["coords"].numpy(),
        size_level0=int(main["size_level0"]),
        dimensions=(int(meta["dimensions"][0]), int(meta["dimensions"][1])),
    )


def slide_attention(
    model: SlideModule,
    cache: PatchCache,
    slide_id: str,
    magnifications: list[float],
    patch_size: int,
    crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
) -> tuple[SlideAttention, dict[str, torch.Tensor]]:
    """Attention of the model over every cached patch of a slide at the given magnification(s).

    Patches are encoded ``model.eval_chunk_size`` at a time without gradients, so 10k+ patch slides
    fit in memory (only uint8 patches and the [N, D] features are held whole). ``patch_size`` and
    ``crop_fraction`` must be the run's (``LoadedRun.eval_patch_size`` / ``.eval_crop_fraction``).

    Returns:
        (the slide's attention, the model's outputs: ``outputs`` [1, K], ``attention`` [1, H, N] and the
        task's predictions).
    """
    item = cached_bag(cache, slide_id, magnifications, patch_size, crop_fraction)
    out = predict_bag(model, item["images"], item["mask"])
    attention = out["attention"][0].float().numpy()
    return cached_attention(cache, slide_id, magnifications, item, attention), out


@dataclass
class OverlapAttention:
    """Attention of a model over a slide's overlapping patches.

    Attributes:
        attention: Per-patch attention, coordinates and slide size.
        outputs: [1, K] head outputs for the bag of overlapping patches.
        stride: Grid step in level-0 pixels.
        spec: How the patches were read (magnification, level, level-0 size).
        tissue: The tissue mask the patches were chosen on (maps are clipped to it).
        seconds: Wall time of ``read`` (slide I/O and resizing) and ``model`` (encoder + aggregator).
    """

    attention: SlideAttention
    outputs: torch.Tensor
    stride: int
    spec: GridSpec
    tissue: TissueMask
    seconds: dict[str, float] = field(default_factory=dict)


def overlap_attention(
    model: SlideModule,
    slide: Slide,
    slide_id: str,
    *,
    magnification: float,
    patch_size: int,
    eval_patch_size: int,
    overlap: float,
    eval_crop_fraction: float = OFFICIAL_EVAL_CROP_FRACTION,
    tissue_params: TissueParams | None = None,
    tissue_threshold: float = 0.5,
    chunk_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> OverlapAttention:
    """Score overlapping tissue patches of a slide with a model, chunk by chunk.

    Args:
        model: A trained (or random) model.
        slide: The open slide.
        slide_id: Its id (for the result).
        magnification: Magnification the patches are read at (the run's main one).
        patch_size: Patch side in pixels as cut for the cache (the run's patches).
        eval_patch_size: Side the encoder sees (the run's ``eval_patch_size``).
        overlap: Share of a patch shared with its neighbour, in [0, 1).
        eval_crop_fraction: Centre crop the encoder sees (the run's ``data.eval_crop_fraction``).
        tissue_params: Tissue detection (default: the preprocessing defaults).
        tissue_threshold: Minimum tissue fraction of a kept patch.
        chunk_size: Patches read and encoded at once (default ``model.eval_chunk_size``).
        progress: Called with (patches done, total) after each chunk.

    Returns:
        The :class:`OverlapAttention`.

    Raises:
        ValueError: If ``overlap`` is out of range or no patch lies on tissue.
    """
    tissue_params = tissue_params or TissueParams()
    seg_ds = segmentation_downsample(slide.dimensions, tissue_params)
    tissue = segment_tissue(slide.read_downsampled(seg_ds), seg_ds, slide.resolution.mpp, tissue_params)
    spec = grid_spec(slide, magnification, patch_size)
    stride = overlap_stride(spec.size_level0, overlap)
    coords = overlap_grid(slide.dimensions, spec.size_level0, stride, tissue, tissue_threshold)
    if len(coords) == 0:
        raise UserError(
            f"{slide.path}: no {magnification:g}x patch has more than {tissue_threshold:g} tissue; "
            "check the slide's tissue mask (`e2e-wsi preprocess` QC images)"
        )
    transform = EvalTransform(eval_patch_size, crop_fraction=eval_crop_fraction)
    chunk = chunk_size or model.eval_chunk_size
    feats: list[torch.Tensor] = []
    seconds = {"read": 0.0, "model": 0.0}
    with model.evaluating():
        for start in range(0, len(coords), chunk):
            t0 = time.perf_counter()
            images = read_patches(slide, spec, coords[start : start + chunk], patch_size)
            t1 = time.perf_counter()
            feats.append(model.encode_patches(transform(images)))
            seconds["read"] += t1 - t0
            seconds["model"] += time.perf_counter() - t1
            if progress is not None:
                progress(min(start + chunk, len(coords)), len(coords))
        t0 = time.perf_counter()
        out = model.aggregate(torch.cat(feats)[None], None)
        seconds["model"] += time.perf_counter() - t0
    att = SlideAttention(
        slide_id=slide_id,
        attention=out["attention"][0].float().numpy(),
        coords=coords,
        size_level0=spec.size_level0,
        dimensions=(int(slide.dimensions[0]), int(slide.dimensions[1])),
    )
    return OverlapAttention(att, out["outputs"].float(), stride, spec, tissue, seconds)


def read_patches(slide: Slide, spec: GridSpec, coords: np.ndarray, patch_size: int) -> torch.Tensor:
    """Read patches from the slide: uint8 [n, 3, patch_size, patch_size] RGB."""
    stack = np.stack([np.asarray(read_patch(slide, spec, xy, patch_size)) for xy in coords])
    return torch.from_numpy(stack).permute(0, 3, 1, 2).contiguous()
