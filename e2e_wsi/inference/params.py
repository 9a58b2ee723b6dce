"""The preprocessing a run was trained with, so new slides are tiled the same way.

``fit`` records the cache's per-slide ``params`` (:mod:`e2e_wsi.cache.store` metadata) as
``RUN/preprocess.json``; runs trained before that are read lazily from the training cache named in
their ``config.yaml``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from e2e_wsi.annotations.geojson import AnnotationRules
from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.errors import UserError
from e2e_wsi.slides.tissue import TissueParams
from e2e_wsi.training.run import RunFolder


def cache_params(cache_dir: str | list[str]) -> dict[str, Any]:
    """The ``params`` of a training cache's first slide (every slide of a run shares them).

    Raises:
        ValueError: If the cache holds no slide.
    """
    cache = PatchCache(cache_dir)
    ids = cache.slide_ids()
    if not ids:
        raise ValueError(f"patch cache {cache_dir} holds no slide")
    return dict(cache.meta(ids[0])["params"])


def record_preprocess_params(run: RunFolder, cache_dir: str | list[str]) -> Path | None:
    """Write ``RUN/preprocess.json`` from the training cache (atomic; skipped if the cache is unreadable)."""
    try:
        params = cache_params(cache_dir)
    except (ValueError, OSError, KeyError):
        return None  # the datamodule reports a bad cache with a better message
    run.root.mkdir(parents=True, exist_ok=True)
    tmp = run.preprocess.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"cache_dir": cache_dir, "params": params}, indent=2) + "\n")
    os.replace(tmp, run.preprocess)
    return run.preprocess


def preprocess_params(run: RunFolder, data_cfg: dict) -> dict[str, Any]:
    """The run's preprocessing parameters: ``RUN/preprocess.json``, else its training cache's.

    Raises:
        FileNotFoundError: If neither is available (the message says what to do).
    """
    if run.preprocess.is_file():
        return dict(json.loads(run.preprocess.read_text())["params"])
    cache_dir = data_cfg.get("cache_dir")
    try:
        return cache_params(cache_dir)
    except (ValueError, OSError, KeyError, TypeError):
        raise FileNotFoundError(
            f"run folder {run.root} has no preprocess.json and its training cache {cache_dir!r} is not "
            "readable: copy the cache back, or write preprocess.json from the cache's summary.json params"
        ) from None


def preprocess_config(
    params: dict[str, Any],
    magnifications: list[float],
    mpp: float | None = None,
    annotations: AnnotationRules | None = None,
    stain: Any = None,
) -> PreprocessConfig:
    """The :class:`PreprocessConfig` that tiles new slides like the run's training slides.

    Args:
        params: The run's preprocessing parameters.
        magnifications: Only the magnifications inference needs (the evaluation ones).
        mpp: ``--mpp`` for slides without magnification metadata.
        annotations: QuPath include/exclude regions of the new slides (``predict --annotations``).
        stain: A ``StainNormalizer`` for new slides of a run trained without one (``predict
            --stain_normalization``); the run's own normaliser, when it recorded one, is always used.

    Raises:
        UserError: ``stain`` given for a run that recorded another normalisation.
    """
    grid = grid_rules(params)
    if params.get("stain_normalization"):  # the run's patches were normalised: new slides are too
        from e2e_wsi.data.stain import StainNormalizer

        recorded = StainNormalizer.from_dict(params["stain_normalization"])
        if stain is not None and stain != recorded:
            raise UserError(
                f"the run was trained on patches normalised with {recorded.method} to "
                f"{recorded.reference or 'its reference'}; leave --stain_normalization out (it is applied)"
            )
        stain = recorded
    return PreprocessConfig(
        magnifications=tuple(float(m) for m in magnifications),
        patch_size=int(params["patch_size"]),
        jpeg_quality=int(params["jpeg_quality"]),
        tissue_threshold=float(params["tissue_threshold"]),
        min_coverage=float(grid["min_coverage"]),
        grid_anchor=grid["grid_anchor"],
        tissue=TissueParams(**params["tissue"]),
        mpp=mpp,
        annotations=annotations,
        stain=stain,
    )


def grid_rules(params: dict[str, Any]) -> dict[str, Any]:
    """How a cache chose its patches: ``min_coverage`` and ``grid_anchor``.

    Caches written before these parameters existed (format 1) tiled from the slide origin on the tissue
    threshold alone, which is what their absence means.
    """
    return {
        "min_coverage": params.get("min_coverage", 0.0),
        "grid_anchor": params.get("grid_anchor", "origin"),
    }
