"""``export_run``: a run's model as an ONNX or TorchScript file plus ``model.json``, verified against
PyTorch on several bag sizes before anything is written to the output folder."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from e2e_wsi.errors import UserError
from e2e_wsi.export.graph import (
    FILE_NAMES,
    FORMATS,
    TOLERANCE,
    VERIFY_SIZES,
    ExportGraph,
    example_input,
    sha256_of,
)
from e2e_wsi.runs.loading import LoadedRun, load_run

CARD_NAME = "model.json"
CARD_VERSION = 1


def model_card(loaded: LoadedRun, graph: ExportGraph, fmt: str, file: Path) -> dict[str, Any]:
    """Everything a runtime needs to feed the exported model the patches the run was trained on.

    Args:
        loaded: The run's model and data config.
        graph: The exported wrapper (its input kind and normalisation).
        fmt: ``onnx`` or ``torchscript``.
        file: The exported model file.

    Returns:
        The ``model.json`` content (plain JSON).
    """
    from e2e_wsi import __version__

    data, model = loaded.data, loaded.model
    encoder = model.encoder
    try:
        preprocess = loaded.preprocess_params()
    except FileNotFoundError:
        preprocess = None  # feature runs, or a run whose cache is gone: predict --onnx then refuses
    task = model.task
    card = {
        "format_version": CARD_VERSION,
        "format": fmt,
        "file": file.name,
        "sha256": sha256_of(file),
        "exported_by": f"e2e-wsi {__version__}",
        "checkpoint": str(loaded.checkpoint),
        "task": loaded.task_kind,
        "class_names": data.get("class_names"),
        "num_outputs": int(getattr(task, "num_classes", getattr(task, "num_bins", 1))),
        "input": {
            "name": "features" if graph.features_in else "patches",
            "dtype": "float32" if graph.features_in else "uint8",
            "shape": ["N", int(encoder.out_dim)]
            if graph.features_in
            else ["N", 3, loaded.eval_patch_size, loaded.eval_patch_size],
            "channel_order": str(data.get("channel_order", "rgb")),
        },  # fmt: skip
        "outputs": {
            "prediction": {
                "name": graph.prediction_key,
                "shape": [1, "K"] if graph.prediction_key == "probs" else [1],
            },
            "attention": {"name": "attention", "shape": [1, "H", "N"]},
        },  # fmt: skip
        "magnifications": loaded.eval_magnifications,
        "patch_size": int((preprocess or {}).get("patch_size", data.get("patch_size", 0)) or 0),
        "eval_resize": {
            "method": str(data.get("eval_resize", "center_crop")),
            "crop_fraction": loaded.eval_crop_fraction,
            "size": loaded.eval_patch_size,
        },
        "mean": [float(v) for v in getattr(encoder, "mean", (0.485, 0.456, 0.406))],
        "std": [float(v) for v in getattr(encoder, "std", (0.229, 0.224, 0.225))],
        "normalised_in_graph": not graph.features_in,
        "preprocess": preprocess,
        "feature_settings": model.feature_settings,
        "stain_normalization": (preprocess or {}).get("stain_normalization"),
    }
    json.dumps(card)  # fail here on anything that is not JSON
    return card


def _export_onnx(graph: ExportGraph, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the onnx extra: pip install 'e2e-wsi[onnx]'") from None
    n = torch.export.Dim("n", min=1, max=1 << 20)
    name = "features" if graph.features_in else "patches"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter users cannot act on; the result is verified
        torch.onnx.export(
            graph, (example,), str(path), input_names=[name], output_names=_output_names(graph),
            dynamic_shapes={"x": {0: n}}, dynamo=True, verbose=False, external_data=False,
        )  # fmt: skip


def _output_names(graph: ExportGraph) -> list[str]:
    return [graph.prediction_key, "attention"]


def _export_torchscript(graph: ExportGraph, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; the result is verified below
        traced = torch.jit.trace(graph, (example,), check_trace=False)
        traced.save(str(path))


def verify(graph: ExportGraph, path: Path, fmt: str, size: int, dim: int | None) -> dict[str, Any]:
    """Largest absolute difference between the exported file and PyTorch, per output, over bag sizes.

    Raises:
        RuntimeError: If any difference exceeds :data:`TOLERANCE` (the export is not written).
    """
    from e2e_wsi.export.runtime import load_exported

    run = load_exported(path, fmt)
    worst = {"prediction": 0.0, "attention": 0.0}
    for i, n in enumerate(VERIFY_SIZES):
        x = example_input(graph, size, n, dim, seed=100 + i)
        with torch.no_grad():
            ref = [t.numpy() for t in graph(x)]
        got = run(x.numpy())
        for key, a, b in zip(worst, got, ref, strict=True):
            if a.shape != b.shape:
                raise RuntimeError(f"exported {key} has shape {a.shape}, PyTorch {b.shape} (bag of {n})")
            worst[key] = max(worst[key], float(np.abs(a - b).max()))
    if max(worst.values()) > TOLERANCE:
        raise RuntimeError(f"exported model differs from PyTorch by {worst} (> {TOLERANCE}); not written")
    return {"bag_sizes": list(VERIFY_SIZES), "max_abs_diff": worst, "tolerance": TOLERANCE}


def export_run(ckpt_path: str | Path, fmt: str, out: str | Path) -> Path:
    """Export a run's model and write ``OUT/model.onnx`` or ``OUT/model.pt`` with ``OUT/model.json``.

    Args:
        ckpt_path: The checkpoint (the run's config is read from its run folder).
        fmt: ``onnx`` or ``torchscript``.
        out: Output folder (created; files in it are replaced only once the new export is verified).

    Returns:
        The path of ``model.json``.

    Raises:
        UserError: Unknown format, or the onnx extra missing.
        RuntimeError: The exported file does not reproduce PyTorch within :data:`TOLERANCE`.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    loaded = load_run(ckpt_path)
    graph = ExportGraph(loaded.model).eval()
    dim = int(loaded.model.encoder.out_dim) if graph.features_in else None
    size = loaded.eval_patch_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        file = Path(tmp) / FILE_NAMES[fmt]
        example = example_input(graph, size, 5, dim)
        (_export_onnx if fmt == "onnx" else _export_torchscript)(graph, example, file)
        card = model_card(loaded, graph, fmt, file)
        card["verified"] = verify(graph, file, fmt, size, dim)
        (Path(tmp) / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        for name in (FILE_NAMES[fmt], CARD_NAME):  # model first: a card never names a missing file
            os.replace(Path(tmp) / name, out / name)
    return out / CARD_NAME
