"""QuPath-compatible GeoJSON: the one owner of the GeoJSON files the tool reads and writes.

Out (``e2e-wsi predict``, ``e2e-wsi preprocess --geojson``): one ``FeatureCollection`` per slide, in
level-0 pixel coordinates (x right, y down: QuPath's image space). Patches are ``detection`` objects
whose ``properties.measurements`` list ``{"name", "value"}`` pairs for ``attention`` (mean over heads) and
``attention_head_<h>`` (the list form is the one both QuPath 0.3 and 0.4+ read; 0.3 drops the object
form), which QuPath shows as measurements (colour by them with *Measure > Show measurement maps*); tissue
contours are ``annotation`` objects of class ``Tissue``. Every feature has a stable ``id``: a UUID
derived from the slide id and the patch (or contour), so re-exporting gives the same ids and QuPath 0.4+
keeps them as the objects' IDs. Exterior rings are counter-clockwise, holes clockwise (RFC 7946).

In (``e2e-wsi preprocess --annotations DIR``, heatmap ground truth): ``DIR/<slide_id>.geojson`` as
QuPath's *File > Export objects as GeoJSON* writes it (a FeatureCollection, a list of features or one
feature), at most :data:`MAX_GEOJSON_BYTES`. An annotation's class is ``properties.classification.name``,
or ``classification.names`` for QuPath's derived classes (``["Tumor", "Positive"]`` reads as
``"Tumor: Positive"``), or a plain string; classes are matched case-insensitively, by full name or by
base class, against the include / exclude / lesion lists below. Unclassified polygons (TRIDENT's and
GrandQC's contour files) are ignored with a warning, or tiled as tissue with ``unclassified="tissue"``.
Anything else a file may hold (non-finite numbers, deep nesting, unknown geometry types, properties that
are not an object, class names that are not text) is refused with one message naming the file.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import geojson
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from e2e_wsi.errors import UserError
from e2e_wsi.slides.tissue import TissueMask

# QuPath's built-in classes for "tile only here" and "ignore this", plus the usual names of artefacts.
DEFAULT_INCLUDE: tuple[str, ...] = ("Region*", "Region", "Tissue", "Include", "ROI")
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "Ignore*",
    "Ignore",
    "Exclude",
    "Pen",
    "Pen marking",
    "Fold",
    "Tissue fold",
    "Artefact",
    "Artifact",
    "Bubble",
    "Out of focus",
)
DEFAULT_LESION: tuple[str, ...] = ("Tumor", "Tumour", "Lesion", "Metastasis", "Cancer", "Carcinoma")
# Exported coordinates may overshoot the image by a rounding pixel or a stroke drawn off the edge.
_BOUNDS_SLACK = 0.02
SUFFIX = ".geojson"
# Annotation files are regions, a few MB even for detailed outlines. Reading one takes about 20x its size
# in memory (JSON objects plus shapely geometries: +381 MB for a 20 MB file, benchmarks/bench_interop.py),
# so larger files, typically exports that include every detection, are refused before they are read:
# at this limit reading peaks around 600 MB.
MAX_GEOJSON_BYTES = 32 * 1024 * 1024
# Namespace of the object ids: uuid5(namespace, "<slide_id>/<what>") is the same on every run.
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/e2e-wsi/e2e-wsi/geojson")
UNCLASSIFIED_CHOICES = ("ignore", "tissue")


@dataclass(frozen=True)
class Annotation:
    """One annotation read from a GeoJSON file.

    Attributes:
        name: Its classification name (``None`` if unclassified).
        geometry: Level-0 pixel geometry (valid, polygonal).
    """

    name: str | None
    geometry: BaseGeometry


@dataclass(frozen=True)
class AnnotationRules:
    """Which annotation classes decide the tissue to tile.

    Attributes:
        directory: Folder of ``<slide_id>.geojson`` files; a slide without a file keeps its tissue mask.
        include: Classes whose regions are the only tissue to tile (when a slide has any).
        exclude: Classes whose regions are removed from the tissue (pen, folds, artefacts).
        unclassified: What polygons without a class are: ``ignore`` (left out, with a warning naming the
            file) or ``tissue`` (include regions, as TRIDENT's and GrandQC's contour files mean them).
    """

    directory: str
    include: tuple[str, ...] = DEFAULT_INCLUDE
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    unclassified: str = "ignore"

    def __post_init__(self) -> None:
        if self.unclassified not in UNCLASSIFIED_CHOICES:
            raise UserError(
                f"unclassified={self.unclassified!r}: choose one of {', '.join(UNCLASSIFIED_CHOICES)}"
            )

    def file_for(self, slide_id: str) -> Path | None:
        """``DIR/<slide_id>.geojson`` when it exists."""
        path = Path(self.directory) / f"{slide_id}{SUFFIX}"
        return path if path.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (recorded in the cache parameters: annotations change the patches)."""
        out: dict[str, Any] = {
            "directory": str(self.directory),
            "include": list(self.include),
            "exclude": list(self.exclude),
        }
        if self.unclassified != "ignore":  # recorded only when set, so older caches still match
            out["unclassified"] = self.unclassified
        return out


# --------------------------------------------------------------------------------------------- out
def object_id(slide_id: str, what: str) -> str:
    """The stable UUID of one exported object: uuid5 of ``"<slide_id>/<what>"`` (same on every run)."""
    return str(uuid.uuid5(ID_NAMESPACE, f"{slide_id}/{what}"))


def measurement_list(values: dict[str, float]) -> list[dict[str, Any]]:
    """QuPath measurements as ``[{"name", "value"}, ...]``: read by QuPath 0.3 and 0.4+ alike."""
    return [{"name": k, "value": float(v)} for k, v in values.items()]


def measurements_of(properties: dict[str, Any]) -> dict[str, float]:
    """A feature's measurements as a dict, from either QuPath form (list of pairs, or an object)."""
    found = properties.get("measurements") or {}
    if isinstance(found, list):
        return {m["name"]: float(m["value"]) for m in found}
    return {k: float(v) for k, v in found.items()}


def patch_features(
    coords: np.ndarray,
    size_level0: int | np.ndarray,
    attention: np.ndarray,
    magnification: np.ndarray | None = None,
    slide_id: str = "",
) -> list[geojson.Feature]:
    """One square polygon per patch with its attention as QuPath measurements.

    Args:
        coords: int [N, 2] level-0 (x, y) of each patch's top-left corner.
        size_level0: Patch side in level-0 pixels (one for all, or [N]).
        attention: [H, N] attention per head.
        magnification: Optional [N] magnification of each patch (a measurement too).
        slide_id: The slide, for the objects' ids (uuid5 of slide, corner, side and magnification).

    Returns:
        ``detection`` features, in patch order.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    attention = np.asarray(attention, dtype=np.float64).reshape(-1, len(coords))
    sizes = np.broadcast_to(np.asarray(size_level0, dtype=np.int64), (len(coords),))
    merged = attention.mean(axis=0)
    features = []
    for i, ((x, y), side) in enumerate(zip(coords.tolist(), sizes.tolist(), strict=True)):
        measurements = {"attention": float(merged[i])}
        measurements.update({f"attention_head_{h}": float(attention[h, i]) for h in range(len(attention))})
        mag = ""
        if magnification is not None:
            measurements["magnification"] = float(magnification[i])
            mag = f"@{float(magnification[i]):g}x"
        features.append(
            geojson.Feature(
                id=object_id(slide_id, f"patch/{x}/{y}/{side}{mag}"),
                geometry=mapping(orient(box(x, y, x + side, y + side), sign=1.0)),
                properties={
                    "objectType": "detection",
                    "name": f"patch {i}",
                    "classification": {"name": "Patch", "color": [0, 120, 255]},
                    "isLocked": True,
                    "measurements": measurement_list(measurements),
                },
            )
        )
    return features


def mask_to_geometry(mask: np.ndarray, downsample: float, simplify: float = 0.1) -> BaseGeometry:
    """Polygons (with holes) of a binary mask, in level-0 pixels.

    Pixel ``(i, j)`` of the mask covers level-0 ``[j * ds, (j + 1) * ds) x [i * ds, (i + 1) * ds)``.
    Contours are traced at the 0.5 level between pixel centres and nested contours are combined by
    even-odd rule (a contour inside a tissue contour is a hole, one inside a hole is tissue again).

    Args:
        mask: bool [h, w].
        downsample: Level-0 pixels per mask pixel.
        simplify: Douglas-Peucker tolerance in mask pixels (drops collinear contour vertices; larger
            values cut the corners of small holes).

    Returns:
        A (possibly empty) valid Polygon or MultiPolygon.
    """
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, dtype=np.float32), 1)
    result: BaseGeometry = Polygon()
    for contour in find_contours(padded, 0.5):
        if len(contour) < 4:
            continue
        ring = Polygon(np.stack([contour[:, 1] - 0.5, contour[:, 0] - 0.5], axis=1))
        ring = shapely.make_valid(ring) if not ring.is_valid else ring
        result = result.symmetric_difference(ring)
    if simplify > 0:
        result = result.simplify(simplify)
    result = shapely.affinity.scale(result, downsample, downsample, origin=(0, 0))
    return _polygonal(shapely.make_valid(result))


def tissue_features(mask: np.ndarray, downsample: float, slide_id: str = "") -> list[geojson.Feature]:
    """Tissue contours as one ``annotation`` feature per connected piece of tissue (class ``Tissue``).

    Args:
        mask: bool [h, w] tissue mask.
        downsample: Level-0 pixels per mask pixel.
        slide_id: The slide, for the objects' ids (uuid5 of slide and contour number).
    """
    geometry = mask_to_geometry(mask, downsample)
    parts = list(geometry.geoms) if isinstance(geometry, MultiPolygon) else [geometry]
    return [
        geojson.Feature(
            id=object_id(slide_id, f"tissue/{i}"),
            geometry=mapping(orient(part, sign=1.0)),
            properties={
                "objectType": "annotation",
                "name": f"tissue {i}",
                "classification": {"name": "Tissue", "color": [0, 200, 0]},
            },
        )
        for i, part in enumerate(p for p in parts if not p.is_empty)
    ]


def feature_collection(features: Iterable[geojson.Feature]) -> geojson.FeatureCollection:
    """A FeatureCollection, checked: valid GeoJSON and valid (non-self-intersecting) polygons.

    Raises:
        ValueError: If a feature is not valid (a bug, never user input).
    """
    fc = geojson.FeatureCollection(list(features))
    if not fc.is_valid:
        raise ValueError(f"invalid GeoJSON: {fc.errors()}")
    for i, feature in enumerate(fc["features"]):
        geometry = shape(feature["geometry"])
        if not geometry.is_valid:
            raise ValueError(f"feature {i}: invalid geometry ({shapely.is_valid_reason(geometry)})")
    return fc


def write_feature_collection(fc: geojson.FeatureCollection, path: str | Path) -> Path:
    """Write a FeatureCollection atomically (temp file + rename: never half-written).

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(geojson.dumps(fc))
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- in
def read_annotations(path: str | Path, dimensions: tuple[int, int]) -> list[Annotation]:
    """Polygonal annotations of a QuPath GeoJSON export, checked against the slide's size.

    Args:
        path: The ``.geojson`` file (at most :data:`MAX_GEOJSON_BYTES`).
        dimensions: Level-0 (width, height) of the slide it belongs to.

    Returns:
        Every polygonal feature with its class name (points and lines are skipped: they enclose no area).

    Raises:
        UserError: Naming the file: too large, not JSON (or with NaN/Infinity, or nested too deep), not
            GeoJSON features, properties that are not an object, a class name that is not text, an
            unknown or broken geometry, or coordinates outside the slide (another coordinate space, e.g.
            micrometres or a downsampled image).
    """
    path = Path(path)
    data = _load_json(path)
    annotations = []
    for i, feature in enumerate(_features(data, path)):
        properties = feature.get("properties")
        if properties is None:
            properties = {}
        if not isinstance(properties, dict):
            raise UserError(
                f"{path}: feature {i} has `properties` of type {type(properties).__name__}; GeoJSON "
                "properties must be an object (export the file from QuPath again)"
            )
        name = _class_name(properties, path, i)
        geometry = _geometry(feature, path, i)
        if geometry.is_empty:
            continue
        annotations.append(Annotation(name, geometry))
    _check_bounds(annotations, dimensions, path)
    return annotations


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _load_json(path: Path) -> Any:
    """The parsed file, refusing sizes above the limit, NaN/Infinity and nesting Python cannot parse."""
    size = path.stat().st_size
    if size > MAX_GEOJSON_BYTES:
        raise UserError(
            f"{path}: {size / 2**20:.0f} MB is more than the {MAX_GEOJSON_BYTES // 2**20} MB an annotation "
            "file may have; export only the annotations (not the detections) from QuPath, or simplify them"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); export it from QuPath as GeoJSON") from None
    except RecursionError:
        raise UserError(
            f"{path}: JSON nested too deeply to be GeoJSON; export it from QuPath again"
        ) from None


def _geometry(feature: dict, path: Path, i: int) -> BaseGeometry:
    """The feature's area (valid, polygonal; empty for points and lines)."""
    raw = feature.get("geometry")
    if raw is None:
        return Polygon()
    try:
        geometry = shape(raw)
        if not geometry.is_empty and not np.isfinite(shapely.get_coordinates(geometry)).all():
            raise UserError(f"{path}: feature {i} has coordinates that are not finite numbers")
        if not geometry.is_valid:  # hand-drawn outlines often cross themselves
            geometry = shapely.make_valid(geometry)
        geometry = _polygonal(geometry)
    except UserError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, shapely.errors.ShapelyError) as err:
        kind = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
        raise UserError(
            f"{path}: feature {i} has no valid geometry (type {kind!r}: {err}); GeoJSON geometries are "
            "Polygon, MultiPolygon, Point, LineString ... (QuPath ellipses export as polygons)"
        ) from None
    return geometry


def _features(data: Any, path: Path) -> list[dict]:
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    else:
        raise UserError(
            f"{path}: not GeoJSON features (expected a FeatureCollection, a Feature or a list of them)"
        )
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise UserError(f"{path}: 'features' must be a list of GeoJSON Feature objects")
    return features


def _class_name(properties: dict, path: Path, i: int) -> str | None:
    """QuPath's class of a feature: ``name``, ``names`` (derived, joined by ``": "``), or a string."""
    cls = properties.get("classification")
    if cls is None:
        return None
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(names)
        if "name" not in cls and "names" not in cls:
            return None
    raise UserError(
        f"{path}: feature {i} has classification {json.dumps(cls)[:80]}; a class is a name (text), "
        'e.g. {"name": "Tumor"} or {"names": ["Tumor", "Positive"]}'
    )


def _polygonal(geometry: BaseGeometry) -> BaseGeometry:
    """Only the areas of a geometry (a valid collection may mix in lines and points)."""
    if isinstance(geometry, Polygon | MultiPolygon):
        return geometry
    polys = [g for g in getattr(geometry, "geoms", []) if isinstance(g, Polygon | MultiPolygon)]
    return shapely.union_all(polys) if polys else Polygon()


def _check_bounds(annotations: Sequence[Annotation], dimensions: tuple[int, int], path: Path) -> None:
    if not annotations:
        return
    minx, miny, maxx, maxy = shapely.union_all([a.geometry for a in annotations]).bounds
    w, h = dimensions
    slack_x, slack_y = w * _BOUNDS_SLACK, h * _BOUNDS_SLACK
    if minx < -slack_x or miny < -slack_y or maxx > w + slack_x or maxy > h + slack_y:
        raise UserError(
            f"{path}: annotations span x {minx:.0f}..{maxx:.0f}, y {miny:.0f}..{maxy:.0f} but the slide is "
            f"{w} x {h} level-0 pixels: they are in another coordinate space (micrometres, a downsampled "
            "image) or belong to another slide; export them from QuPath on this slide's full-resolution image"
        )


def check_annotation_dir(directory: str | Path, slide_ids: Iterable[str]) -> None:
    """Fail early on an annotation folder that cannot be right.

    Raises:
        FileNotFoundError: If the folder does not exist.
        ValueError: If a ``.geojson`` file names no slide of the job (the message names the files).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"annotations folder {directory} not found")
    known = set(slide_ids)
    stray = sorted(p.name for p in directory.glob(f"*{SUFFIX}") if p.stem not in known)
    if stray:
        raise ValueError(
            f"annotations folder {directory}: {stray[:10]} name(s) no slide of this run "
            "(files must be <slide_id>.geojson with a slide id of the manifest or slides folder)"
        )


def _matches(name: str | None, wanted: set[str]) -> bool:
    """Whether a class (full derived name, or its base class before the first ``": "``) is wanted."""
    if name is None:
        return False
    name = name.lower()
    return name in wanted or name.split(": ")[0] in wanted


def select(annotations: Iterable[Annotation], names: Iterable[str]) -> BaseGeometry:
    """Union of the annotations whose class (or base class) is one of ``names`` (case-insensitive)."""
    wanted = {n.lower() for n in names}
    geoms = [a.geometry for a in annotations if _matches(a.name, wanted)]
    return shapely.union_all(geoms) if geoms else Polygon()


def unclassified(annotations: Iterable[Annotation]) -> BaseGeometry:
    """Union of the annotations without a class."""
    geoms = [a.geometry for a in annotations if a.name is None]
    return shapely.union_all(geoms) if geoms else Polygon()


def region_mask(geometry: BaseGeometry, shape_hw: tuple[int, int], downsample: float) -> np.ndarray:
    """Rasterise a level-0 geometry: a mask pixel is inside when its centre is.

    Centre sampling makes a region aligned to patch borders cover exactly those patches' pixels.

    Args:
        geometry: Level-0 geometry.
        shape_hw: (h, w) of the mask.
        downsample: Level-0 pixels per mask pixel.

    Returns:
        bool [h, w].
    """
    h, w = shape_hw
    out = np.zeros((h, w), dtype=bool)
    if geometry.is_empty:
        return out
    minx, miny, maxx, maxy = geometry.bounds
    j0, i0 = max(0, int(np.floor(minx / downsample))), max(0, int(np.floor(miny / downsample)))
    j1, i1 = min(w, int(np.ceil(maxx / downsample)) + 1), min(h, int(np.ceil(maxy / downsample)) + 1)
    if j0 >= j1 or i0 >= i1:
        return out
    xs = (np.arange(j0, j1) + 0.5) * downsample
    ys = (np.arange(i0, i1) + 0.5) * downsample
    gx, gy = np.meshgrid(xs, ys)
    shapely.prepare(geometry)
    out[i0:i1, j0:j1] = shapely.contains_xy(geometry, gx, gy)
    return out


def apply_rules(
    mask: np.ndarray, downsample: float, annotations: Sequence[Annotation], rules: AnnotationRules
) -> np.ndarray:
    """The tissue mask restricted to include regions (if any) and without exclude regions.

    Args:
        mask: bool [h, w] tissue mask.
        downsample: Level-0 pixels per mask pixel.
        annotations: The slide's annotations.
        rules: Which classes include and exclude.

    Returns:
        bool [h, w], a new array.
    """
    out = np.array(mask, dtype=bool)
    include = select(annotations, rules.include)
    if rules.unclassified == "tissue":
        include = shapely.union(include, unclassified(annotations))
    if not include.is_empty:
        out &= region_mask(include, out.shape, downsample)
    exclude = select(annotations, rules.exclude)
    if not exclude.is_empty:
        out &= ~region_mask(exclude, out.shape, downsample)
    return out


def lesion_mask(
    path: str | Path,
    dimensions: tuple[int, int],
    downsample: float = 16.0,
    names: Iterable[str] = DEFAULT_LESION,
) -> np.ndarray | None:
    """A ground-truth mask (255 = lesion, 0 = other) from lesion annotations, for heatmap scoring.

    Args:
        path: The slide's GeoJSON file.
        dimensions: Level-0 (width, height).
        downsample: Level-0 pixels per mask pixel.
        names: Lesion class names.

    Returns:
        uint8 [ceil(h / ds), ceil(w / ds)], or ``None`` when the file has no lesion annotation.
    """
    lesions = select(read_annotations(path, dimensions), names)
    if lesions.is_empty:
        return None
    hw = (int(np.ceil(dimensions[1] / downsample)), int(np.ceil(dimensions[0] / downsample)))
    return np.where(region_mask(lesions, hw, downsample), 255, 0).astype(np.uint8)


def patch_geometry(x: int, y: int, side: int) -> Polygon:
    """The level-0 square of a patch."""
    return box(x, y, x + side, y + side)


# ------------------------------------------------------------------------ preprocessing hooks
def annotate_tissue(
    tissue: TissueMask, slide_id: str, dimensions: tuple[int, int], rules: AnnotationRules
) -> TissueMask:
    """The tissue mask after the slide's include / exclude annotations (unchanged without a file).

    Raises:
        ValueError: If the slide's GeoJSON is invalid or in another coordinate space (names the file).
    """
    path = rules.file_for(slide_id)
    if path is None:
        return tissue
    annotations = read_annotations(path, dimensions)
    loose = sum(a.name is None for a in annotations)
    if loose and rules.unclassified == "ignore":
        warnings.warn(
            f"{path}: {loose} unclassified polygon(s) ignored; give them a class in QuPath, or tile inside "
            "them with `--unclassified tissue` (e.g. TRIDENT's or GrandQC's tissue contours)",
            stacklevel=2,
        )
    mask = apply_rules(tissue.mask, tissue.downsample, annotations, rules)
    return replace(tissue, mask=mask)


def write_tissue_geojson(tissue: TissueMask, path: str | Path) -> Path:
    """``<slide_id>.geojson`` with the tissue contours of a slide (preprocess ``--geojson``)."""
    features = tissue_features(tissue.mask, tissue.downsample, Path(path).stem)
    return write_feature_collection(feature_collection(features), path)
