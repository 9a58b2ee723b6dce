"""Load and validate a cohort manifest (the users' CSV convention).

Columns: ``case_id,slide_id`` and the task's truth columns (its spec's ``manifest_columns``, checked
by its ``parse_manifest``):

* classification / grading: ``label``
* survival: ``time,event``
* regression: ``target``
* optional: ``split`` (``train``/``val``/``test``) and ``path`` (the slide file, written by ``synth``).

Every problem is collected first and reported in one :class:`ValueError` that names each offending CSV
line (the header is line 1) and slide id, so a user fixes the file in one pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import pandas as pd

from e2e_wsi.tables import read_table
from e2e_wsi.tasks import get_task_spec
from e2e_wsi.tasks._checks import where as _where
from e2e_wsi.utils import validate_slide_id

SPLITS: tuple[str, ...] = ("train", "val", "test")
_MAX_LISTED = 50  # a 10k-row broken manifest should not print 10k lines


class _SlideLister(Protocol):
    def slide_ids(self) -> list[str]: ...


def _check_ids(df: pd.DataFrame, errors: list[str], cache: _SlideLister | None) -> None:
    cached = set(cache.slide_ids()) if cache is not None else None
    first_line: dict[str, int] = {}
    for _, row in df.iterrows():
        slide_id, case_id = row["slide_id"], row["case_id"]
        if not isinstance(case_id, str) or not case_id:
            errors.append(f"{_where(row)}: empty case_id")
        elif problem := _case_id_problem(case_id):
            errors.append(f"{_where(row)}: case_id {case_id!r} {problem}")
        if not isinstance(slide_id, str):
            errors.append(f"{_where(row)}: empty slide_id")
            continue
        try:
            validate_slide_id(slide_id)
        except ValueError as exc:
            errors.append(f"{_where(row)}: {exc}")
            continue
        if slide_id in first_line:
            errors.append(f"{_where(row)}: duplicate slide id (first seen on line {first_line[slide_id]})")
        else:
            first_line[slide_id] = int(row["line"])
        if cached is not None and slide_id not in cached:
            errors.append(f"{_where(row)}: slide is not in the patch cache (run `e2e-wsi preprocess` on it)")


def _case_id_problem(case_id: str) -> str | None:
    """Why a case id cannot be used, or ``None``: the slide-id rule, checked here for every verb alike
    (case ids name prediction rows and survival bag files, which ``test`` and ``evaluate`` check)."""
    try:
        validate_slide_id(case_id, "case_id")
    except ValueError:
        return (
            "is not a valid id: use 1-128 characters from [A-Za-z0-9._-], not starting with '.' and "
            "without '..' (the rule of slide ids)"
        )
    return None


def _file_fingerprint(path: Path, chunk: int = 1 << 20) -> tuple[int, str]:
    """Size and a hash of the first and last MiB: equal for copies of one slide, cheap for huge files."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(chunk, size - chunk))
            digest.update(handle.read(chunk))
    return size, digest.hexdigest()


def _slide_files(df: pd.DataFrame, base: Path, cache: _SlideLister | None) -> dict[int, Path]:
    """Row position -> slide file, from the ``path`` column (relative to the manifest) or the cache."""
    meta = getattr(cache, "meta", None)
    cached = set(cache.slide_ids()) if cache is not None and callable(meta) else set()
    files: dict[int, Path] = {}
    for pos, row in enumerate(df.to_dict("records")):
        raw = row.get("path")
        if isinstance(raw, str) and raw:
            files[pos] = Path(raw) if Path(raw).is_absolute() else base / raw
        elif row.get("slide_id") in cached and (source := meta(row["slide_id"]).get("source_path")):  # type: ignore[misc]
            files[pos] = Path(source)
    return files


def check_duplicate_files(df: pd.DataFrame, base: Path, cache: _SlideLister | None = None) -> list[str]:
    """Rows that list one slide file twice (a leak between splits when the ids differ).

    Files are compared by resolved path, then, among existing files of equal size, by a hash of their
    first and last MiB, so a copy under another name is found too without reading every slide.

    Args:
        df: Manifest rows with ``slide_id``, ``line`` and optionally ``path`` and ``case_id``.
        base: Folder relative paths are resolved against (the manifest's).
        cache: Gives ``source_path`` of rows without a path, when it has ``meta()``.

    Returns:
        One message per duplicate pair, naming both lines.
    """
    files = _slide_files(df, base, cache)
    sizes: dict[int, int] = {pos: f.stat().st_size for pos, f in files.items() if f.is_file()}
    size_count = pd.Series(list(sizes.values()), dtype="int64").value_counts().to_dict() if sizes else {}
    errors: list[str] = []
    first_of: dict[object, int] = {}
    for pos, file in files.items():
        keys: list[tuple[str, object]] = [("the same file", file.resolve())]
        if size_count.get(sizes.get(pos, -1), 0) > 1:
            keys.append(("identical files", _file_fingerprint(file)))
        for how, key in keys:
            if (how, key) in first_of:
                errors.append(_duplicate_message(df.iloc[pos], df.iloc[first_of[(how, key)]], how, file))
                break
            first_of[(how, key)] = pos
    return errors


def _duplicate_message(row: pd.Series, first: pd.Series, how: str, file: Path) -> str:
    def who(r: pd.Series) -> str:
        return f"line {r['line']} (slide_id {r['slide_id']!r}, case_id {r.get('case_id')!r})"

    return (
        f"{who(row)} and {who(first)} are {how} ({file}): one slide under two ids would leak between "
        "training and test; list it once"
    )


def _check_split(df: pd.DataFrame, errors: list[str]) -> None:
    if "split" not in df.columns:
        return
    if df["split"].isna().all():
        df.drop(columns="split", inplace=True)  # an empty column means "make the split for me"
        return
    df["split"] = df["split"].map(lambda v: v.lower() if isinstance(v, str) else v)
    for _, row in df.iterrows():
        if row["split"] not in SPLITS:
            errors.append(f"{_where(row)}: split {row['split']!r} must be one of {list(SPLITS)}")
    # Patient-level splits: a case on two sides would leak between training and test.
    for case_id, group in df[df["split"].isin(SPLITS)].groupby("case_id", sort=False):
        if group["split"].nunique() > 1:
            lines = ", ".join(str(v) for v in group["line"])
            errors.append(f"lines {lines} (case_id {case_id!r}): slides of one case are in different splits")


def load_manifest(
    path: str | Path,
    task: str,
    num_classes: int | None = None,
    cache: _SlideLister | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a manifest CSV and validate every row up front.

    Args:
        path: The CSV file.
        task: A task kind; its spec names the truth columns (``label``; ``time`` and ``event``; ``target``).
        num_classes: K for classification/grading; labels must lie in 0..K-1 and every class must have a
            slide. ``None`` infers K from the largest label (or from ``class_names``). Ignored by the
            other kinds.
        cache: A :class:`~e2e_wsi.cache.store.PatchCache` (anything with ``slide_ids()``); when given,
            every slide must be in it.
        class_names: Optional names; a label equal to a name maps to its index.

    Returns:
        One row per slide with ``case_id``, ``slide_id`` (str), the truth columns (``label`` int64;
        ``time`` float64 and ``event`` int64; ``target`` float64), ``line`` (the CSV line), plus ``split``/``path`` when present.

    Raises:
        FileNotFoundError: If the file is missing.
        ValueError: Listing every offending line (and the missing columns, if any).
    """
    spec = get_task_spec(task)
    path = Path(path)
    df = read_table(path)
    needed = ["case_id", "slide_id", *spec.manifest_columns]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(
            f"manifest {path}: missing column(s) {missing}; a {task} manifest needs {needed} "
            f"(found {[c for c in df.columns if c != 'line']})"
        )
    if df.empty:
        raise ValueError(f"manifest {path} has no rows")
    errors: list[str] = []
    _check_ids(df, errors, cache)
    errors += check_duplicate_files(df, path.parent, cache)
    spec.parse_manifest(df, errors, num_classes, class_names)
    _check_split(df, errors)
    if errors:
        shown = errors[:_MAX_LISTED]
        more = f"\n  ... and {len(errors) - _MAX_LISTED} more" if len(errors) > _MAX_LISTED else ""
        raise ValueError(f"manifest {path} has {len(errors)} problem(s):\n  " + "\n  ".join(shown) + more)
    spec.finish_manifest(df)
    return df
