"""New slides tiled like a run's training slides: its preprocessing params as a ``PreprocessConfig``.

The params themselves (``RUN/preprocess.json``, or the training cache's for older runs) are read by
:mod:`e2e_wsi.runs.preprocess`, which owns that file.
"""

from __future__ import annotations

from typing import Any

from e2e_wsi.annotations.geojson import AnnotationRules
from e2e_wsi.cache.worker import PreprocessConfig
from e2e_wsi.errors import UserError
from e2e_wsi.slides.tissue import TissueParams


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
        from e2e_wsi.stain import StainNormalizer

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
