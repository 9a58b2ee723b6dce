"""`make demo` ends with a list of every file it wrote, one line on what each is."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _demo():
    spec = importlib.util.spec_from_file_location("e2e_demo_outputs", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_written_file_is_described(tmp_path: Path, capsys) -> None:
    files = [
        "cohort/manifest.csv",
        *(f"cohort/slides/case{i}.svs" for i in range(5)),
        "run/config.yaml",
        "run/checkpoints/best-epoch=3.ckpt",
        "run/checkpoints/last.ckpt",
        "run/heatmaps/case1.png",
        "run/heatmaps/case1.overlay.tif",
        "run/heatmaps/case1.localization.json",
        "run/stray.bin",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    demo = _demo()
    rows = dict(demo.describe_outputs(tmp_path))
    # Five slides collapse into one line with their count; the rest are listed one by one.
    assert rows["cohort/slides/* (5 files)"].startswith("synthetic slides")
    assert "pyramidal TIFF" in rows["run/heatmaps/case1.overlay.tif"]
    assert "heatmap figure" in rows["run/heatmaps/case1.png"]
    assert "lesions" in rows["run/heatmaps/case1.localization.json"]
    assert "validation loss" in rows["run/checkpoints/best-epoch=3.ckpt"]
    assert rows["run/stray.bin"] == "other output"  # never silently dropped
    assert len(rows) == len(files) - 4
    demo.print_outputs(tmp_path)
    printed = capsys.readouterr().out
    assert "run/heatmaps/case1.overlay.tif" in printed and str(tmp_path.resolve()) in printed
