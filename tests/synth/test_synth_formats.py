"""``e2e-wsi synth --format svs|ome-tiff|dicom``: the same cohort in every format, read back by every backend."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from e2e_wsi.cli import main as cli_main
from e2e_wsi.slides import open_slide


def main(argv: list[str]) -> int:
    """``e2e-wsi synth ARGV`` through the dispatcher (it turns input errors into exit 2)."""
    return cli_main(["synth", *argv])


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_formats_hold_the_same_slides(tmp_path: Path, capsys) -> None:
    args = ["--num-slides", "1", "--size", "1024", "--workers", "1", "--seed", "7"]
    for fmt in ("svs", "ome-tiff", "dicom"):
        assert main([*args, "--out", str(tmp_path / fmt), "--format", fmt]) == 0
    paths = {fmt: _rows(tmp_path / fmt)[0]["path"] for fmt in ("svs", "ome-tiff", "dicom")}
    assert paths == {
        "svs": "slides/case0000-s0.svs",
        "ome-tiff": "slides/case0000-s0.ome.tif",
        "dicom": "slides/case0000-s0",
    }
    regions = {}
    for fmt, rel in paths.items():
        with open_slide(tmp_path / fmt / rel, "tiffslide" if fmt == "svs" else None) as slide:
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            assert slide.resolution.mpp == pytest.approx(
                0.25
            ) and slide.resolution.objective_power == pytest.approx(40)
            regions[fmt] = [np.asarray(slide.read_rgb((200, 300), level, (128, 96))) for level in range(3)]
    for fmt in ("ome-tiff", "dicom"):
        assert all(np.array_equal(a, b) for a, b in zip(regions[fmt], regions["svs"], strict=True)), fmt


def test_dicom_needs_pixel_spacing(tmp_path: Path, capsys) -> None:
    argv = [
        "--out",
        str(tmp_path / "c"),
        "--num-slides",
        "1",
        "--size",
        "512",
        "--format",
        "dicom",
        "--no-metadata",
    ]
    assert main(argv) == 2
    assert "DICOM slides need a pixel spacing" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
