"""The preprocessing a run was trained with, so new slides are tiled the same way.

``fit`` records the cache's per-slide ``params`` (:mod:`e2e_wsi.cache.store` metadata) as
``RUN/preprocess.json`` (:func:`e2e_wsi.cache.params.record_preprocess_params`); runs trained before
that are read lazily from the training cache named in their ``config.yaml``.
"""

from __future__ import annotations

import json
from typing import Any

from e2e_wsi.annotations.geojson import AnnotationRules
from e2e_wsi.cache.params import cache_params
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.slides.tissue import TissueParams
from e2e_wsi.training.run import RunFolder


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
) -> PreprocessConfig:
    """The :class:`PreprocessConfig` that tiles new slides like the run's training slides.

    Args:
        params: The run's preprocessing parameters.
        magnifications: Only the magnifications inference needs (the evaluation ones).
        mpp: ``--mpp`` for slides without magnification metadata.
        annotations: QuPath include/exclude regions of the new slides (``predict --annotations``).
    """
    grid = grid_rules(params)
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
