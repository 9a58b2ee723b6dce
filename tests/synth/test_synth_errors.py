"""Bad input to synthesize_cohort / `e2e-wsi synth`: clear errors and no partial files."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e_wsi import cli
from e2e_wsi.synth import cohort as synth
from e2e_wsi.synth.cohort import synthesize_cohort


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_slides": 0}, "num_slides must be a positive integer"),
        ({"num_slides": -3}, "num_slides must be a positive integer"),
        ({"lesion_fraction": -0.01}, r"lesion_fraction .* \[0, 1\]"),
        ({"lesion_fraction": 1.5}, r"lesion_fraction .* \[0, 1\]"),
        ({"task": "segmentation"}, "unknown task 'segmentation'"),
        ({"size": 1000}, "multiple of 16"),
        ({"size": 256}, "at least 512"),
        ({"num_classes": 1}, "num_classes >= 2"),
        ({"task": "grade", "num_grades": 1}, "num_grades >= 2"),
        ({"negative_fraction": 0.5}, "'diagnosis' only"),
        ({"task": "diagnosis", "negative_fraction": 2.0}, "negative_fraction"),
        ({"slides_per_case": 0}, "slides_per_case"),
        ({"workers": 0}, "workers"),
        ({"quality": 0}, "quality"),
    ],
)
def test_impossible_parameters_touch_nothing(tmp_path: Path, kwargs: dict, message: str) -> None:
    out = tmp_path / "new" / "cohort"
    args = {"num_slides": 2, "size": 512, "workers": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        synthesize_cohort(out, **args)
    assert _leftovers(tmp_path) == []


def test_unwritable_output_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"a_file.*writable|not a directory"):
        synthesize_cohort(blocker / "cohort", num_slides=1, size=512, workers=1)
    with pytest.raises(ValueError, match="not a directory"):
        synthesize_cohort(blocker, num_slides=1, size=512, workers=1)
    assert _leftovers(tmp_path) == ["a_file"]
    assert blocker.read_text() == "not a directory"


def test_existing_cohort_is_not_clobbered(tmp_path: Path) -> None:
    out = tmp_path / "c"
    manifest = synthesize_cohort(out, num_slides=1, size=512, workers=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds.*overwrite"):
        synthesize_cohort(out, num_slides=2, size=512, workers=1, seed=5)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert manifest.exists()


def test_crash_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the first slide was written removes the temporary cohort and the new dir."""
    real = synth._write_slide

    def fail_on_second(job: synth.SynthJob, root: str) -> dict[str, object]:
        if job.index == 1:
            raise RuntimeError("disk on fire")
        return real(job, root)

    monkeypatch.setattr(synth, "_write_slide", fail_on_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        synthesize_cohort(tmp_path / "x" / "cohort", num_slides=3, size=512, workers=1)
    assert _leftovers(tmp_path) == []
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError):
        synthesize_cohort(tmp_path / "empty", num_slides=3, size=512, workers=1)
    assert _leftovers(tmp_path) == ["empty"]


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    status = cli.main(
        [
            "synth",
            "--task",
            "diagnosis",
            "--num-slides",
            "2",
            "--seed",
            "4",
            "--size",
            "512",
            "--workers",
            "1",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    assert "manifest" in capsys.readouterr().out
    lines = (out / "manifest.csv").read_text().splitlines()
    assert lines[0] == "case_id,slide_id,path,label" and len(lines) == 3
    assert len(list((out / "slides").glob("*.svs"))) == 2 and len(list((out / "masks").glob("*.png"))) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-slides", "0"], "num_slides"),
        (["--lesion-fraction", "2"], "lesion_fraction"),
    ],
)
def test_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "bad"
    status = cli.main(["synth", "--out", str(out), "--size", "512", *argv])
    assert status == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_unknown_task_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", "--task", "segmentation", "--out", str(tmp_path / "t")])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert _leftovers(tmp_path) == []
