"""Tests of `e2e-wsi cache info`."""

from __future__ import annotations

from pathlib import Path

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cli import main as cli_main


def main(argv: list[str]) -> int:
    """``e2e-wsi cache ARGV`` through the dispatcher (it turns input errors into exit 2)."""
    return cli_main(["cache", *argv])


def test_cache_info_lists_slides_and_counts(clean_cache: Path, capsys) -> None:
    assert main(["info", str(clean_cache)]) == 0
    out = capsys.readouterr().out
    cache = PatchCache(clean_cache)
    total = 0
    for slide_id in cache.slide_ids():
        assert slide_id in out
        total += cache.count(slide_id, 20) + cache.count(slide_id, 10)
    assert f"{total} patches" in out and "20x" in out and "on disk" in out


def test_cache_info_missing(tmp_path: Path, capsys) -> None:
    assert main(["info", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
