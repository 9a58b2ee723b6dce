"""``predict --slides``: a DICOM folder is one slide, a folder of slides is its slides (e2e_wsi.slides.sources)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2e_wsi.inference.cli import slide_jobs
from e2e_wsi.inference.features import slide_file_from_manifest
from e2e_wsi.slides.writer import write_pyramidal_tiff, write_slide_levels


def test_dicom_folder_is_one_slide_in_predict(tmp_path: Path) -> None:
    image = np.full((512, 512, 3), 200, np.uint8)
    (tmp_path / "slides").mkdir()
    common = {"mpp": 0.5, "objective_power": 20, "downsamples": (1, 4), "tile": 256, "quality": 90}
    dicom = write_slide_levels(tmp_path / "slides" / "d1", image, 1, (512, 512), fmt="dicom", **common)
    write_pyramidal_tiff(tmp_path / "slides" / "t1.svs", image, mpp=0.5, downsamples=(1, 4))
    (tmp_path / "slides" / "notes.txt").write_text("not a slide")
    jobs = slide_jobs([str(dicom)], None)
    assert [(j.slide_id, j.path) for j in jobs] == [("d1", dicom)]
    assert [j.slide_id for j in slide_jobs([str(tmp_path / "slides")], None)] == ["d1", "t1"]
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,path\nd1,slides/d1\n")
    assert slide_file_from_manifest(manifest, "d1").path == dicom  # heatmaps find a DICOM slide too
