"""Our GeoJSON read back by QuPath's parsing rules; QuPath's derived classes and unclassified polygons read
here; every malformed annotation file refused with one error naming it.

``qupath_read`` re-derives what QuPath's GeoJSON type adapters do with one feature (qupath-core
``QuPathTypeAdapters.PathObjectTypeAdapter.parseObject``, ``GsonTools.PathClassTypeAdapter.read``,
``MeasurementListTypeAdapter.read``), and fails where they throw: a top-level ``id`` becomes the object's
UUID when it parses as one; ``properties`` must be an object; ``objectType`` picks the object kind
(default annotation); ``classification`` is null, a string (``"A: B"`` a derived class) or an object with
``name`` or ``names`` *and* ``color``; ``measurements`` is a list of ``{"name", "value"}`` (QuPath 0.3 and
later) or an object of numbers (0.4 and later only).
"""

from __future__ import annotations

import json
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box, shape

from e2e_wsi.annotations import geojson as gj
from e2e_wsi.annotations.geojson import (
    AnnotationRules,
    annotate_tissue,
    feature_collection,
    lesion_mask,
    patch_features,
    read_annotations,
    tissue_features,
)
from e2e_wsi.errors import UserError
from e2e_wsi.slides.tissue import TissueMask

_KINDS = {"detection": "detection", "annotation": "annotation", "tile": "tile", "cell": "cell"}


def qupath_read(feature: dict[str, Any], version: tuple[int, int] = (0, 5)) -> dict[str, Any]:
    """One GeoJSON feature as QuPath builds a PathObject from it (raises where QuPath throws)."""
    uid = None
    if "id" in feature and version >= (0, 4):
        try:
            uid = uuid.UUID(str(feature["id"]))
        except ValueError:
            uid = None  # QuPath logs "Invalid ID" and goes on
    roi = shape(feature["geometry"])
    props = feature.get("properties", {})
    if not isinstance(props, dict):
        raise TypeError("getAsJsonObject on a non-object")
    cls = props.get("classification")
    names = None
    if isinstance(cls, str):
        names = cls.split(": ")
    elif isinstance(cls, dict):
        if not (("name" in cls or "names" in cls) and "color" in cls):
            raise ValueError("Unable to parse PathClass")
        names = [cls["name"]] if "name" in cls else list(cls["names"])
    elif cls is not None:
        raise ValueError("Unable to parse PathClass")
    found = props.get("measurements")
    measurements: dict[str, float] = {}
    if isinstance(found, list):
        measurements = {m["name"]: float(m["value"]) for m in found}
    elif isinstance(found, dict) and version >= (0, 4):
        measurements = {k: float(v) for k, v in found.items()}
    kind = _KINDS.get(props.get("objectType", "annotation"), "annotation")
    return {"id": uid, "roi": roi, "kind": kind, "class": names, "measurements": measurements,
            "locked": bool(props.get("isLocked", False)), "name": props.get("name")}  # fmt: skip


def _our_collection(slide_id: str) -> list[dict]:
    coords = np.array([[0, 0], [256, 0], [0, 256]])
    attention = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False  # a hole
    features = patch_features(coords, 256, attention, np.array([10.0, 10.0, 10.0]), slide_id)
    features += tissue_features(mask, 16.0, slide_id)
    return json.loads(json.dumps(feature_collection(features)))["features"]  # what a file holds


@pytest.mark.parametrize("version", [(0, 3), (0, 4), (0, 5)])
def test_our_objects_import_in_qupath_with_ids_classes_and_measurements(version: tuple[int, int]) -> None:
    objects = [qupath_read(f, version) for f in _our_collection("S1")]
    patches = [o for o in objects if o["kind"] == "detection"]
    tissue = [o for o in objects if o["kind"] == "annotation"]
    assert len(patches) == 3 and len(tissue) == 1
    assert patches[1]["measurements"] == pytest.approx(
        {"attention": 0.3, "attention_head_0": 0.5, "attention_head_1": 0.1, "magnification": 10.0}
    )  # also in QuPath 0.3, which drops the object form of measurements
    assert patches[0]["class"] == ["Patch"] and tissue[0]["class"] == ["Tissue"] and patches[0]["locked"]
    assert patches[1]["roi"].equals(box(256, 0, 512, 256))
    if version >= (0, 4):
        ids = [o["id"] for o in objects]
        assert None not in ids and len(set(ids)) == len(ids)


def test_ids_are_stable_per_slide_and_patch() -> None:
    first, again, other = (_our_collection(s) for s in ("S1", "S1", "S2"))
    assert [f["id"] for f in first] == [f["id"] for f in again]  # a re-export keeps every id
    assert not {f["id"] for f in first} & {f["id"] for f in other}


def test_rings_are_counter_clockwise_with_clockwise_holes() -> None:
    features = _our_collection("S1")
    tissue = shape(features[-1]["geometry"])
    assert isinstance(tissue, Polygon) and len(tissue.interiors) == 1
    for f in features:
        poly = shape(f["geometry"])
        assert poly.exterior.is_ccw and all(not ring.is_ccw for ring in poly.interiors)
    clockwise = Polygon([(0, 0), (0, 10), (10, 10), (10, 0)])  # the check discriminates
    assert not clockwise.exterior.is_ccw


def _write(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _square(x0: float, y0: float, x1: float, y1: float, **props: Any) -> dict:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}


def test_derived_classes_written_as_names_are_read(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "s.geojson",
        [_square(0, 0, 160, 160, classification={"names": ["Tumor", "Positive"], "color": [200, 0, 0]}),
         _square(200, 200, 320, 320, classification="Ignore*: Pen")],
    )  # fmt: skip
    annotations = read_annotations(path, (320, 320))
    assert [a.name for a in annotations] == ["Tumor: Positive", "Ignore*: Pen"]
    lesion = lesion_mask(path, (320, 320), downsample=16)  # base class "Tumor" is a lesion class
    assert lesion is not None and (lesion == 255).sum() == 10 * 10
    mask = gj.apply_rules(np.ones((20, 20), bool), 16, annotations, AnnotationRules(str(tmp_path)))
    assert not mask[15, 15] and mask[0, 0]  # "Ignore*: Pen" excluded by its base class


def _tissue() -> TissueMask:
    return TissueMask(np.ones((20, 20), dtype=bool), 16.0, np.zeros((20, 20, 3), np.uint8), 0.0)


def test_unclassified_polygons_warn_or_count_as_tissue(tmp_path: Path) -> None:
    _write(tmp_path / "s.geojson", [_square(0, 0, 160, 160)])  # a TRIDENT/GrandQC contour: no class
    with pytest.warns(
        UserWarning, match=r"s\.geojson: 1 unclassified polygon\(s\) ignored.*--unclassified tissue"
    ):
        ignored = annotate_tissue(_tissue(), "s", (320, 320), AnnotationRules(str(tmp_path)))
    assert ignored.mask.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = annotate_tissue(
            _tissue(), "s", (320, 320), AnnotationRules(str(tmp_path), unclassified="tissue")
        )
    assert kept.mask[:10, :10].all() and not kept.mask[10:, :].any() and not kept.mask[:, 10:].any()
    with pytest.raises(UserError, match="unclassified='keep'"):
        AnnotationRules(str(tmp_path), unclassified="keep")


# ------------------------------------------------------------------------- malformed files (issue 21)
BAD = {
    "properties_list": '{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
    '{"type": "Polygon", "coordinates": [[[0,0],[9,0],[9,9],[0,0]]]}, "properties": ["a"]}]}',
    "numeric_class": json.dumps({"type": "Feature", **{k: v for k, v in _square(0, 0, 9, 9).items() if k != "type"},
                                 "properties": {"classification": {"name": 7, "color": [1, 2, 3]}}}),
    "list_class": json.dumps([_square(0, 0, 9, 9, classification=["Tumor"])]),
    "infinity": '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
    '[[[0,0],[Infinity,0],[9,9],[0,0]]]}, "properties": {}}]',
    "overflow": '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": '
    '[[[0,0],[1e400,0],[9,9],[0,0]]]}, "properties": {}}]',
    "huge": json.dumps([_square(0, 0, 1e300, 1e300, classification={"name": "Pen", "color": [1, 2, 3]})]),
    "circle": json.dumps([{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [5, 5], "radius": 3},
                           "properties": {}}]),
    "deep": "[" * 100_000 + "]" * 100_000,
}  # fmt: skip
EXPECTED = {
    "properties_list": "`properties` of type list",
    "numeric_class": "classification",
    "list_class": "classification",
    "infinity": "not valid JSON.*Infinity",
    "overflow": "not finite",
    "huge": "another coordinate space",
    "circle": "no valid geometry.*Circle",
    "deep": "nested too deeply",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_annotation_files_are_one_error_naming_the_file(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.geojson"
    path.write_text(BAD[case])
    with pytest.raises(UserError, match=rf"{case}\.geojson: .*{EXPECTED[case]}"):
        lesion_mask(path, (320, 320))  # what heatmap --annotations reads


def test_files_above_the_size_limit_are_refused_before_parsing(tmp_path: Path, monkeypatch) -> None:
    path = _write(tmp_path / "big.geojson", [_square(0, 0, 9, 9, classification="Pen")] * 200)
    monkeypatch.setattr(gj, "MAX_GEOJSON_BYTES", path.stat().st_size - 1)
    monkeypatch.setattr(gj.json, "loads", lambda *a, **k: pytest.fail("parsed a file above the limit"))
    with pytest.raises(UserError, match=r"big\.geojson: .* MB is more than the .* MB"):
        read_annotations(path, (320, 320))


def test_shapely_union_of_our_tissue_equals_the_mask_area() -> None:
    # Orientation changes only the ring order, never the area the contour covers.
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False
    area = shapely.union_all([shape(f["geometry"]) for f in tissue_features(mask, 16.0, "S")]).area
    assert area == pytest.approx((100 - 9) * 256, rel=0.02)
