"""Run an exported model (``e2e-wsi export``) without Lightning: ``e2e-wsi predict --onnx DIR``.

Slides are tiled with the run's preprocessing recorded in ``model.json`` (stain normalisation included,
when the run's cache was normalised), each slide's patches are resized as the run evaluated them
(``eval_resize``), and the whole bag goes through the exported graph once. Outputs are those of
``e2e-wsi predict`` except the heatmap PNGs: ``predictions.csv``, ``attention/<slide_id>.csv``,
``<slide_id>.geojson`` and ``summary.json``. Nothing here imports Lightning (tested).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e2e_wsi.errors import UserError
from e2e_wsi.export.graph import FILE_NAMES, sha256_of

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def load_exported(path: str | Path, fmt: str) -> Runner:
    """A function running the exported file on one bag: ``x -> (prediction, attention)`` as numpy.

    Raises:
        UserError: onnxruntime missing (names the extra to install).
    """
    if fmt == "onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("running ONNX models needs onnxruntime: pip install 'e2e-wsi[onnx]'") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's optimisation notices are not actionable
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run_onnx(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            prediction, attention = session.run(None, {name: x})
            return prediction, attention

        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        module = torch.jit.load(str(path), map_location="cpu")

    def run_torchscript(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            prediction, attention = module(torch.from_numpy(x))
        return prediction.numpy(), attention.numpy()

    return run_torchscript


class ExportedModel:
    """An export folder (``model.json`` + the model file), checked and ready to run.

    Args:
        folder: The ``--out`` folder of ``e2e-wsi export``.

    Raises:
        UserError: No or unreadable ``model.json``, a missing model file, or a file whose sha256 is not
            the one recorded (replaced or damaged).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        card_path = self.folder / "model.json"
        if not card_path.is_file():
            raise UserError(f"{card_path} not found: give the --out folder of `e2e-wsi export`")
        try:
            self.card: dict[str, Any] = json.loads(card_path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{card_path}: not JSON ({err}); export the run again") from None
        fmt = self.card.get("format")
        if fmt not in FILE_NAMES:
            raise UserError(f"{card_path}: unknown format {fmt!r}; export the run again")
        self.path = self.folder / FILE_NAMES[fmt]
        if not self.path.is_file():
            raise UserError(f"{self.path} not found beside {card_path}")
        if sha256_of(self.path) != self.card.get("sha256"):
            raise UserError(
                f"{self.path} is not the file {card_path} describes (sha256 differs): export again"
            )
        self.run: Runner = load_exported(self.path, fmt)

    @property
    def task(self) -> str:
        return str(self.card["task"])

    @property
    def magnifications(self) -> list[float]:
        return [float(m) for m in self.card["magnifications"]]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One bag: uint8 [N, 3, S, S] patches (or float32 [N, D] features) -> (prediction, [1, H, N])."""
        return self.run(x)


@dataclass
class ExportedPrediction:
    """One slide's result, with the attributes :mod:`e2e_wsi.inference.outputs` writes.

    Attributes:
        preds: The task's prediction under its spec's key: ``probs`` [K], ``risk`` [] or ``pred`` [].
    """

    slide_id: str
    preds: dict[str, np.ndarray]
    attention: Any  # e2e_wsi.viz.heatmap.SlideAttention
    magnification: np.ndarray
    size_level0: np.ndarray


def _bag(model: ExportedModel, cache: Any, slide_id: str) -> dict[str, Any]:
    from e2e_wsi.data.datasets import Bag, EvalBagDataset
    from e2e_wsi.data.transforms import EvalTransform

    resize = model.card["eval_resize"]
    transform = EvalTransform(int(resize["size"]), crop_fraction=float(resize["crop_fraction"]))
    return EvalBagDataset(cache, [Bag(slide_id, (slide_id,), {})], model.magnifications, transform)[0]


def predict_slide(model: ExportedModel, cache: Any, slide_id: str) -> ExportedPrediction:
    """Run the exported model on every cached patch of one slide (patches resized as the run evaluated)."""
    from e2e_wsi.cache.store import mag_key
    from e2e_wsi.inference.results import SlideAttention

    item = _bag(model, cache, slide_id)
    prediction, attention = model(item["images"].numpy())
    meta = cache.meta(slide_id)
    mags = item["magnification"].numpy()
    sizes = np.array([int(meta["magnifications"][mag_key(float(m))]["size_level0"]) for m in mags])
    att = SlideAttention(
        slide_id=slide_id,
        attention=np.asarray(attention[0], dtype=np.float64),
        coords=item["coords"].numpy(),
        size_level0=int(meta["magnifications"][mag_key(model.magnifications[0])]["size_level0"]),
        dimensions=(int(meta["dimensions"][0]), int(meta["dimensions"][1])),
    )
    key = model.card["outputs"]["prediction"]["name"]
    value = np.asarray(prediction[0] if key == "probs" else np.ravel(prediction)[0], dtype=np.float64)
    return ExportedPrediction(slide_id, {key: value}, att, mags, sizes)


def predict_exported(
    folder: str | Path,
    jobs: Sequence[Any],
    out: str | Path,
    *,
    mpp: float | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 0,
    progress: bool = True,
    annotations: Any = None,
    stain: Any = None,
) -> dict[str, Any]:
    """``predict --onnx``: tile new slides as the run did and write predictions with an exported model.

    Args:
        folder: The export folder.
        jobs: ``SlideJob`` s of the slides.
        out: Output folder.
        mpp: ``--mpp`` for slides without magnification metadata.
        cache_dir: Where slides are tiled (default ``OUT/cache``).
        workers: Tiling processes.
        progress: Progress bars.
        annotations: ``AnnotationRules`` of the new slides, or ``None``.
        stain: ``StainNormalizer`` for new slides when the run recorded none, or ``None``.

    Returns:
        The summary written to ``OUT/summary.json``.

    Raises:
        UserError: The export is of a feature run (it needs features, not slides) or records no
            preprocessing.
    """
    from e2e_wsi.annotations.geojson import feature_collection, patch_features, write_feature_collection
    from e2e_wsi.inference.outputs import attention_frame, predictions_frame, write_csv, write_json
    from e2e_wsi.inference.params import preprocess_config
    from e2e_wsi.inference.slides import tile_for_inference

    model = ExportedModel(folder)
    if model.card["input"]["name"] != "patches":
        raise UserError(
            f"{folder} is an exported feature (two-stage) model: it takes features [N, D], not slides; "
            "run `e2e-wsi extract` and feed the features to the model file yourself"
        )
    if not model.card.get("preprocess"):
        raise UserError(f"{folder}/model.json records no preprocessing: export the run again with its cache")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = preprocess_config(model.card["preprocess"], model.magnifications, mpp, annotations, stain)
    tiled = tile_for_inference(
        jobs, config, cache_dir or out / "cache", [], workers=workers, progress=progress
    )
    preds, rows = [], []
    for job in jobs:
        row: dict[str, Any] = {"slide_id": job.slide_id, "path": str(job.path)}
        if job.slide_id in tiled.failures:
            rows.append({**row, "status": "failed", "reason": tiled.failures[job.slide_id]})
            continue
        try:
            pred = predict_slide(model, tiled.caches[job.slide_id], job.slide_id)
        except (ValueError, OSError) as err:
            rows.append({**row, "status": "failed", "reason": " ".join(str(err).split())})
            continue
        preds.append(pred)
        att = pred.attention
        write_csv(attention_frame(pred), out / "attention" / f"{job.slide_id}.csv")
        features = patch_features(
            att.coords, pred.size_level0, att.attention, pred.magnification, job.slide_id
        )
        write_feature_collection(feature_collection(features), out / f"{job.slide_id}.geojson")
        rows.append({**row, "status": "ok", "n_patches": int(att.coords.shape[0])})
    write_csv(predictions_frame(preds, model.task), out / "predictions.csv")  # type: ignore[arg-type]
    summary = {
        "task": model.task,
        "exported_model": str(Path(folder).resolve()),
        "class_names": model.card.get("class_names"),
        "magnifications": model.magnifications,
        "counts": {s: sum(r["status"] == s for r in rows) for s in ("ok", "failed")},
        "slides": rows,
    }
    write_json(summary, out / "summary.json")
    return summary
