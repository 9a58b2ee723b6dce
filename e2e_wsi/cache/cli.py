"""``e2e-wsi cache info CACHE_DIR``: what a patch cache holds (slides, patches per magnification, size).

``e2e-wsi cache verify CACHE_DIR``: check every patch against its checksum and list damaged ones by slide
(exit 1 when any is damaged).
"""

from __future__ import annotations

import json
from pathlib import Path

from e2e_wsi.cache.store import PatchCache, verify_cache
from e2e_wsi.cli_common import ArgumentParser


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - loop always returns


def _failures(paths: list[Path]) -> list[dict]:
    """Failed slides listed in the summary files next to the LMDBs."""
    rows: list[dict] = []
    for folder in sorted({p.parent for p in paths}):
        for summary in sorted(folder.glob("summary*.json")):
            try:
                data = json.loads(summary.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            rows += [r for r in data.get("slides", []) if r.get("status") == "failed"]
    return rows


def info(path: str | Path) -> int:
    """Print a table of the cache at ``path``; returns the exit status."""
    from rich.console import Console
    from rich.table import Table

    cache = PatchCache(path)
    ids = cache.slide_ids()
    mags = sorted({m for s in ids for m in cache.magnifications(s)}, reverse=True)
    table = Table(title=f"patch cache {path}")
    table.add_column("slide_id", style="bold")
    for mag in mags:
        table.add_column(f"{mag:g}x", justify="right")
    table.add_column("mpp", justify="right")
    table.add_column("tissue", justify="right")
    table.add_column("reader")
    totals = dict.fromkeys(mags, 0)
    for slide_id in ids:
        meta = cache.meta(slide_id)
        cells = []
        for mag in mags:
            n = cache.count(slide_id, mag) if mag in cache.magnifications(slide_id) else 0
            totals[mag] += n
            cells.append(str(n))
        # Caches written before reader backends have no "backend" key: OpenSlide was the only reader then.
        reader = meta.get("backend", "openslide")
        table.add_row(slide_id, *cells, f"{meta['mpp']:.3f}", f"{meta['tissue_fraction']:.1%}", reader)
    table.add_section()
    table.add_row(f"total: {len(ids)} slides", *(str(totals[m]) for m in mags), "", "", "")
    console = Console()
    console.print(table)
    disk = sum(f.stat().st_size for p in cache.paths for f in p.glob("*.mdb"))
    n_patches = sum(totals.values())
    console.print(
        f"{len(cache.paths)} LMDB file(s): {', '.join(p.name for p in cache.paths)}; {n_patches} patches; "
        f"{_human(disk)} on disk ({_human(disk / max(n_patches, 1))} per patch)"
    )
    failed = _failures(cache.paths)
    if failed:
        console.print(f"[red]{len(failed)} slide(s) failed in the last run(s):[/red]")
        for row in failed:
            console.print(f"  {row.get('slide_id')}: {row.get('reason')}")
    return 0


def verify(path: str | Path, decode: bool = False, max_listed: int = 20) -> int:
    """Print the damaged patches of the cache at ``path`` by slide; returns 0 if intact, 1 if not."""
    report = verify_cache(path, decode=decode)
    for lmdb_path, message in report.corrupted.items():
        print(f"DAMAGED LMDB {lmdb_path}: {message}")
    for slide_id, bad in sorted(report.damaged.items()):
        print(f"slide {slide_id}: {len(bad)} damaged entr{'y' if len(bad) == 1 else 'ies'}")
        for key, why in bad[:max_listed]:
            print(f"  {key}: {why}")
        if len(bad) > max_listed:
            print(f"  ... and {len(bad) - max_listed} more")
    if report.unchecked:
        print(
            f"{len(report.unchecked)} slide(s) have no checksums (cache format 1): their patches were decoded "
            "instead; re-run preprocess into a new --out to add checksums"
        )
    if report.unchecked_meta:
        print(
            f"{len(report.unchecked_meta)} slide(s) have no metadata checksum (written by an older version); "
            "re-run preprocess with --overwrite on them to add one"
        )
    n_bad = sum(len(v) for v in report.damaged.values())
    verdict = "OK" if report.ok else "DAMAGED"
    print(
        f"{verdict}: {report.patches} patches checked, {n_bad} damaged in {len(report.damaged)} slide(s)"
        + (f", {len(report.corrupted)} unreadable LMDB(s)" if report.corrupted else "")
        + ("" if report.ok else "; re-run `e2e-wsi preprocess --overwrite` on those slides into a new --out")
    )
    return 0 if report.ok else 1


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi cache`` command line (sub-commands ``info`` and ``verify``)."""
    parser = ArgumentParser(prog="e2e-wsi cache", description="Inspect or verify a patch cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="slides, patches per magnification and size of a cache")
    info_parser.add_argument("path", type=Path, help="cache directory, an .lmdb directory")
    verify_parser = sub.add_parser("verify", help="check every patch's checksum; exit 1 if any is damaged")
    verify_parser.add_argument("path", type=Path, help="cache directory, an .lmdb directory")
    verify_parser.add_argument("--decode", action="store_true", help="also decode every JPEG (slower)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``e2e-wsi cache`` (``info``, ``verify``); returns the exit status.

    A missing or damaged cache raises a user error, which the dispatcher reports (exit 2).
    """
    args = build_parser().parse_args(argv)
    return info(args.path) if args.command == "info" else verify(args.path, decode=args.decode)
