"""``e2e-wsi preprocess``: tissue detection, multi-magnification tiling, and the LMDB patch cache.

Worker processes read and encode slides (see :mod:`e2e_wsi.cache.worker`); the main process is the
single LMDB writer and commits each slide in one transaction, so killing the run at any moment loses at
most the slides in flight and a re-run resumes exactly (complete slides with the same parameters are
skipped). ``--shard i/n`` keeps the slides whose CRC32 of the id is ``i`` mod ``n`` and writes
``shard-i-of-n.lmdb``, so shards can run on separate machines into one cache directory.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from e2e_wsi.cache.identity import identity_change
from e2e_wsi.cache.store import LMDB_SUFFIX, CacheWriter, read_staged, write_failure
from e2e_wsi.cache.worker import DEFAULT_MAX_PIXELS, PreprocessConfig, SlideJob, process_slide
from e2e_wsi.errors import UserError
from e2e_wsi.locks import CacheLock
from e2e_wsi.slides.backends import backend_names
from e2e_wsi.slides.backends.base import is_url
from e2e_wsi.slides.mpp import check_mpp
from e2e_wsi.slides.sources import find_slides, slide_id_of
from e2e_wsi.slides.tiling import GRID_ANCHORS

# Worker state set by the pool initializer (one per worker process).
_WORKER: dict[str, Any] = {}


def jobs_from_manifest(manifest: str | Path) -> list[SlideJob]:
    """Slides listed in a manifest CSV (columns ``slide_id`` and ``path``; optional ``mpp``).

    Read with the same reader as every other verb (:func:`e2e_wsi.tables.read_table`: a BOM or
    spaces around column names are fine). Paths are relative to the manifest's folder unless absolute or
    fsspec URLs (``s3://...``, read by tiffslide); a path may name a DICOM folder (one slide).
    Other columns (labels) are ignored.

    Raises:
        FileNotFoundError: If the manifest is missing.
        ValueError: If the file is empty, a required column is missing, a row has an empty path or a bad
            ``mpp``, or a slide id repeats; the message names the line.
    """
    from e2e_wsi.tables import read_table  # pandas: imported here, not in every worker process

    manifest = Path(manifest)
    table = read_table(manifest)
    missing = {"slide_id", "path"} - set(table.columns)
    if missing:
        raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}; expected at least slide_id,path")
    jobs: list[SlideJob] = []
    seen: dict[str, int] = {}
    for row in table.to_dict("records"):
        line = int(row["line"])
        slide_id = row["slide_id"] if isinstance(row["slide_id"], str) else ""
        rel = row["path"] if isinstance(row["path"], str) else ""
        if not rel:
            raise ValueError(f"{manifest} line {line}: empty path for slide {slide_id!r}")
        if slide_id in seen:
            raise ValueError(f"{manifest} line {line}: slide_id {slide_id!r} repeats line {seen[slide_id]}")
        seen[slide_id] = line
        mpp_text = row.get("mpp") if isinstance(row.get("mpp"), str) else ""
        mpp = check_mpp(mpp_text, f"{manifest} line {line}") if mpp_text else None
        path: Path | str = (
            rel if is_url(rel) else Path(rel) if Path(rel).is_absolute() else manifest.parent / rel
        )
        jobs.append(SlideJob(slide_id, path, mpp, f"{manifest.name} line {line}"))
    return jobs


def jobs_from_dir(slides_dir: str | Path) -> list[SlideJob]:
    """One job per slide in a folder (not recursive): slide files, and DICOM folders (one slide each).

    The id is the file name without extension, or the DICOM folder's name (see :mod:`e2e_wsi.slides.sources`).
    """
    return [SlideJob(slide_id_of(p), p, None, str(p)) for p in find_slides(slides_dir)]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ValueError(f"--shard {text}: need n >= 1 and 0 <= i < n")
    return index, count


def shard_name(shard: tuple[int, int]) -> str:
    """LMDB directory name of a shard: ``patches.lmdb`` or ``shard-01-of-04.lmdb``."""
    index, count = shard
    return f"patches{LMDB_SUFFIX}" if count == 1 else f"shard-{index:02d}-of-{count:02d}{LMDB_SUFFIX}"


def summary_name(shard: tuple[int, int]) -> str:
    """Summary file of a shard: ``summary.json`` or ``summary-shard-01-of-04.json``."""
    index, count = shard
    return "summary.json" if count == 1 else f"summary-shard-{index:02d}-of-{count:02d}.json"


def in_shard(slide_id: str, shard: tuple[int, int]) -> bool:
    """Deterministic, order-independent shard membership (stable when slides are added)."""
    return zlib.crc32(slide_id.encode()) % shard[1] == shard[0]


def _init_worker(config: PreprocessConfig, staging: Path, qc_dir: Path | None, queue: Any) -> None:
    _WORKER.update(config=config, staging=staging, qc_dir=qc_dir, queue=queue)


def _run_in_worker(job: SlideJob) -> dict[str, Any]:
    return process_slide(job, _WORKER["config"], _WORKER["staging"], _WORKER["qc_dir"], _WORKER["queue"])


def _params_mismatch(jobs: list[SlideJob], existing: dict[str, dict], config: PreprocessConfig) -> list[str]:
    lines = []
    for job in jobs:
        old = existing.get(job.slide_id)
        if old is not None and old.get("params") != config.params(job.mpp):
            diff = sorted(
                k
                for k in set(old.get("params", {})) | set(config.params(job.mpp))
                if old.get("params", {}).get(k) != config.params(job.mpp).get(k)
            )
            lines.append(f"{job.slide_id} (differs in {', '.join(diff)})")
    return lines


def preprocess(
    jobs: Sequence[SlideJob],
    out_dir: str | Path,
    config: PreprocessConfig,
    *,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    qc: bool = True,
    progress: bool = True,
    map_size: int = 1 << 30,
) -> list[dict[str, Any]]:
    """Preprocess slides into ``out_dir`` (LMDB + ``summary.json`` + ``qc/``) and return the summary rows.

    Args:
        jobs: Slides (see :func:`jobs_from_manifest`, :func:`jobs_from_dir`).
        out_dir: Cache directory (created).
        config: What to cut and how.
        workers: Reader/encoder processes; 0 runs everything in this process.
        shard: ``(i, n)``: process only this shard's slides into its own LMDB.
        overwrite: Re-do slides cached with different parameters instead of raising.
        qc: Write ``qc/<slide_id>.png``.
        progress: Show a tqdm progress bar (stderr).
        map_size: Initial LMDB map size in bytes (grows by doubling).

    Returns:
        One dict per slide of the shard: ``slide_id``, ``path``, ``status`` ('ok'/'failed'), ``reason``
        (failed), ``patches``, ``tissue_coverage`` and ``background_share`` {mag: value} and ``cached``
        (True if skipped because already complete).

    Raises:
        ValueError: If slides are already cached with different parameters and ``overwrite`` is False.
        CacheLockedError: If another run is writing the same shard of ``out_dir``.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_failure(out_dir, err) or err from None
    jobs = [j for j in jobs if in_shard(j.slide_id, shard)]
    if dupes := sorted({j.slide_id for j in jobs if sum(k.slide_id == j.slide_id for k in jobs) > 1}):
        raise ValueError(f"slide ids repeat: {dupes[:5]}; give each slide file a unique id")
    lmdb_path = out_dir / shard_name(shard)
    lock = CacheLock(out_dir / f".{shard_name(shard)}.lock", what=f"cache {lmdb_path}")
    try:
        lock.acquire()
    except OSError as err:
        raise write_failure(out_dir, err) or err from None
    try:
        rows = _preprocess_locked(
            jobs, out_dir, lmdb_path, config, workers, shard, overwrite, qc, progress, map_size
        )
        ordered = [rows[j.slide_id] for j in jobs if j.slide_id in rows]
        _write_summary(out_dir / summary_name(shard), ordered, config, shard)
    finally:
        lock.release()
    return ordered


def _preprocess_locked(
    jobs: list[SlideJob],
    out_dir: Path,
    lmdb_path: Path,
    config: PreprocessConfig,
    workers: int,
    shard: tuple[int, int],
    overwrite: bool,
    qc: bool,
    progress: bool,
    map_size: int,
) -> dict[str, dict[str, Any]]:
    """The body of :func:`preprocess`, run while holding the shard's lock: skip, tile, commit."""
    writer = CacheWriter(lmdb_path, map_size=map_size)
    try:
        rows, todo = _split_cached(jobs, writer, config, overwrite)
        staging = out_dir / ".staging" / shard_name(shard)
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a killed run are never committed
        staging.mkdir(parents=True)
        qc_dir = out_dir / "qc" if qc else None
        if qc_dir is not None:
            qc_dir.mkdir(exist_ok=True)
        for record in _run(todo, config, staging, qc_dir, workers, progress):
            if record.get("disk_full"):  # every later slide would fail alike: stop with one message
                raise UserError(record["reason"])
            rows[record["slide_id"]] = _commit(writer, record)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.parent.rmdir()  # only if no other shard is staging here right now
        except OSError:
            pass
    finally:
        writer.close()
    return rows


def _split_cached(
    jobs: list[SlideJob], writer: CacheWriter, config: PreprocessConfig, overwrite: bool
) -> tuple[dict[str, dict[str, Any]], list[SlideJob]]:
    """Rows of slides already cached with these parameters, and the jobs still to do.

    Raises:
        ValueError: If slides are cached with other parameters and ``overwrite`` is False.
    """
    existing = writer.all_meta()
    if not overwrite and (bad := _params_mismatch(jobs, existing, config)):
        raise ValueError(
            f"{len(bad)} slide(s) in {writer.path} were cached with different parameters: "
            + "; ".join(bad[:5])
            + ("; ..." if len(bad) > 5 else "")
            + ". Re-run with --overwrite to replace them, or use another --out."
        )
    rows: dict[str, dict[str, Any]] = {}
    todo, changed = [], []
    for job in jobs:
        old = existing.get(job.slide_id)
        if old is None or old.get("params") != config.params(job.mpp):
            todo.append(job)
        elif (why := identity_change(old, job.path)) is not None:
            changed.append(f"{job.slide_id} ({why})")
            todo.append(job)
        else:
            rows[job.slide_id] = _ok_row(job, old, cached=True)
    if changed and not overwrite:
        raise UserError(
            f"{len(changed)} slide(s) in {writer.path} were tiled from a different file than the one given "
            "now (same id, other file): "
            + "; ".join(changed[:5])
            + ("; ..." if len(changed) > 5 else "")
            + ". Re-run with --overwrite to re-tile them, or use another --out."
        )
    return rows, todo


def _ok_row(job: SlideJob, meta: dict, *, cached: bool) -> dict[str, Any]:
    mags = meta["magnifications"]
    return {
        "slide_id": job.slide_id,
        "path": str(job.path),
        "status": "ok",
        "patches": {m: info["count"] for m, info in mags.items()},
        # Share of the detected tissue inside kept patches, and of their area that is not tissue.
        "tissue_coverage": {m: info.get("tissue_coverage") for m, info in mags.items()},
        "background_share": {m: info.get("background_share") for m, info in mags.items()},
        "cached": cached,
    }


def _commit(writer: CacheWriter, record: dict[str, Any]) -> dict[str, Any]:
    if record["status"] != "ok":
        return {k: record[k] for k in ("slide_id", "path", "status", "reason")}
    meta, staging = record["meta"], Path(record["staging"])

    def patches() -> Iterator[
        tuple[float, int, bytes]
    ]:  # re-iterable for the writer's retry after growing the map
        data = read_staged(staging)
        for mag, info in meta["magnifications"].items():
            for index in range(info["count"]):
                yield float(mag), index, next(data)

    writer.commit_slide(meta, patches)
    staging.unlink()
    job = SlideJob(record["slide_id"], record["path"])
    return _ok_row(job, meta, cached=False)


def _run(
    todo: list[SlideJob],
    config: PreprocessConfig,
    staging: Path,
    qc_dir: Path | None,
    workers: int,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    """Yield worker records as slides finish, updating a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="slide", desc="preprocess", disable=not progress, dynamic_ncols=True)
    start, patches = time.perf_counter(), 0

    def tick(n: int) -> None:
        nonlocal patches
        patches += n
        bar.set_postfix_str(
            f"{patches} patches, {patches / max(time.perf_counter() - start, 1e-9):.0f} patches/s"
        )

    try:
        if workers <= 0:
            sink = type("Sink", (), {"put": staticmethod(tick)})()
            for job in todo:
                yield process_slide(job, config, staging, qc_dir, sink)
                bar.update()
            return
        ctx = mp.get_context("spawn")  # no fork: the parent holds an LMDB write handle
        queue = ctx.Queue()
        with ctx.Pool(
            min(workers, max(len(todo), 1)), _init_worker, (config, staging, qc_dir, queue)
        ) as pool:
            results = pool.imap_unordered(_run_in_worker, todo, chunksize=1)
            done = 0
            while done < len(todo):
                while not queue.empty():
                    tick(queue.get())
                try:
                    record = results.next(timeout=0.2)
                except mp.TimeoutError:
                    continue
                done += 1
                bar.update()
                yield record
    finally:
        bar.close()


def _write_summary(
    path: Path, rows: list[dict[str, Any]], config: PreprocessConfig, shard: tuple[int, int]
) -> None:
    summary = {
        "shard": list(shard),
        "params": config.params(None),
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed")},
        "coverage": _coverage_overview(rows),
        "slides": rows,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, path)  # readers never see a half-written summary


def _coverage_overview(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per magnification: the lowest tissue coverage and the mean background share over the ok slides."""
    out: dict[str, dict[str, float]] = {}
    mags = {m for r in rows for m in r.get("tissue_coverage", {})}
    for mag in sorted(mags, key=float, reverse=True):
        cov = [r["tissue_coverage"][mag] for r in rows if r.get("tissue_coverage", {}).get(mag) is not None]
        bg = [r["background_share"][mag] for r in rows if r.get("background_share", {}).get(mag) is not None]
        if cov:
            out[mag] = {
                "min_tissue_coverage": min(cov),
                "mean_background_share": round(sum(bg) / max(len(bg), 1), 4),
            }
    return out


def _print_failures(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    failed = [r for r in rows if r["status"] == "failed"]
    ok = len(rows) - len(failed)
    cached = sum(bool(r.get("cached")) for r in rows)
    console.print(f"preprocess: {ok} slide(s) ok ({cached} already cached), {len(failed)} failed")
    if failed:
        table = Table(title="failed slides", show_lines=False)
        table.add_column("slide_id", style="bold")
        table.add_column("path")
        table.add_column("reason", style="red")
        for row in failed:
            table.add_row(row["slide_id"], row["path"], row["reason"])
        console.print(table)


def _add_annotation_args(parser: Any) -> None:
    """``--annotations DIR`` (QuPath regions) and ``--geojson`` (tissue contours)."""
    from e2e_wsi.annotations.geojson import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, UNCLASSIFIED_CHOICES

    parser.add_argument("--annotations", type=Path, default=None, help="folder of QuPath <slide_id>.geojson")
    parser.add_argument("--include_classes", nargs="+", default=list(DEFAULT_INCLUDE), help="classes to tile")
    parser.add_argument("--exclude_classes", nargs="+", default=list(DEFAULT_EXCLUDE), help="classes to drop")
    parser.add_argument(
        "--unclassified",
        choices=UNCLASSIFIED_CHOICES,
        default="ignore",
        help="polygons without a class in --annotations files: ignore (with a warning) or tissue (tile "
        "inside them, e.g. TRIDENT/GrandQC contours); default: ignore",
    )
    parser.add_argument(
        "--geojson", action="store_true", help="write OUT/geojson/<slide_id>.geojson contours"
    )


def _with_annotations(config: PreprocessConfig, args: Any, jobs: list[SlideJob]) -> PreprocessConfig:
    """The config with annotation rules and the GeoJSON folder the flags ask for."""
    import dataclasses

    from e2e_wsi.annotations.geojson import AnnotationRules, check_annotation_dir

    rules = None
    if args.annotations is not None:
        check_annotation_dir(args.annotations, [j.slide_id for j in jobs])
        rules = AnnotationRules(
            str(args.annotations.resolve()),
            tuple(args.include_classes),
            tuple(args.exclude_classes),
            args.unclassified,
        )
    geojson_dir = None
    if args.geojson:
        geojson_dir = str(Path(args.out) / "geojson")
        Path(geojson_dir).mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(config, annotations=rules, geojson_dir=geojson_dir)


def build_parser() -> Any:
    """The ``e2e-wsi preprocess`` command line."""
    from e2e_wsi.cli_common import ArgumentParser

    parser = ArgumentParser(
        prog="e2e-wsi preprocess",
        description="Detect tissue, tile slides at several magnifications and cache the patches in LMDB.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--manifest", type=Path, help="CSV with slide_id,path[,mpp] (paths relative to its folder)"
    )
    source.add_argument(
        "--slides_dir", type=Path, help="folder of slide files (id = file name without extension)"
    )
    parser.add_argument("--out", type=Path, required=True, help="cache directory (LMDB, summary.json, qc/)")
    parser.add_argument("--magnifications", type=float, nargs="+", required=True, help="e.g. 10 5 20")
    parser.add_argument(
        "--patch_size", type=int, default=256, help="patch side in pixels at each magnification"
    )
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="0 = no subprocesses"
    )
    parser.add_argument("--mpp", type=float, default=None, help="um/px for slides without an mpp column")
    parser.add_argument("--shard", default=None, help="i/n: process only shard i of n")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace slides cached with other parameters"
    )
    parser.add_argument("--allow_failures", action="store_true", help="exit 0 even if some slides failed")
    parser.add_argument(
        "--stain_normalization",
        choices=("none", "macenko", "reinhard"),
        default="none",
        help="recolour every patch to --stain_reference's stain statistics before caching (each slide with "
        "its own statistics); recorded in the cache, so predict normalises new slides alike (default: none)",
    )
    parser.add_argument(
        "--stain_reference",
        type=Path,
        default=None,
        help="reference image (PNG/JPEG/TIFF of representative stained tissue) for --stain_normalization",
    )
    parser.add_argument("--jpeg_quality", type=int, default=90, help="JPEG quality of the cached patches")
    parser.add_argument(
        "--tissue_threshold",
        type=float,
        default=0.5,
        help="patches with more tissue than this fraction are always kept",
    )
    parser.add_argument(
        "--min_coverage",
        type=float,
        default=0.95,
        help="kept patches cover at least this share of the tissue (0 = threshold only; docs/tiling.md)",
    )
    parser.add_argument(
        "--grid_anchor",
        choices=GRID_ANCHORS,
        default="tissue",
        help="centre the grid on the tissue's bounding box, or start it at the slide's corner",
    )
    parser.add_argument(
        "--max_pixels",
        type=float,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse slides whose level 0 has more pixels than this (default {DEFAULT_MAX_PIXELS:.0e})",
    )
    parser.add_argument(
        "--saturation_threshold", default="8", help="HSV saturation threshold 0-255, or 'otsu'"
    )
    parser.add_argument(
        "--backend",
        choices=backend_names(),
        default=None,
        help="force this slide reader for every slide (default: the first that reads each file, OpenSlide first)",
    )
    parser.add_argument("--no_qc", action="store_true", help="do not write qc/<slide_id>.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_annotation_args(parser)
    return parser


def _config(args: Any) -> PreprocessConfig:
    """The run's :class:`PreprocessConfig` from parsed arguments; ``ValueError`` on a bad value."""
    from e2e_wsi.slides.tissue import TissueParams

    otsu = args.saturation_threshold.lower() == "otsu"
    try:
        saturation = {} if otsu else {"saturation_threshold": int(args.saturation_threshold)}
    except ValueError:
        raise ValueError(
            f"--saturation_threshold must be 0-255 or 'otsu', got {args.saturation_threshold!r}"
        ) from None
    return PreprocessConfig(
        magnifications=tuple(args.magnifications),
        patch_size=args.patch_size,
        jpeg_quality=args.jpeg_quality,
        tissue_threshold=args.tissue_threshold,
        min_coverage=args.min_coverage,
        grid_anchor=args.grid_anchor,
        tissue=TissueParams(use_otsu=otsu, **saturation),
        mpp=args.mpp,
        max_pixels=args.max_pixels,
        stain=_stain(args),
        backend=args.backend,
    )


def _stain(args: Any) -> Any:
    """``--stain_normalization``/``--stain_reference`` as a fitted normaliser, or ``None``."""
    if args.stain_normalization == "none" and args.stain_reference is None:
        return None  # torch stays unimported for the common case
    from e2e_wsi.stain import StainNormalizer

    return StainNormalizer.from_options(args.stain_normalization, args.stain_reference)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``e2e-wsi preprocess``: 0, or 1 when some slides failed.

    Raises:
        UserError: Bad input or a cache locked by another run (the dispatcher prints it, exit 2).
    """
    args = build_parser().parse_args(argv)
    config = _config(args)
    jobs = jobs_from_manifest(args.manifest) if args.manifest else jobs_from_dir(args.slides_dir)
    if not jobs:
        raise UserError(f"no slides found in {args.manifest or args.slides_dir}")
    config = _with_annotations(config, args, jobs)
    rows = preprocess(
        jobs,
        args.out,
        config,
        workers=args.workers,
        shard=parse_shard(args.shard),
        overwrite=args.overwrite,
        qc=not args.no_qc,
        progress=not args.quiet,
    )
    _print_failures(rows)
    failed = any(r["status"] == "failed" for r in rows)
    return 1 if failed and not args.allow_failures else 0
