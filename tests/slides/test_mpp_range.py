"""MPP out of range (issue 21 item 11): nan, 1e-300, 1e-6 (manifest, --mpp, or the file's metadata) are
refused with one message, instead of a silent fallback, a ZeroDivisionError or "no tissue"."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_wsi.cache.preprocess import jobs_from_manifest
from e2e_wsi.cli import main as cli_main
from e2e_wsi.errors import UserError
from e2e_wsi.slides.mpp import check_mpp, mpp_problem
from e2e_wsi.slides.reader import SlideError, resolve_resolution

BAD = ["nan", "NaN", "1e-300", "1e-6", "inf", "-0.5", "0", "1e5", "abc"]


@pytest.mark.parametrize("value", BAD)
def test_every_bad_value_gets_the_one_message(value: str) -> None:
    assert mpp_problem(value) == (
        f"mpp {value!r} is not a number of micrometres per pixel in 0.01..100 (0.25 is 40x, 0.5 is 20x)"
    )
    with pytest.raises(UserError, match="row 3: mpp"):
        check_mpp(value, "row 3")


def test_real_values_pass() -> None:
    assert [check_mpp(v, "x") for v in ("0.25", 0.5, "8")] == [0.25, 0.5, 8.0]


@pytest.mark.parametrize("value", ["nan", "1e-300", "1e-6"])
def test_a_manifest_mpp_is_refused_naming_the_line(value: str, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"slide_id,path,mpp\na,a.svs,0.5\nb,b.svs,{value}\nc,c.svs,\n")
    with pytest.raises(UserError, match=rf"m.csv line 3: mpp '{value}' is not a number"):
        jobs_from_manifest(manifest)
    manifest.write_text("slide_id,path,mpp\na,a.svs,0.5\nc,c.svs,\n")
    assert [j.mpp for j in jobs_from_manifest(manifest)] == [0.5, None]


def test_overrides_and_metadata_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SlideError, match="per-slide override: mpp 1e-300"):
        resolve_resolution({}, "s.svs", slide_mpp=1e-300)
    with pytest.raises(SlideError, match="metadata: mpp 1e-06 .*--mpp"):
        resolve_resolution({"openslide.mpp-x": "1e-6"}, "s.svs")
    assert resolve_resolution({"openslide.mpp-x": "0.25"}, "s.svs").objective_power == 40.0
    args = ["--slides-dir", str(tmp_path), "--out", str(tmp_path / "c"), "--magnifications", "10"]
    assert cli_main(["preprocess", *args, "--mpp", "1e-300"]) == 2  # one line through the dispatcher
    assert "--mpp: mpp 1e-300 is not a number" in capsys.readouterr().err
