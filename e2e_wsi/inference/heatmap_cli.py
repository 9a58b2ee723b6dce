"""``e2e-wsi heatmap``: run a trained model on every patch of a slide and draw its attention.

Thin command line over :mod:`e2e_wsi.inference` (loading the run, attention, the figure). Patch runs read
the run's patch cache; feature (two-stage) runs read the slide's features and draw at their coordinates
(:mod:`e2e_wsi.inference.features`). It lives in ``inference`` because it runs a model; :mod:`e2e_wsi.viz`
only draws.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cli_common import ArgumentParser
from e2e_wsi.errors import UserError
from e2e_wsi.features.store import FeatureFolder
from e2e_wsi.inference.attention import slide_attention
from e2e_wsi.inference.features import (
    SlideFile,
    is_feature_run,
    make_feature_heatmap,
    slide_file_from_manifest,
)
from e2e_wsi.inference.heatmaps import make_heatmap, make_overlap_heatmap_from_cache_meta
from e2e_wsi.runs.folder import RunFolder
from e2e_wsi.runs.loading import LoadedRun, load_run
from e2e_wsi.runs.resolve import resolve_checkpoints
from e2e_wsi.viz.heatmap import HeatmapOptions


def _overlap_fraction(text: str) -> float:
    """``--overlap`` value: a number in [0, 1), refused at parse time with the usage line."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.5-0.9)") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is outside [0, 1) (e.g. 0.5-0.9)")
    return value


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi heatmap`` command line."""
    p = ArgumentParser(
        prog="e2e-wsi heatmap",
        description="Run a trained model on every patch of a slide and draw its attention: RUN/heatmaps/"
        "<slide_id>.png (+ .localization.json with a ground truth; + .overlay.tif with --overlap).",
    )
    p.add_argument("--ckpt_path", default=None, help="checkpoint of a run (RUN/checkpoints/*.ckpt)")
    p.add_argument(
        "--run", default=None, help="run folder of `fit` (its best checkpoint), instead of --ckpt_path"
    )
    p.add_argument("--slide", nargs="+", required=True, help="slide id(s) in the cache or feature folder")
    p.add_argument("--config", default=None, help="run config (default: RUN/config.yaml)")
    p.add_argument("--cache_dir", nargs="+", default=None, help="patch cache (default: the run config's)")
    p.add_argument(
        "--features_dir", default=None, help="feature runs: feature folder (default: the run config's)"
    )
    p.add_argument(
        "--slide_path",
        nargs="+",
        default=None,
        help="feature runs: the slide file(s), one per --slide (default: the manifest's path column; "
        "without one the map is drawn on white)",
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN/heatmaps)")
    p.add_argument("--top_k", type=int, default=16, help="patches in the top-attention mosaic")
    p.add_argument("--normalize", choices=["rank", "percentile"], default="rank", help="colour scaling")
    p.add_argument("--per_head", action="store_true", help="also draw one map per attention head")
    p.add_argument(
        "--all_scales", action="store_true", help="use every training magnification, not only the main one"
    )
    p.add_argument(
        "--mask", default=None, help="ground-truth lesion mask PNG (255 = lesion) for localisation"
    )
    p.add_argument("--mask_dir", default=None, help="folder of ground-truth masks <slide_id>.png")
    p.add_argument(
        "--annotations",
        default=None,
        help="folder of QuPath GeoJSON <slide_id>.geojson with lesion annotations",
    )
    p.add_argument(
        "--overlap",
        type=_overlap_fraction,
        default=None,
        metavar="F",
        help="read patches overlapping by F (0 <= F < 1, e.g. 0.5-0.9) from the slide itself and blend "
        "their attention into a smooth map (CLAM-style); also writes SLIDE.overlay.tif, a pyramidal "
        "TIFF overlay that OpenSlide and QuPath open",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``e2e-wsi heatmap``; bad input raises a user error (the dispatcher prints it, exit 2)."""
    return _heatmaps(build_parser().parse_args(argv))


def _options(args: argparse.Namespace) -> HeatmapOptions:
    return HeatmapOptions(
        top_k=args.top_k,
        method=args.normalize,
        per_head=args.per_head,
        mask=args.mask,
        mask_dir=args.mask_dir,
        annotations_dir=args.annotations,
    )


def _heatmaps(args: argparse.Namespace) -> int:
    if bool(args.ckpt_path) == bool(args.run):
        raise UserError("give exactly one of --ckpt_path CKPT or --run RUN")
    ckpt = resolve_checkpoints(args.run, [args.ckpt_path] if args.ckpt_path else None)[0]
    loaded = load_run(ckpt, args.config)
    data_cfg = loaded.data
    out_dir = Path(args.out) if args.out else RunFolder.of_checkpoint(ckpt).heatmaps_dir
    if is_feature_run(loaded):
        return _feature_heatmaps(loaded, args, out_dir)
    cache = PatchCache(args.cache_dir or data_cfg["cache_dir"])
    mags = (
        [float(m) for m in data_cfg.get("magnifications", [10.0])]
        if args.all_scales
        else loaded.eval_magnifications
    )
    for slide_id in args.slide:
        if args.overlap is not None:
            _overlap_heatmap(loaded, cache, slide_id, out_dir, args, mags)
            continue
        summary = make_heatmap(
            loaded.model,
            cache,
            slide_id,
            out_dir,
            magnifications=mags,
            patch_size=loaded.eval_patch_size,
            options=_options(args),
            class_names=data_cfg.get("class_names"),
            crop_fraction=loaded.eval_crop_fraction,
        )
        _report(summary)
    return 0


def _report(summary: dict) -> None:
    print(f"e2e-wsi: heatmap {summary['png']} ({summary['prediction']})")
    if summary["localization"] is not None:
        print(f"e2e-wsi: localisation AUROC {summary['localization']['auroc']}")


def _feature_heatmaps(loaded: LoadedRun, args: argparse.Namespace, out_dir: Path) -> int:
    """Heatmaps of a feature run: attention over the slide's features, drawn at their coordinates."""
    if args.overlap is not None:
        raise UserError("--overlap reads patches for a patch encoder; a feature run has none: drop --overlap")
    if args.slide_path is not None and len(args.slide_path) != len(args.slide):
        raise UserError(f"give one --slide_path per --slide ({len(args.slide_path)} for {len(args.slide)})")
    features_dir = args.features_dir or loaded.data.get("features_dir")
    if not features_dir:
        raise UserError("the run config names no data.features_dir: pass --features_dir FEATURES")
    folder = FeatureFolder(features_dir)
    for i, slide_id in enumerate(args.slide):
        slide_file = (
            SlideFile(Path(args.slide_path[i]))
            if args.slide_path
            else slide_file_from_manifest(loaded.data.get("manifest"), slide_id)
        )
        summary = make_feature_heatmap(
            loaded,
            folder,
            slide_id,
            out_dir,
            slide_file=slide_file,
            options=_options(args),
        )
        _report(summary)
    return 0


def _overlap_heatmap(
    loaded: LoadedRun,
    cache: PatchCache,
    slide_id: str,
    out_dir: Path,
    args: argparse.Namespace,
    mags: list[float],
) -> None:
    """``--overlap``: caption the cached bag's prediction (as in predictions.csv), map overlapping patches."""
    from tqdm import tqdm

    model = loaded.model
    att, out = slide_attention(
        model, cache, slide_id, mags, loaded.eval_patch_size, loaded.eval_crop_fraction
    )
    meta = cache.meta(slide_id)
    options = _options(args)
    truth = options.truth(slide_id, att.dimensions)
    bar = tqdm(desc=f"{slide_id}: scoring overlapping patches", unit="patch", leave=False)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    with bar:
        files = make_overlap_heatmap_from_cache_meta(
            model,
            meta,
            out_dir,
            magnification=mags[0],
            eval_patch_size=loaded.eval_patch_size,
            eval_crop_fraction=loaded.eval_crop_fraction,
            overlap=args.overlap,
            truth=truth,
            class_names=loaded.data.get("class_names"),
            prediction={k: v.numpy() for k, v in model.task.predict(out["outputs"]).items()},
            options=options,
            progress=progress,
        )
    print(f"e2e-wsi: heatmap {files.png} ({files.n_patches} overlapping patches; {files.caption})")
    print(f"e2e-wsi: overlay {files.overlay} (pyramidal TIFF: open it in QuPath or with OpenSlide)")
