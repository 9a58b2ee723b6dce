"""``e2e-wsi synth``: write a synthetic cohort of pyramidal slides with known lesions."""

from __future__ import annotations

import time

from e2e_wsi.cli_common import ArgumentParser
from e2e_wsi.slides.writer import SLIDE_FORMATS
from e2e_wsi.tasks import cohort_task_kinds


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi synth`` command line."""
    parser = ArgumentParser(
        prog="e2e-wsi synth",
        description="Write DIR/slides/<slide_id>.svs, DIR/masks/<slide_id>.png and DIR/manifest.csv: "
        "Aperio-like pyramidal TIFFs (40x, 0.25 um/px, downsamples 1/4/16) with H&E-like tissue and "
        "label-carrying lesions.",
    )
    cohorts = cohort_task_kinds()
    trains = ", ".join(f"{cohort} -> {kind}" for cohort, kind in cohorts.items())
    parser.add_argument(
        "--task",
        choices=tuple(cohorts),
        default="subtype",
        help=f"cohort kind; each trains as one task kind ({trains}) (default subtype)",
    )
    parser.add_argument("--num_slides", type=int, default=24, help="number of slides (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same cohort")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--size", type=int, default=8192, help="level-0 side in px, multiple of 16")
    parser.add_argument(
        "--lesion_fraction",
        type=float,
        default=0.03,
        help="share of tissue covered by lesion, in [0, 1] (default 0.03)",
    )
    parser.add_argument(
        "--lesion_foci",
        type=int,
        default=None,
        help="separate lesion foci per slide sharing the lesion area (default: a few blobs "
        "~0.9-1.5k level-0 px across, as many as the area needs)",
    )
    parser.add_argument(
        "--distractor_fraction",
        type=float,
        default=0.0,
        help="share of non-lesion tissue covered by lymphoid aggregates that appear whatever the label "
        "(mask value 192; default 0, none)",
    )
    parser.add_argument("--num_classes", type=int, default=2, help="subtype classes (default 2)")
    parser.add_argument("--num_grades", type=int, default=6, help="grades for --task grade (default 6)")
    parser.add_argument("--slides_per_case", type=int, default=1, help="slides of each case (patient)")
    parser.add_argument(
        "--negative_fraction",
        type=float,
        default=None,
        help="share of lesion-free cases for --task diagnosis (default 0.5)",
    )
    parser.add_argument(
        "--no_metadata", action="store_true", help="write generic tiled TIFFs without objective power / MPP"
    )
    parser.add_argument(
        "--format",
        dest="slide_format",
        choices=SLIDE_FORMATS,
        default="svs",
        help="slide files: svs (Aperio pyramidal TIFF), ome-tiff (.ome.tif, SubIFD pyramid) or dicom "
        "(a folder of .dcm per slide; needs pip install 'e2e-wsi[dicom]') (default svs)",
    )
    parser.add_argument("--pen_marks", action="store_true", help="draw a marker stroke on each slide")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the tiles")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cohort in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``e2e-wsi synth``.

    Args:
        argv: Arguments after the verb; ``None`` reads ``sys.argv[1:]``.

    Returns:
        0 on success.

    Raises:
        ValueError: Bad input (the dispatcher prints it, exit 2).
    """
    args = build_parser().parse_args(argv)
    from e2e_wsi.synth.cohort import synthesize_cohort

    start = time.perf_counter()
    manifest = synthesize_cohort(
        args.out,
        task=args.task,
        num_slides=args.num_slides,
        seed=args.seed,
        size=args.size,
        lesion_fraction=args.lesion_fraction,
        num_classes=args.num_classes,
        num_grades=args.num_grades,
        slides_per_case=args.slides_per_case,
        negative_fraction=args.negative_fraction,
        with_metadata=not args.no_metadata,
        pen_marks=args.pen_marks,
        workers=args.workers,
        quality=args.quality,
        overwrite=args.overwrite,
        slide_format=args.slide_format,
        lesion_foci=args.lesion_foci,
        distractor_fraction=args.distractor_fraction,
    )
    print(
        f"wrote {args.num_slides} {args.task} slides in {time.perf_counter() - start:.1f} s; "
        f"manifest: {manifest} (train it as a {cohort_task_kinds()[args.task]} task)"
    )
    return 0
