"""``e2e-wsi predict``: a trained model (or an ensemble) on new, unlabelled slide files.

Thin command line over :func:`e2e_wsi.inference.pipeline.predict_slides`; :data:`DESCRIPTION` is its
``--help`` text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e2e_wsi.annotations.geojson import (
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    UNCLASSIFIED_CHOICES,
    AnnotationRules,
    check_annotation_dir,
)
from e2e_wsi.cache.preprocess import jobs_from_dir, jobs_from_manifest
from e2e_wsi.cache.worker import SlideJob
from e2e_wsi.cli_common import ArgumentParser
from e2e_wsi.errors import UserError
from e2e_wsi.slides.backends.base import is_url
from e2e_wsi.slides.sources import slide_exists, slide_id_of

# Lightning-free here: `predict --onnx` runs an exported model without importing it (the model modules
# are imported inside main() only when a checkpoint is used).

DESCRIPTION = """\
Run a trained model (or an ensemble) on new, unlabelled slide files.

  e2e-wsi predict --run RUN --slides a.svs b.ndpi --out OUT
  e2e-wsi predict --run CROSSVAL_DIR --slides slides/ --out OUT             # ensemble of the folds
  e2e-wsi predict --ckpt_path a.ckpt b.ckpt --manifest new.csv --out OUT    # ensemble of checkpoints

Given --config instead, predict runs a run's own data (its patch cache or its feature folder, e.g. a
two-stage run) through Lightning, like `test` without labels, and writes RUN/predict/:

  e2e-wsi predict --config RUN/config.yaml [--ckpt_path CKPT] [--data.features_dir DIR]
"""


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi predict`` command line (the ``--run``/``--slides`` route)."""
    p = ArgumentParser(prog="e2e-wsi predict", description=DESCRIPTION)
    p.add_argument(
        "--run", default=None, help="run folder of `fit` (best checkpoint) or of `crossval` (every fold)"
    )
    p.add_argument(
        "--ckpt_path",
        nargs="+",
        default=None,
        help="checkpoint file(s) (names inside RUN/checkpoints with --run)",
    )
    p.add_argument(
        "--onnx",
        default=None,
        help="folder of `e2e-wsi export` (ONNX or TorchScript + model.json) to run instead of a run or "
        "checkpoint, without Lightning; writes no heatmap PNGs (default: none)",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--slides", nargs="+", help="slide files or folders of slide files (id = file name stem)"
    )
    source.add_argument("--manifest", help="CSV with slide_id,path[,mpp]; no label column needed")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite or --add)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite", action="store_true", help="replace the predictions already in --out (default: refuse)"
    )
    existing.add_argument(
        "--add",
        action="store_true",
        help="add these slides to the predictions already in --out, one row per slide (same model only)",
    )
    p.add_argument("--mpp", type=float, default=None, help="um/px for slides without magnification metadata")
    p.add_argument("--cache_dir", default=None, help="where new slides are tiled (default OUT/cache)")
    p.add_argument("--workers", type=int, default=0, help="tiling processes (0 = none)")
    p.add_argument(
        "--annotations",
        default=None,
        help="folder of QuPath <slide_id>.geojson: include/exclude regions of the new slides, as in preprocess",
    )
    p.add_argument("--include_classes", nargs="+", default=None, help="classes to tile (with --annotations)")
    p.add_argument("--exclude_classes", nargs="+", default=None, help="classes to drop (with --annotations)")
    p.add_argument(
        "--unclassified",
        choices=UNCLASSIFIED_CHOICES,
        default="ignore",
        help="polygons without a class (with --annotations): ignore (with a warning) or tissue; default: ignore",
    )
    p.add_argument(
        "--stain_normalization",
        choices=("none", "macenko", "reinhard"),
        default="none",
        help="normalise new slides to --stain_reference (runs trained without it; a run trained on "
        "normalised patches always normalises new slides its own way); default: none",
    )
    p.add_argument("--stain_reference", default=None, help="reference image for --stain_normalization")
    p.add_argument("--no_heatmaps", action="store_true", help="skip the heatmap PNGs")
    p.add_argument("--per_head", action="store_true", help="heatmaps also show one map per head")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--allow_failures", action="store_true", help="exit 0 even when some slides could not be read"
    )
    return p


def annotation_rules(args: argparse.Namespace, jobs: list[SlideJob]) -> AnnotationRules | None:
    """``--annotations`` as rules (every file must name one of the slides), or ``None``."""
    if args.annotations is None:
        return None
    check_annotation_dir(Path(args.annotations), [j.slide_id for j in jobs])
    return AnnotationRules(
        str(Path(args.annotations).resolve()),
        tuple(args.include_classes or DEFAULT_INCLUDE),
        tuple(args.exclude_classes or DEFAULT_EXCLUDE),
        args.unclassified,
    )


def stain_option(args: argparse.Namespace) -> object:
    """``--stain_normalization``/``--stain_reference`` as a fitted normaliser, or ``None``."""
    if args.stain_normalization == "none" and args.stain_reference is None:
        return None
    from e2e_wsi.stain import StainNormalizer

    return StainNormalizer.from_options(args.stain_normalization, args.stain_reference)


def slide_jobs(slides: list[str] | None, manifest: str | None) -> list[SlideJob]:
    """Jobs from ``--slides`` (slide files, DICOM slide folders, folders of slides, URLs) or ``--manifest``.

    Raises:
        UserError: If nothing is found or an id repeats; FileNotFoundError: a file is missing (names it).
    """
    if manifest:
        jobs = jobs_from_manifest(manifest)
    else:
        jobs = []
        for item in slides or []:
            path = Path(item)
            if slide_exists(item):  # one slide: a file, a DICOM folder or a URL (e2e_wsi.slides.sources)
                jobs.append(SlideJob(slide_id_of(item), item if is_url(item) else path, None, str(item)))
            elif path.is_dir():
                jobs += jobs_from_dir(path)
            else:
                raise FileNotFoundError(f"slide file {path} not found")
    if not jobs:
        raise UserError(f"no slides found in {manifest or slides}")
    seen: dict[str, Path] = {}
    for job in jobs:
        if job.slide_id in seen:
            raise UserError(
                f"slide id {job.slide_id!r} is given twice ({seen[job.slide_id]} and {job.path}); "
                "ids are file names without extension: rename one, or use --manifest with unique ids"
            )
        seen[job.slide_id] = job.path
    return jobs


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``e2e-wsi predict``: 0 when every slide was predicted, 1 if some failed.

    Bad input raises a user error, which the dispatcher reports (exit 2).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        from e2e_wsi.training.cli import predict_main  # the run's own cache or features, through Lightning

        return predict_main(argv)
    args = build_parser().parse_args(argv)
    if args.onnx is not None:
        return _predict_exported(args)
    from e2e_wsi.inference.pipeline import PredictOptions, predict_slides
    from e2e_wsi.inference.predict import Ensemble

    ensemble = Ensemble.from_runs(args.run, args.ckpt_path)
    jobs = slide_jobs(args.slides, args.manifest)
    options = PredictOptions(
        mpp=args.mpp,
        cache_dir=args.cache_dir,
        workers=args.workers,
        heatmaps=not args.no_heatmaps,
        per_head=args.per_head,
        progress=not args.quiet,
        annotations=annotation_rules(args, jobs),
        stain=stain_option(args),
        out_mode="overwrite" if args.overwrite else "add" if args.add else "new",
    )
    summary = predict_slides(ensemble, jobs, args.out, options)
    failed = [s for s in summary["slides"] if s["status"] == "failed"]
    print(
        f"e2e-wsi: predicted {summary['counts']['ok']} slide(s) with {len(summary['checkpoints'])} "
        f"checkpoint(s) into {Path(args.out).resolve()}; {len(failed)} failed"
    )
    for s in failed:
        print(f"e2e-wsi predict: {s['slide_id']} ({s['path']}): {s['reason']}", file=sys.stderr)
    return 1 if failed and not args.allow_failures else 0


def _predict_exported(args: argparse.Namespace) -> int:
    """``predict --onnx DIR``: an exported model on raw slides (:mod:`e2e_wsi.export.runtime`)."""
    from e2e_wsi.export.runtime import predict_exported

    if args.run or args.ckpt_path:
        raise UserError("give --onnx or --run/--ckpt_path, not both")
    jobs = slide_jobs(args.slides, args.manifest)
    summary = predict_exported(
        args.onnx, jobs, args.out, mpp=args.mpp, cache_dir=args.cache_dir, workers=args.workers,
        progress=not args.quiet, annotations=annotation_rules(args, jobs), stain=stain_option(args),
    )  # fmt: skip
    failed = [s for s in summary["slides"] if s["status"] == "failed"]
    print(
        f"e2e-wsi: predicted {summary['counts']['ok']} slide(s) with the exported model {args.onnx} into "
        f"{Path(args.out).resolve()}; {len(failed)} failed"
    )
    for s in failed:
        print(f"e2e-wsi predict: {s['slide_id']} ({s['path']}): {s['reason']}", file=sys.stderr)
    return 1 if failed and not args.allow_failures else 0
