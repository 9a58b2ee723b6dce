"""The one owner of the per-slide feature file format (HDF5, pickle-free).

Layout of ``FEATURES/<slide_id>.h5`` (the layout CLAM and TRIDENT write, so folders move both ways):

* ``features``: float32 [N, D], one row per patch; attributes ``encoder`` and ``name`` (TRIDENT's);
* ``coords``: int64 [N, 2], level-0 (x, y) of each patch's top-left corner, row i <-> feature row i;
  attributes ``patch_size``, ``patch_size_level0``, ``level0_magnification``, ``target_magnification``,
  ``level0_width``, ``level0_height``, ``name`` (TRIDENT's coords reader and slide encoders need them),
  and ``downsample``/``level_dim`` (CLAM's patch attributes, read by the official ``get_seq_pos_fn``);
* root attribute ``e2e_wsi_provenance`` (ours only): a JSON string, see :func:`make_provenance`;
* optionally ``FEATURES/pt_files/<slide_id>.pt``: the features alone as a plain float32 tensor, the file
  CLAM's ``main.py`` and the official two-stage loader read (``torch.load(..., weights_only=True)``).

Files are written to ``<slide_id>.h5.tmp`` and renamed, so a reader (or a resumed extraction) never sees a
half-written file. Files of other tools carry no provenance of ours: TRIDENT's (and CLAM's patch)
attributes are turned into provenance (:func:`foreign_provenance`); files with neither are accepted with a
warning. A dataset stored outside the file (external raw storage, an external link, a virtual dataset) or
of a non-numeric type is refused: a feature file is data read from itself alone (docs/security.md).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from e2e_wsi.errors import UserError
from e2e_wsi.utils import describe_difference, sha256_file, validate_slide_id  # noqa: F401 - re-exported

PROVENANCE_ATTR = "e2e_wsi_provenance"
SUFFIX = ".h5"
PT_DIR = "pt_files"
# Keys that describe one slide, not the settings: they may differ between files of one folder
# (the level-0 side of a patch depends on the slide's objective power).
PER_SLIDE_KEYS = frozenset(
    {"slide_id", "num_patches", "created", "patch_size_level0", "level0_magnification", "level0_width",
     "level0_height"}
)  # fmt: skip
_DATASETS = ("features", "coords")
_MAX_LISTED = 20


def make_provenance(
    encoder: Mapping[str, Any], magnification: float, patch_size: int, **extra: Any
) -> dict[str, Any]:
    """Provenance of a feature folder: what made the features, JSON-serialisable.

    Args:
        encoder: ``describe()`` of the encoder (class, name, weights sha256, mean/std, input size, dim).
        magnification: Magnification the patches were cut at.
        patch_size: Side of the cached patches (pixels at that magnification).
        **extra: Further settings (e.g. ``precision``).

    Returns:
        A dict with ``encoder``, ``magnification``, ``patch_size``, ``package_version`` and ``extra``.
    """
    from e2e_wsi import __version__

    prov = {
        "encoder": dict(encoder),
        "magnification": float(magnification),
        "patch_size": int(patch_size),
        "package": f"e2e-wsi {__version__}",
        **extra,
    }
    json.dumps(prov)  # fail here, not in the writer, when something is not serialisable
    return prov


def feature_path(folder: str | Path, slide_id: str) -> Path:
    """``folder/<slide_id>.h5`` (the id is validated first: ids are never trusted as paths)."""
    return Path(folder) / f"{validate_slide_id(slide_id)}{SUFFIX}"


@dataclass(frozen=True)
class PatchGeometry:
    """Where one slide's patches come from: what TRIDENT's and CLAM's readers need beside the arrays.

    Attributes:
        patch_size: Side of a patch in pixels at ``target_magnification``.
        size_level0: Side of a patch in level-0 pixels.
        level0_magnification: Objective power of the slide's level 0.
        target_magnification: Magnification the patches were cut at.
        level0_width: Level-0 width of the slide.
        level0_height: Level-0 height of the slide.
    """

    patch_size: int
    size_level0: int
    level0_magnification: float
    target_magnification: float
    level0_width: int
    level0_height: int

    def coords_attributes(self, slide_id: str) -> dict[str, Any]:
        """TRIDENT's ``coords`` attributes (and CLAM's ``downsample``/``level_dim``) for ``slide_id``."""
        down = self.size_level0 / self.patch_size  # level-0 pixels per patch pixel
        return {
            "patch_size": int(self.patch_size),
            "patch_size_level0": int(self.size_level0),
            "level0_magnification": _number(self.level0_magnification),
            "target_magnification": _number(self.target_magnification),
            "level0_width": int(self.level0_width),
            "level0_height": int(self.level0_height),
            "overlap": 0,
            "name": slide_id,
            "downsample": np.array([down, down], dtype=np.float64),
            "level_dim": np.array(
                [round(self.level0_width / down), round(self.level0_height / down)], dtype=np.int64
            ),
        }


def _number(value: float) -> int | float:
    """Integral magnifications as ints, as TRIDENT writes them (``20``, not ``20.0``)."""
    return int(value) if float(value).is_integer() else float(value)


def check_features(features: np.ndarray, coords: np.ndarray, where: str) -> None:
    """Validate one slide's arrays.

    Raises:
        ValueError: Wrong ranks/shapes, no rows, or NaN/Inf features, naming ``where``.
    """
    if features.ndim != 2:
        raise ValueError(f"{where}: `features` must be [N, D], got shape {features.shape}")
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] != features.shape[0]:
        raise ValueError(
            f"{where}: `coords` must be [N, 2] with N = {features.shape[0]} rows of `features`, "
            f"got shape {coords.shape}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{where}: no patches (0 feature rows)")
    if not np.isfinite(features).all():
        bad = int((~np.isfinite(features)).any(axis=1).sum())
        raise ValueError(
            f"{where}: {bad} feature row(s) hold NaN or Inf; re-extract this slide (e.g. in 32-bit: "
            "`e2e-wsi extract --precision 32`) or drop it from the manifest"
        )


def write_slide(
    folder: str | Path,
    slide_id: str,
    features: np.ndarray,
    coords: np.ndarray,
    provenance: Mapping[str, Any] | None,
    geometry: PatchGeometry | None = None,
) -> Path:
    """Write one slide's features atomically (temp file + rename).

    Args:
        folder: Feature folder (created if absent).
        slide_id: The slide id (file stem).
        features: float [N, D]; stored as float32.
        coords: int [N, 2] level-0 (x, y) top-left corners; stored as int64.
        provenance: JSON-able settings (:func:`make_provenance`), or ``None``.
        geometry: The patches' geometry: written as TRIDENT's/CLAM's attributes and into the provenance.

    Returns:
        The final path.
    """
    path = feature_path(folder, slide_id)
    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    check_features(features, coords, f"slide {slide_id!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=coords)
            f["features"].attrs["name"] = slide_id
            encoder = ((provenance or {}).get("encoder") or {}).get("name")
            if encoder is not None:
                f["features"].attrs["encoder"] = str(encoder)
            if geometry is not None:
                f["coords"].attrs.update(geometry.coords_attributes(slide_id))
            if provenance is not None:
                record = {**provenance, "slide_id": slide_id, "num_patches": int(features.shape[0])}
                if geometry is not None:
                    record.update(
                        patch_size_level0=int(geometry.size_level0),
                        level0_magnification=float(geometry.level0_magnification),
                    )
                f.attrs[PROVENANCE_ATTR] = json.dumps(record, sort_keys=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pt_path(folder: str | Path, slide_id: str) -> Path:
    """``folder/pt_files/<slide_id>.pt`` (CLAM's and the official two-stage code's layout)."""
    return Path(folder) / PT_DIR / f"{validate_slide_id(slide_id)}.pt"


def write_pt(folder: str | Path, slide_id: str, features: np.ndarray) -> Path:
    """Write ``pt_files/<slide_id>.pt``: the features [N, D] as a plain float32 tensor, atomically.

    A bare tensor is what CLAM's ``torch.load(path)`` and the official ``torch.load(path,
    weights_only=True)`` return as the bag; anything else (a dict, coordinates) would break both.
    """
    import torch

    path = pt_path(folder, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of one feature file, read without loading the features."""

    slide_id: str
    path: Path
    num_patches: int
    dim: int
    provenance: dict[str, Any] | None


def read_info(path: str | Path) -> SlideInfo:
    """Shapes and provenance of one ``.h5`` file (ours, TRIDENT's or CLAM's).

    Raises:
        UserError: File unreadable; ``features``/``coords`` missing, of the wrong rank, empty (0 rows),
            not numeric, or stored outside the file (external link, external raw storage, virtual
            dataset); the message names the file.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            names = set(f.keys())  # link names: a dangling external link is listed, never followed
            missing = [k for k in _DATASETS if k not in names]
            if missing:
                raise UserError(
                    f"{path}: no dataset(s) {missing} (found {sorted(names)}); a feature file needs "
                    "`features` [N, D] and `coords` [N, 2] (re-run `e2e-wsi extract` for this slide)"
                )
            for name in _DATASETS:
                _check_local_dataset(f, name, path)
            fshape, cshape = f["features"].shape, f["coords"].shape
            raw = f.attrs.get(PROVENANCE_ATTR)
            prov = (
                json.loads(raw)
                if raw is not None
                else foreign_provenance(dict(f["coords"].attrs), dict(f["features"].attrs))
            )
    except OSError as err:
        raise UserError(f"{path}: cannot read as HDF5 ({err}); delete it and re-extract the slide") from err
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: attribute {PROVENANCE_ATTR} is not JSON ({err}); re-extract the slide"
        ) from err
    if len(fshape) != 2 or len(cshape) != 2 or cshape != (fshape[0], 2):
        raise UserError(f"{path}: `features` {fshape} / `coords` {cshape} must be [N, D] / [N, 2]")
    if fshape[0] == 0:
        raise UserError(
            f"{path}: no patches (0 feature rows; TRIDENT writes such files for slides without tissue): "
            "drop the slide from the manifest or re-extract it"
        )
    return SlideInfo(path.stem, path, int(fshape[0]), int(fshape[1]), prov)


def _check_local_dataset(f: h5py.File, name: str, path: Path) -> None:
    """Refuse a dataset whose bytes live outside ``path`` or are not numbers (names the file)."""
    link = f.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise UserError(
            f"{path}: `{name}` is a {type(link).__name__} to another file or path; feature files must hold "
            "their data themselves (write the arrays into the file, e.g. with `e2e-wsi extract`)"
        )
    dset = f[name]
    if not isinstance(dset, h5py.Dataset):
        raise UserError(f"{path}: `{name}` is a group, not a dataset")
    if dset.is_virtual:
        raise UserError(
            f"{path}: `{name}` is a virtual dataset (its data live in other files); refused: copy the "
            "data into the file"
        )
    if dset.external:
        raise UserError(
            f"{path}: `{name}` uses external raw storage ({dset.external[0][0]!r} ...), i.e. bytes of "
            "another file; refused: copy the data into the file"
        )
    if dset.dtype.kind not in "fiu":
        raise UserError(
            f"{path}: `{name}` holds {dset.dtype} values, not numbers; a feature file needs float "
            "`features` and integer `coords`"
        )


def _attr(value: Any) -> Any:
    """An HDF5 attribute as plain Python (bytes decoded, numpy scalars and arrays unwrapped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value


def foreign_provenance(coords_attrs: Mapping[str, Any], features_attrs: Mapping[str, Any]) -> dict | None:
    """Provenance of a TRIDENT or CLAM file from its HDF5 attributes (``None`` when it has none).

    TRIDENT: ``features.encoder``, ``coords.target_magnification``, ``coords.patch_size`` (settings) and
    ``coords.patch_size_level0``, ``coords.level0_magnification`` (per slide). CLAM's patch files:
    ``coords.patch_size`` and ``coords.downsample`` give the level-0 side; no encoder nor magnification.

    Returns:
        A provenance record in our keys, with ``source`` naming the tool, or ``None``.
    """
    c = {k: _attr(v) for k, v in coords_attrs.items()}
    encoder = _attr(features_attrs.get("encoder"))
    prov: dict[str, Any] = {}
    if encoder not in (None, "None", ""):
        prov["encoder"] = {"name": str(encoder)}
    if "target_magnification" in c and "patch_size" in c:
        prov.update(source="TRIDENT", magnification=float(c["target_magnification"]))
        prov["patch_size"] = int(c["patch_size"])
        for key in ("patch_size_level0", "level0_magnification", "level0_width", "level0_height"):
            if c.get(key) is not None:
                prov[key] = float(c[key]) if key == "level0_magnification" else int(c[key])
    elif "patch_size" in c and "downsample" in c:
        down = np.atleast_1d(np.asarray(c["downsample"], dtype=np.float64))
        prov.update(source="CLAM", patch_size=int(c["patch_size"]))
        prov["patch_size_level0"] = int(round(int(c["patch_size"]) * float(down[0])))
    elif prov:
        prov["source"] = "TRIDENT"
    return prov or None


def read_slide(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``features`` float32 [N, D] and ``coords`` int64 [N, 2] of one file, validated (NaN/Inf named)."""
    path = Path(path)
    info = read_info(path)
    with h5py.File(path, "r") as f:
        features = np.asarray(f["features"][()], dtype=np.float32)
        coords = np.asarray(f["coords"][()]).astype(np.int64).reshape(-1, 2)
    check_features(features, coords, f"slide {info.slide_id!r} ({path})")
    return features, coords


def settings_of(provenance: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The folder-wide part of a provenance record (per-slide keys dropped)."""
    if provenance is None:
        return None
    return {k: v for k, v in provenance.items() if k not in PER_SLIDE_KEYS}


class FeatureFolder:
    """A folder of ``<slide_id>.h5`` feature files (ours, CLAM's or TRIDENT's).

    Args:
        path: The folder.

    Raises:
        FileNotFoundError: If the folder does not exist or holds no ``.h5`` file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"feature folder {self.path} does not exist: write it with `e2e-wsi extract --out {self.path}`"
            )
        self._files = {p.stem: p for p in sorted(self.path.glob(f"*{SUFFIX}"))}
        if not self._files:
            raise FileNotFoundError(f"feature folder {self.path} holds no {SUFFIX} file")
        self._info: dict[str, SlideInfo] = {}

    def slide_ids(self) -> list[str]:
        """Sorted ids (file stems) of the folder's slides."""
        return sorted(self._files)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self._files

    def info(self, slide_id: str) -> SlideInfo:
        """Metadata of one slide (cached)."""
        if slide_id not in self._info:
            if slide_id not in self._files:
                raise KeyError(f"slide {slide_id!r} has no features in {self.path}")
            self._info[slide_id] = read_info(self._files[slide_id])
        return self._info[slide_id]

    def read(self, slide_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Features [N, D] float32 and coords [N, 2] int64 of one slide."""
        self.info(slide_id)
        return read_slide(self._files[slide_id])

    def check(self, slide_ids: Iterable[str], expected_dim: int | None = None) -> dict[str, Any] | None:
        """Validate the slides a run uses, all at once, and return their shared settings.

        Args:
            slide_ids: Slides of the manifest.
            expected_dim: Feature width the model was configured for, if any.

        Returns:
            The common settings (provenance without per-slide keys), or ``None`` when the folder has no
            provenance (CLAM/TRIDENT): then a warning is logged.

        Raises:
            ValueError: Slides without a file (all listed), unreadable files or files without
                ``features`` (all listed), mixed widths, mixed provenance (which slides differ and how),
                or a width different from ``expected_dim``.
        """
        ids = list(slide_ids)
        missing = [s for s in ids if s not in self._files]
        if missing:
            raise UserError(
                f"{len(missing)} manifest slide(s) have no features in {self.path}: {_listed(missing)}; "
                "run `e2e-wsi extract` on them or drop them from the manifest"
            )
        infos, errors = [], []
        for s in ids:
            try:
                infos.append(self.info(s))
            except ValueError as err:
                errors.append(str(err))
        if errors:
            raise UserError(f"{len(errors)} bad feature file(s):\n  " + "\n  ".join(errors[:_MAX_LISTED]))
        dims: dict[int, list[str]] = {}
        for i in infos:
            dims.setdefault(i.dim, []).append(i.slide_id)
        if len(dims) > 1:
            parts = [f"{d}-d: {_listed(v)}" for d, v in sorted(dims.items())]
            raise ValueError(f"feature folder {self.path} mixes feature widths ({'; '.join(parts)})")
        dim = next(iter(dims))
        if expected_dim is not None and dim != expected_dim:
            raise ValueError(
                f"features in {self.path} are {dim}-d but the model expects {expected_dim}-d: "
                "leave model.encoder.init_args.dim unset (it follows the features) or use matching features"
            )
        return self._common_settings(infos)

    def _common_settings(self, infos: list[SlideInfo]) -> dict[str, Any] | None:
        groups: dict[str, list[SlideInfo]] = {}
        for i in infos:
            groups.setdefault(json.dumps(settings_of(i.provenance), sort_keys=True), []).append(i)
        if len(groups) > 1:
            ordered = sorted(groups.values(), key=len, reverse=True)
            ref = settings_of(ordered[0][0].provenance)
            lines = [
                f"{_listed([i.slide_id for i in g])} differ from {ordered[0][0].slide_id!r} in "
                f"{describe_difference(ref, settings_of(g[0].provenance))}"
                for g in ordered[1:]
            ]
            raise ValueError(
                f"feature folder {self.path} mixes features made with different encoders or settings:\n  "
                + "\n  ".join(lines)
                + "\nre-extract the odd slides with the same settings, or use one folder per setting"
            )
        settings = settings_of(infos[0].provenance)
        if settings is None or "encoder" not in settings:
            warnings.warn(
                f"features in {self.path} have no e2e-wsi provenance and record no encoder (CLAM's "
                "files, or another tool's without TRIDENT's `encoder` attribute): mixed or mismatched "
                "features cannot be detected; make sure the whole folder came from one encoder",
                stacklevel=2,
            )
        return settings


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(repr(s) for s in items[:_MAX_LISTED]) + more
