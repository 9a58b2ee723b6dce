"""synthesize_cohort: real slides, masks and manifests per task; determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from PIL import Image
from scipy import ndimage

from e2e_wsi.synth.cohort import synthesize_cohort

SYNTH_SIZE = 2048


# Fixtures live here rather than in tests/slides/conftest.py, which other parts' tests share.
@pytest.fixture(scope="module")
def subtype_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest of a 4-slide subtype cohort written by 2 worker processes."""
    out = tmp_path_factory.mktemp("subtype") / "cohort"
    return synthesize_cohort(
        out, task="subtype", num_slides=4, seed=3, size=SYNTH_SIZE, lesion_fraction=0.05, workers=2
    )


@pytest.fixture(scope="module")
def survival_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest of a 6-slide survival cohort, 2 slides per case."""
    out = tmp_path_factory.mktemp("survival") / "cohort"
    return synthesize_cohort(
        out, task="survival", num_slides=6, seed=1, size=1024, slides_per_case=2, workers=1
    )


TASK_COLUMNS = {
    "subtype": ["case_id", "slide_id", "path", "label"],
    "grade": ["case_id", "slide_id", "path", "label"],
    "diagnosis": ["case_id", "slide_id", "path", "label"],
    "survival": ["case_id", "slide_id", "path", "time", "event"],
}


def _rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    with manifest.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _mask(manifest: Path, slide_id: str) -> np.ndarray:
    return np.asarray(Image.open(manifest.parent / "masks" / f"{slide_id}.png"))


def test_slides_open_with_metadata_and_masks(subtype_cohort: Path) -> None:
    columns, rows = _rows(subtype_cohort)
    assert columns == TASK_COLUMNS["subtype"]
    assert len(rows) == 4 and sorted(int(r["label"]) for r in rows) == [0, 0, 1, 1]
    for row in rows:
        path = subtype_cohort.parent / row["path"]
        assert path.suffix == ".svs" and path.parent.name == "slides"
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
            assert slide.level_count == 3
            assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
            assert float(slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]) == 40
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
            mask = _mask(subtype_cohort, row["slide_id"])
            assert mask.shape == (slide.dimensions[1] // 16, slide.dimensions[0] // 16)
            assert set(np.unique(mask)) == {0, 128, 255}


def _patch_mean(slide: openslide.OpenSlide, cell: tuple[int, int], level: int, size: int) -> np.ndarray:
    """Mean RGB of a ``size`` px read at ``level`` centred on mask cell (row, col)."""
    d = int(slide.level_downsamples[level])
    cx, cy = cell[1] * 16 + 8, cell[0] * 16 + 8
    # clamp into the slide: OpenSlide returns transparent black outside it
    x = int(np.clip(cx - size * d // 2, 0, slide.dimensions[0] - size * d))
    y = int(np.clip(cy - size * d // 2, 0, slide.dimensions[1] - size * d))
    region = slide.read_region((x, y), level, (size, size))
    return np.asarray(region.convert("RGB")).reshape(-1, 3).astype(np.float64).mean(0)


def _deepest(region: np.ndarray) -> tuple[int, int]:
    depth = ndimage.distance_transform_edt(region)
    return tuple(int(v) for v in np.unravel_index(int(depth.argmax()), depth.shape))


def test_lesion_reads_darker_and_more_purple(subtype_cohort: Path) -> None:
    """Level 2 (downsample 16) lines up with the mask: compare lesion and stroma pixels read back."""
    _, rows = _rows(subtype_cohort)
    for row in rows:
        mask = _mask(subtype_cohort, row["slide_id"])
        with openslide.OpenSlide(str(subtype_cohort.parent / row["path"])) as slide:
            low = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB"))
            background = _patch_mean(slide, _deepest(mask == 0), 0, 64)
            inside = _patch_mean(slide, _deepest(mask == 255), 1, 48)  # a 10x read at the lesion core
        stroma_cells = (mask == 128) & ~ndimage.binary_dilation(mask == 255, iterations=2)
        lesion, stroma = (low[m].astype(np.float64).mean(0) for m in (mask == 255, stroma_cells))
        assert background.min() > 235, row["slide_id"]
        assert lesion.mean() < stroma.mean() - 5, row["slide_id"]
        assert lesion[2] - lesion[0] > stroma[2] - stroma[0], row["slide_id"]  # more purple
        assert inside.mean() < stroma.mean() and inside[2] - inside[0] > stroma[2] - stroma[0], row[
            "slide_id"
        ]


def test_lesion_fraction_recorded(subtype_cohort: Path) -> None:
    info = json.loads((subtype_cohort.parent / "synth.json").read_text())
    for entry in info["slides"]:
        mask = _mask(subtype_cohort, entry["slide_id"])
        measured = (mask == 255).sum() / (mask > 0).sum()
        assert measured == pytest.approx(entry["lesion_fraction"], abs=1e-3)
        assert measured == pytest.approx(0.05, abs=0.01)


def test_survival_manifest(survival_cohort: Path) -> None:
    columns, rows = _rows(survival_cohort)
    assert columns == TASK_COLUMNS["survival"]
    assert len(rows) == 6
    times = [float(r["time"]) for r in rows]
    assert all(t > 0 for t in times)
    assert {r["event"] for r in rows} <= {"0", "1"}
    # two slides per case, sharing the case's outcome
    by_case: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_case.setdefault(row["case_id"], []).append(row)
    assert len(by_case) == 3
    for case_rows in by_case.values():
        assert len(case_rows) == 2 and len({(r["time"], r["event"]) for r in case_rows}) == 1
        assert all(r["slide_id"].startswith(r["case_id"]) for r in case_rows)


@pytest.mark.parametrize(
    ("task", "kwargs", "labels"),
    [
        ("grade", {"num_grades": 3}, [0, 0, 1, 1, 2, 2]),
        ("diagnosis", {"negative_fraction": 0.5}, [0, 0, 0, 1, 1, 1]),
        ("subtype", {"num_classes": 3}, [0, 0, 1, 1, 2, 2]),
    ],
)
def test_labels_balanced_and_typed(tmp_path: Path, task: str, kwargs: dict, labels: list[int]) -> None:
    manifest = synthesize_cohort(
        tmp_path / task, task=task, num_slides=6, seed=2, size=512, workers=1, lesion_fraction=0.1, **kwargs
    )
    columns, rows = _rows(manifest)
    assert columns == TASK_COLUMNS[task]
    assert sorted(int(r["label"]) for r in rows) == labels
    for row in rows:
        has_lesion = bool((_mask(manifest, row["slide_id"]) == 255).any())
        if task in {"grade", "diagnosis"}:
            assert has_lesion == (int(row["label"]) > 0), row


def test_same_seed_identical_other_seed_different(tmp_path: Path) -> None:
    def cohort(name: str, seed: int, workers: int) -> Path:
        return synthesize_cohort(
            tmp_path / name, task="survival", num_slides=3, seed=seed, size=1024, workers=workers
        )

    a, b, c = cohort("a", 11, 2), cohort("b", 11, 1), cohort("c", 12, 1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    _, rows = _rows(a)
    for row in rows:
        pixels = []
        for manifest in (a, b, c):
            with openslide.OpenSlide(str(manifest.parent / row["path"])) as slide:
                pixels.append(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
        assert np.array_equal(pixels[0], pixels[1])
        assert not np.array_equal(pixels[0], pixels[2])
        assert (a.parent / "masks" / f"{row['slide_id']}.png").read_bytes() == (
            b.parent / "masks" / f"{row['slide_id']}.png"
        ).read_bytes()


def test_generic_tiff_cohort_has_no_magnification(tmp_path: Path) -> None:
    manifest = synthesize_cohort(tmp_path / "g", num_slides=1, size=1024, with_metadata=False, workers=1)
    _, rows = _rows(manifest)
    path = manifest.parent / rows[0]["path"]
    assert path.suffix == ".tif"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
        assert openslide.PROPERTY_NAME_OBJECTIVE_POWER not in slide.properties
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties


def test_overwrite_replaces_cohort(tmp_path: Path) -> None:
    out = tmp_path / "o"
    synthesize_cohort(out, task="subtype", num_slides=2, size=512, workers=1)
    manifest = synthesize_cohort(out, task="grade", num_slides=1, size=512, workers=1, overwrite=True)
    _, rows = _rows(manifest)
    assert len(rows) == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "masks", "slides", "synth.json"]
    assert len(list((out / "slides").iterdir())) == 1


def test_survival_hazard_grows_with_lesion_burden(tmp_path: Path) -> None:
    """Cases with more lesion (measured from the masks) die sooner: concordance well above 0.5."""
    from lifelines.utils import concordance_index

    manifest = synthesize_cohort(
        tmp_path / "s", task="survival", num_slides=40, seed=9, size=512, workers=1, lesion_fraction=0.1
    )
    _, rows = _rows(manifest)
    masks = [_mask(manifest, r["slide_id"]) for r in rows]
    burden = [float((m == 255).sum() / (m > 0).sum()) for m in masks]  # lesion share of tissue
    times = [float(r["time"]) for r in rows]
    events = [int(r["event"]) for r in rows]
    assert 0 < sum(events) < len(events)  # both events and censoring occur
    assert concordance_index(times, [-b for b in burden], events) > 0.65
