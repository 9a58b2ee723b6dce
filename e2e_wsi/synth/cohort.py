"""Synthetic cohorts of real pyramidal slides with known lesions (``e2e-wsi synth``).

Every slide is an Aperio-SVS-like tiled JPEG TIFF (or a generic tiled TIFF) that OpenSlide opens like a
scanner's output, with a ground-truth mask at downsample 16 and a manifest in the usual
``case_id,slide_id,path,label`` convention. Output is deterministic for a seed whatever the number of
workers: each slide draws from its own ``SeedSequence(seed, spawn_key=(i + 1,))`` stream.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from e2e_wsi.slides.writer import SLIDE_FORMATS, slide_suffix, write_slide_levels
from e2e_wsi.synth.render import GRID, TASKS, lesion_burden, paint_slide, render_slide, score_driven
from e2e_wsi.tasks import synth_cohorts
from e2e_wsi.utils import validate_slide_id

__all__ = ["TASKS", "SynthJob", "render_slide", "synthesize_cohort"]

DOWNSAMPLES = (1, 4, 16)
_OUTPUTS = ("slides", "masks", "manifest.csv", "synth.json")


@dataclass(frozen=True)
class SynthJob:
    """Everything one worker needs to paint and write one slide (plain values only)."""

    case_id: str
    slide_id: str
    label: float  # class / grade / 0-1 diagnosis, or the case score in [0, 1] of a score-driven cohort
    seed: int
    index: int
    size: tuple[int, int]
    task: str
    lesion_fraction: float
    num_classes: int
    num_grades: int
    pen_marks: bool
    mpp: float | None
    objective_power: float | None
    quality: int
    scale: int
    suffix: str
    fmt: str = "svs"  # one of e2e_wsi.slides.writer.SLIDE_FORMATS


def _check_params(
    task: str,
    num_slides: int,
    size: tuple[int, int],
    lesion_fraction: float,
    num_classes: int,
    num_grades: int,
    slides_per_case: int,
    negative_fraction: float | None,
    workers: int,
    scale: int,
    quality: int,
) -> None:
    """Reject impossible parameters before anything touches the disk."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if isinstance(num_slides, bool) or int(num_slides) != num_slides or num_slides < 1:
        raise ValueError(f"num_slides must be a positive integer, got {num_slides!r}")
    if isinstance(lesion_fraction, bool) or not 0.0 <= float(lesion_fraction) <= 1.0:  # NaN fails too
        raise ValueError(
            f"lesion_fraction is the share of tissue covered by lesion and must be in [0, 1], "
            f"got {lesion_fraction!r}"
        )
    if any(s < 512 or s % GRID for s in size):
        raise ValueError(
            f"slide size must be at least 512 px and a multiple of {GRID} (the mask is at "
            f"downsample {GRID}), got {size[0]}x{size[1]}"
        )
    if task == "subtype" and num_classes < 2:
        raise ValueError(f"task 'subtype' needs num_classes >= 2, got {num_classes}")
    if task == "grade" and num_grades < 2:
        raise ValueError(f"task 'grade' needs num_grades >= 2, got {num_grades}")
    if slides_per_case < 1:
        raise ValueError(f"slides_per_case must be >= 1, got {slides_per_case}")
    if negative_fraction is not None:
        if task != "diagnosis":
            raise ValueError("negative_fraction applies to task 'diagnosis' only")
        if not 0.0 <= negative_fraction <= 1.0:
            raise ValueError(f"negative_fraction must be in [0, 1], got {negative_fraction}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality is the JPEG quality and must be in [1, 100], got {quality}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if scale not in (1, 2, 4):
        raise ValueError(f"render_scale must be 1, 2 or 4, got {scale}")


def _balanced(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """n labels in 0..k-1 with counts differing by at most one, in a seeded random order."""
    return rng.permutation(np.arange(n) % k)


def _case_labels(
    rng: np.random.Generator,
    task: str,
    num_cases: int,
    num_classes: int,
    num_grades: int,
    negative_fraction: float,
) -> np.ndarray:
    """Per-case label: class, grade, 0/1 diagnosis, or the score in [0, 1] of a score-driven cohort."""
    if task == "subtype":
        return _balanced(rng, num_cases, num_classes).astype(np.float64)
    if task == "grade":
        return _balanced(rng, num_cases, num_grades).astype(np.float64)
    if task == "diagnosis":
        negatives = int(round(negative_fraction * num_cases))
        return rng.permutation(np.r_[np.zeros(negatives), np.ones(num_cases - negatives)])
    # score-driven (survival, regression): scores spread evenly over [0, 1], so every cohort spans low
    # to high burden
    return (rng.permutation(num_cases) + rng.random(num_cases)) / num_cases


def _write_slide(job: SynthJob, root: str) -> dict[str, object]:
    """Paint one slide, write its pyramid and mask under ``root``; return its summary (worker)."""
    rng = np.random.default_rng(np.random.SeedSequence(job.seed, spawn_key=(job.index + 1,)))
    small, truth = paint_slide(
        rng,
        job.size,
        job.task,
        job.label,
        job.lesion_fraction,
        num_classes=job.num_classes,
        num_grades=job.num_grades,
        pen_marks=job.pen_marks,
        scale=job.scale,
    )
    slide_path = Path(root, "slides", job.slide_id + job.suffix)
    write_slide_levels(
        slide_path,
        small,
        job.scale,
        job.size,
        fmt=job.fmt,
        key=job.slide_id,
        mpp=job.mpp,
        objective_power=job.objective_power,
        downsamples=DOWNSAMPLES,
        tile=256,
        quality=job.quality,
    )
    Image.fromarray(truth).save(Path(root, "masks", job.slide_id + ".png"), optimize=False)
    tissue = int((truth > 0).sum())
    return {
        "slide_id": job.slide_id,
        "tissue_fraction": round(tissue / truth.size, 4),
        "lesion_fraction": round(int((truth == 255).sum()) / max(tissue, 1), 4),
    }


def _run_jobs(jobs: list[SynthJob], root: Path, workers: int) -> list[dict[str, object]]:
    """Write all slides, in worker processes when ``workers > 1``; the first error is re-raised."""
    if workers == 1 or len(jobs) == 1:
        return [_write_slide(job, str(root)) for job in jobs]
    # forkserver: no fork of a parent that may hold threads (torch, pytest plugins)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)), mp_context=multiprocessing.get_context(method)
    ) as pool:
        futures = [pool.submit(_write_slide, job, str(root)) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def _manifest_text(jobs: list[SynthJob], outcomes: dict[str, dict[str, str]]) -> str:
    """The manifest: ``label`` per slide, or a score-driven cohort's truth columns per case."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    extra = list(next(iter(outcomes.values()))) if outcomes else ["label"]
    writer.writerow(["case_id", "slide_id", "path", *extra])
    for job in jobs:
        path = f"slides/{job.slide_id}{job.suffix}"
        truth = list(outcomes[job.case_id].values()) if outcomes else [int(job.label)]
        writer.writerow([job.case_id, job.slide_id, path, *truth])
    return buffer.getvalue()


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> list[Path]:
    """Create ``out_dir`` if needed; return the directories created here (to remove on failure)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output path {out_dir} exists and is not a directory; choose another --out")
    if out_dir.is_dir() and not overwrite:
        taken = [name for name in _OUTPUTS if (out_dir / name).exists()]
        if taken:
            raise ValueError(
                f"output directory {out_dir} already holds {', '.join(taken)}; "
                "choose an empty directory or pass overwrite=True (--overwrite)"
            )
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create output directory {out_dir}: {err}; choose a writable --out") from err
    return created


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Move the finished outputs from ``tmp`` into ``out_dir``, manifest last; undo on failure."""
    moved: list[Path] = []
    try:
        for name in _OUTPUTS:
            target = out_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(tmp / name, target)
            moved.append(target)
    except BaseException:
        for target in moved:
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        raise


def synthesize_cohort(
    out_dir: str | Path,
    task: str = "subtype",
    num_slides: int = 24,
    seed: int = 0,
    size: int | Sequence[int] = 8192,
    lesion_fraction: float = 0.03,
    num_classes: int = 2,
    num_grades: int = 6,
    slides_per_case: int = 1,
    negative_fraction: float | None = None,
    with_metadata: bool = True,
    pen_marks: bool = False,
    workers: int = 2,
    *,
    mpp: float = 0.25,
    objective_power: float = 40,
    quality: int = 90,
    render_scale: int = 4,
    overwrite: bool = False,
    slide_format: str = "svs",
) -> Path:
    """Write a synthetic cohort: slides, ground-truth masks and a manifest.

    Writes ``out_dir/slides/<slide_id>.svs`` (``.tif`` without metadata; ``.ome.tif`` or a DICOM folder
    ``<slide_id>/`` with ``slide_format``), ``out_dir/masks/<slide_id>.png``
    (uint8 at downsample 16: 0 background, 128 tissue, 255 lesion), ``out_dir/manifest.csv`` with
    ``case_id,slide_id,path,label`` (``case_id,slide_id,path,time,event`` for survival; ``path``
    relative to the manifest) and ``out_dir/synth.json`` (parameters and per-slide lesion fraction).
    Everything is written into a temporary directory first, so a failure leaves no partial cohort.

    Args:
        out_dir: Output directory (created if missing).
        task: ``subtype`` (classes differ in lesion morphology), ``grade`` (ordinal; grade 0 has no
            lesion, higher grades more burden and more solid high-grade morphology), ``survival``
            (hazard grows with lesion burden, independent censoring) or ``diagnosis`` (label 0 slides
            have no lesion).
        num_slides: Number of slides (>= 1).
        seed: Seed; the same seed gives a byte-identical manifest and identical pixels.
        size: Level-0 side (or (H, W)), a multiple of 16 and >= 512.
        lesion_fraction: Base share of tissue area covered by lesion, in [0, 1].
        num_classes: Subtype classes (labels 0..K-1, balanced over cases).
        num_grades: Grades K for ``grade`` (labels 0..K-1, balanced over cases).
        slides_per_case: Slides per case (they share the case's label / outcome).
        negative_fraction: Share of lesion-free cases for ``diagnosis`` (default 0.5).
        with_metadata: Aperio-style metadata (objective power, MPP); False writes generic TIFFs.
        pen_marks: Draw a marker stroke on each slide.
        workers: Processes painting slides in parallel.
        mpp: Microns per level-0 pixel stated in the metadata.
        objective_power: Magnification stated in the metadata.
        quality: JPEG quality of the tiles.
        render_scale: Level-0 px per painted px (4 paints at 10x and upsamples level 0).
        overwrite: Replace an existing cohort in ``out_dir``.
        slide_format: ``svs`` (Aperio), ``ome-tiff`` (``.ome.tif`` with SubIFDs) or ``dicom`` (a folder
            ``slides/<slide_id>/`` of one ``.dcm`` per level; needs ``pip install 'e2e-wsi[dicom]'``).

    Returns:
        Path of the manifest CSV.

    Raises:
        ValueError: On impossible parameters, or an output directory that cannot be written.
    """
    hw = _parse_size(size)
    _check_params(
        task,
        num_slides,
        hw,
        lesion_fraction,
        num_classes,
        num_grades,
        slides_per_case,
        negative_fraction,
        workers,
        render_scale,
        quality,
    )
    out_dir = Path(out_dir)
    # One planning stream draws, in this order, the case labels and then a score-driven cohort's outcomes.
    plan_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    num_cases = math.ceil(num_slides / slides_per_case)
    negatives = 0.5 if negative_fraction is None else negative_fraction
    labels = _case_labels(plan_rng, task, num_cases, num_classes, num_grades, negatives)
    template = SynthJob(
        case_id="",
        slide_id="",
        label=0.0,
        seed=int(seed),
        index=0,
        size=hw,
        task=task,
        lesion_fraction=float(lesion_fraction),
        num_classes=num_classes,
        num_grades=num_grades,
        pen_marks=pen_marks,
        mpp=mpp if with_metadata else None,
        objective_power=objective_power if with_metadata else None,
        quality=quality,
        scale=render_scale,
        suffix=_suffix(slide_format, with_metadata),
        fmt=slide_format,
    )
    jobs = _plan_jobs(template, labels, num_slides, slides_per_case)
    outcomes = _case_outcomes(plan_rng, task, labels, float(lesion_fraction)) if score_driven(task) else {}

    _write_atomically(
        out_dir, overwrite, lambda tmp: _write_cohort(tmp, jobs, outcomes, workers, seed, num_slides)
    )
    return out_dir / "manifest.csv"


def _suffix(slide_format: str, with_metadata: bool) -> str:
    """The slide files' suffix; rejects a format that cannot be written before anything is painted."""
    if slide_format not in SLIDE_FORMATS:
        raise ValueError(f"slide format must be one of {', '.join(SLIDE_FORMATS)}, got {slide_format!r}")
    if slide_format == "dicom":
        if not with_metadata:
            raise ValueError(
                "DICOM slides need a pixel spacing: drop --no-metadata or choose another --format"
            )
        from e2e_wsi.slides.dicom_writer import require_wsidicom

        require_wsidicom()
    return slide_suffix(slide_format, with_metadata)


def _write_atomically(out_dir: Path, overwrite: bool, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` in a temporary folder inside ``out_dir``, then move its outputs into place.

    A failure removes the temporary folder and the directories created here, so no partial cohort is
    left; an ``OSError`` becomes a ``ValueError`` that says what to check.
    """
    created = _prepare_out_dir(out_dir, overwrite)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".synth-tmp-", dir=out_dir))
        write(tmp)
        _move_into_place(tmp, out_dir)
    except OSError as err:
        _cleanup(tmp, created)
        raise ValueError(
            f"could not write the cohort to {out_dir}: {err}; check the directory is "
            "writable and has free space"
        ) from err
    except BaseException:
        _cleanup(tmp, created)
        raise
    _cleanup(tmp, [])


def _parse_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as (H, W): an int is a square side."""
    hw = (int(size), int(size)) if isinstance(size, int | np.integer) else tuple(int(s) for s in size)
    if len(hw) != 2:
        raise ValueError(f"size must be an int or (H, W), got {size!r}")
    return hw  # type: ignore[return-value]


def _plan_jobs(
    template: SynthJob, labels: np.ndarray, num_slides: int, slides_per_case: int
) -> list[SynthJob]:
    """One job per slide: ``template`` with the slide's ids, index and its case's label."""
    jobs = []
    for i in range(num_slides):
        case = i // slides_per_case
        case_id = validate_slide_id(f"case{case:04d}")
        slide_id = validate_slide_id(f"{case_id}-s{i % slides_per_case}")
        jobs.append(replace(template, case_id=case_id, slide_id=slide_id, label=float(labels[case]), index=i))
    return jobs


def _case_outcomes(
    rng: np.random.Generator, task: str, scores: np.ndarray, lesion_fraction: float
) -> dict[str, dict[str, str]]:
    """case id -> the manifest's truth columns of a score-driven cohort, made by its task spec from the
    cases' scores and lesion burdens (survival: Weibull time/event; regression: the target)."""
    _, cohort = synth_cohorts()[task]
    assert cohort.outcomes is not None
    burden = np.array([lesion_burden(task, float(s), lesion_fraction) for s in scores])
    columns = cohort.outcomes(rng, scores, burden)
    return {f"case{c:04d}": {name: values[c] for name, values in columns.items()} for c in range(scores.size)}


def _write_cohort(
    root: Path,
    jobs: list[SynthJob],
    outcomes: dict[str, dict[str, str]],
    workers: int,
    seed: int,
    num_slides: int,
) -> None:
    """Write slides, masks, ``manifest.csv`` and ``synth.json`` under ``root`` (a temporary folder)."""
    (root / "slides").mkdir()
    (root / "masks").mkdir()
    summaries = _run_jobs(jobs, root, workers)
    (root / "manifest.csv").write_text(_manifest_text(jobs, outcomes), encoding="utf-8")
    info = _cohort_info(jobs, summaries, seed, num_slides)
    (root / "synth.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def _cohort_info(
    jobs: list[SynthJob], summaries: list[dict[str, object]], seed: int, num_slides: int
) -> dict[str, object]:
    """The ``synth.json`` record: parameters and, per slide, its label and lesion fractions."""
    first = jobs[0]
    task = first.task
    return {
        "format_version": 1,
        "task": task,
        "seed": seed,
        "num_slides": num_slides,
        "size": list(first.size),
        "downsamples": list(DOWNSAMPLES),
        "mask_downsample": GRID,
        "params": {
            k: v
            for k, v in asdict(first).items()
            if k not in {"case_id", "slide_id", "label", "index", "size"}
        },
        "slides": [
            dict(
                s,
                case_id=job.case_id,
                label=job.label if score_driven(task) else int(job.label),
                target_lesion_fraction=round(
                    lesion_burden(task, job.label, first.lesion_fraction, first.num_grades), 4
                ),
            )
            for s, job in zip(summaries, jobs, strict=True)
        ],
    }


def _cleanup(tmp: Path | None, created: list[Path]) -> None:
    """Remove the temporary directory and the directories this call created (deepest first)."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in created:
        if not path.exists():
            continue
        try:
            path.rmdir()
        except OSError:
            print(f"e2e-wsi synth: could not remove {path}", file=sys.stderr)
