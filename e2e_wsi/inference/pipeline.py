"""``predict`` as a library call: raw slides in, predictions, attention, heatmaps and GeoJSON out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from e2e_wsi.annotations.geojson import (
    AnnotationRules,
    feature_collection,
    patch_features,
    tissue_features,
    write_feature_collection,
)
from e2e_wsi.cache.worker import SlideJob
from e2e_wsi.inference.heatmaps import write_heatmap
from e2e_wsi.inference.outputs import (
    OutMode,
    attention_frame,
    merge_previous,
    out_lock,
    predictions_frame,
    prepare_out,
    write_csv,
    write_json,
)
from e2e_wsi.inference.params import preprocess_config
from e2e_wsi.inference.predict import Ensemble, SlidePrediction
from e2e_wsi.inference.slides import TILING_KEYS, tile_for_inference
from e2e_wsi.slides.reader import SlideError, open_slide
from e2e_wsi.slides.tissue import TissueParams, segment_tissue, segmentation_downsample
from e2e_wsi.utils import validate_slide_id
from e2e_wsi.viz.heatmap import HeatmapOptions, format_caption


@dataclass(frozen=True)
class PredictOptions:
    """Choices of ``e2e-wsi predict`` beyond the slides and the checkpoints.

    Attributes:
        mpp: Micrometres per pixel for slides without magnification metadata.
        cache_dir: Where slides no existing cache holds are tiled (default ``OUT/cache``).
        workers: Tiling processes (0 = in this process).
        heatmaps: Write ``heatmaps/<slide_id>.png``.
        per_head: Heatmaps also show one map per head.
        progress: Progress bars.
        annotations: QuPath regions per new slide (``DIR/<slide_id>.geojson``) to tile or leave out.
        stain: Stain normaliser for new slides of a run trained without one (``--stain_normalization``).
        out_mode: What to do with an output folder that already holds predictions: ``new`` refuses it,
            ``overwrite`` replaces them, ``add`` adds these slides (one row per slide).
    """

    mpp: float | None = None
    cache_dir: str | None = None
    workers: int = 0
    heatmaps: bool = True
    per_head: bool = False
    progress: bool = True
    annotations: AnnotationRules | None = None
    stain: Any = None
    out_mode: OutMode = "new"


def predict_slides(
    ensemble: Ensemble, jobs: Sequence[SlideJob], out: str | Path, options: PredictOptions = PredictOptions()
) -> dict[str, Any]:
    """Tile new slides like the run's training slides and write every output of ``e2e-wsi predict``.

    One unreadable slide is recorded in ``summary.json`` with its reason; the others go on.

    Args:
        ensemble: The model(s) (their run folder gives the preprocessing parameters).
        jobs: The slides (no labels needed).
        out: Output folder.
        options: See :class:`PredictOptions`.

    Returns:
        The summary written to ``OUT/summary.json``.

    Raises:
        UserError: If ``out`` holds earlier outputs and ``options.out_mode`` is ``new``, or another
            ``predict`` is writing it.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with out_lock(out):
        cache_dir = Path(options.cache_dir) if options.cache_dir else None
        previous = prepare_out(out, options.out_mode, cache_dir)
        return _predict_locked(ensemble, jobs, out, options, previous)


def _predict_locked(
    ensemble: Ensemble, jobs: Sequence[SlideJob], out: Path, options: PredictOptions, previous: dict | None
) -> dict[str, Any]:
    """The body of :func:`predict_slides`, run while holding the output folder's lock."""
    from tqdm import tqdm

    first = ensemble.members[0]
    params = _shared_params(ensemble)
    config = preprocess_config(
        params, ensemble.magnifications, options.mpp, options.annotations, options.stain
    )
    train_cache = first.data.get("cache_dir")
    tiled = tile_for_inference(
        jobs,
        config,
        options.cache_dir or out / "cache",
        [train_cache] if train_cache else [],
        workers=options.workers,
        progress=options.progress,
    )
    records: dict[str, dict[str, Any]] = {}
    preds: list[SlidePrediction] = []
    bar = tqdm(jobs, desc="predict", unit="slide", disable=not options.progress, dynamic_ncols=True)
    for job in bar:
        record: dict[str, Any] = {"slide_id": job.slide_id, "path": str(job.path)}
        if job.slide_id in tiled.failures:
            record.update(status="failed", reason=tiled.failures[job.slide_id])
        else:
            try:
                pred = _one_slide(ensemble, job, tiled.caches[job.slide_id], out, options, params)
                preds.append(pred)
                record.update(status="ok", n_patches=int(pred.attention.coords.shape[0]))
                record["reused_cache"] = job.slide_id in tiled.reused
            except (SlideError, ValueError, OSError) as err:
                record.update(status="failed", reason=" ".join(str(err).split()))
        records[job.slide_id] = record
    summary = {
        "task": ensemble.task_kind,
        "checkpoints": [str(c) for c in ensemble.checkpoints],
        "class_names": ensemble.class_names,
        "magnifications": ensemble.magnifications,
        "patch_size": ensemble.patch_size,
        "preprocess": params,
        "counts": {s: sum(r["status"] == s for r in records.values()) for s in ("ok", "failed")},
        "slides": [records[j.slide_id] for j in jobs],
    }
    frame = predictions_frame(preds, ensemble.task_kind, ensemble.class_names)
    kept = merge_previous(previous, summary, out)  # --add: earlier slides first, one row per slide
    if kept is not None and len(kept):
        frame = pd.concat([kept, frame], ignore_index=True)
    write_csv(frame, out / "predictions.csv")
    write_json(summary, out / "summary.json")
    return summary


def _shared_params(ensemble: Ensemble) -> dict[str, Any]:
    """The preprocessing of the ensemble's runs, which must agree (the members see the same patches).

    Raises:
        ValueError: Naming two checkpoints whose runs were trained on differently tiled caches.
    """
    first = ensemble.members[0]
    params = first.preprocess_params()
    for m in ensemble.members[1:]:
        other = m.preprocess_params()
        differ = sorted(k for k in TILING_KEYS if other.get(k) != params.get(k))
        if differ:
            raise ValueError(
                f"checkpoints {first.checkpoint} and {m.checkpoint} were trained on caches tiled "
                f"differently ({', '.join(differ)}); an ensemble needs one preprocessing"
            )
    return params


def _one_slide(
    ensemble: Ensemble, job: SlideJob, cache, out: Path, options: PredictOptions, params: dict
) -> SlidePrediction:
    slide_id = validate_slide_id(job.slide_id)
    pred = ensemble.predict_slide(cache, slide_id)
    att = pred.attention
    write_csv(attention_frame(pred), out / "attention" / f"{slide_id}.csv")
    features = patch_features(att.coords, pred.size_level0, att.attention, pred.magnification, slide_id)
    with open_slide(job.path, slide_mpp=job.mpp, global_mpp=options.mpp) as slide:
        tissue_params = TissueParams(**params["tissue"])
        ds = segmentation_downsample(slide.dimensions, tissue_params)
        tissue = segment_tissue(slide.read_downsampled(ds), ds, slide.resolution.mpp, tissue_params)
    features += tissue_features(tissue.mask, tissue.downsample, slide_id)
    write_feature_collection(feature_collection(features), out / f"{slide_id}.geojson")
    if options.heatmaps:
        text = format_caption(
            pred.preds, ensemble.members[0].data.get("class_names"), kind=ensemble.task_kind
        )
        if len(ensemble.members) > 1:
            text += f" (mean of {len(ensemble.members)} checkpoints)"
        write_heatmap(
            att,
            cache,
            ensemble.magnifications[0],
            out / "heatmaps",
            prediction=text,
            options=HeatmapOptions(per_head=options.per_head),
        )
    return pred
