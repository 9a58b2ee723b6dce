"""`e2e-wsi export`: ONNX and TorchScript files that equal the PyTorch model on bags of any size, a
model.json with what a runtime needs, and `predict --onnx` on raw slides without Lightning."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from e2e_wsi.cli import main
from e2e_wsi.data.transforms import EvalTransform
from e2e_wsi.errors import UserError
from e2e_wsi.export.graph import ExportGraph, example_input
from e2e_wsi.export.runtime import ExportedModel
from e2e_wsi.inference.attention import predict_bag
from e2e_wsi.runs import load_run

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'e2e-wsi[onnx]'")


@pytest.fixture(scope="module")
def exported(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny run exported in both formats."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for fmt in ("onnx", "torchscript"):
        out[fmt] = root / fmt
        assert main(["export", "--run", str(tiny_run), "--format", fmt, "--out", str(out[fmt])]) == 0
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_equals_pytorch_on_bags_of_several_sizes(
    exported: dict[str, Path], tiny_run: Path, fmt: str
) -> None:
    loaded = load_run(tiny_run / "checkpoints" / "last.ckpt")
    model = ExportedModel(exported[fmt])
    size = loaded.eval_patch_size
    graph = ExportGraph(loaded.model).eval()
    for n in (1, 2, 5, 64):  # 64: more patches than the tracing example and the eval chunk (16)
        patches = example_input(graph, size, n, None, seed=n)
        ref = predict_bag(loaded.model, patches)  # the PyTorch path `predict` uses
        probs, attention = model(patches.numpy())
        assert probs.shape == (1, 2) and attention.shape == (1, 8, n)
        np.testing.assert_allclose(probs, ref["probs"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(attention, ref["attention"].numpy(), atol=1e-4, rtol=0)
    # the comparison discriminates: another bag gives other attention
    other = model(example_input(graph, size, 64, None, seed=999).numpy())[1]
    assert np.abs(other - attention).max() > 1e-3


def test_model_json_records_what_a_runtime_needs(exported: dict[str, Path], tiny_run: Path) -> None:
    card = json.loads((exported["onnx"] / "model.json").read_text())
    config = load_run(tiny_run / "checkpoints" / "last.ckpt")
    assert card["task"] == "classification" and card["num_outputs"] == 2
    assert card["input"] == {
        "name": "patches",
        "dtype": "uint8",
        "shape": ["N", 3, 32, 32],
        "channel_order": "rgb",
    }
    assert card["eval_resize"] == {
        "method": "center_crop",
        "crop_fraction": config.eval_crop_fraction,
        "size": 32,
    }
    assert card["magnifications"] == config.eval_magnifications and card["patch_size"] == 64
    assert card["mean"] == pytest.approx([0.485, 0.456, 0.406]) and card["std"] == pytest.approx(
        [0.229, 0.224, 0.225]
    )
    assert card["preprocess"]["patch_size"] == 64 and "tissue" in card["preprocess"]
    assert card["verified"]["max_abs_diff"]["prediction"] <= 1e-4
    assert "class_names" in card


def test_a_replaced_model_file_is_refused(exported: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "onnx"
    shutil.copytree(exported["onnx"], copy)
    shutil.copy(exported["torchscript"] / "model.pt", copy / "model.onnx")
    with pytest.raises(UserError, match="sha256 differs"):
        ExportedModel(copy)


def test_predict_onnx_runs_on_raw_slides_without_lightning(
    exported: dict[str, Path], tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, _ = synth_cache
    slide_id = pd.read_csv(manifest)["slide_id"].iloc[0]
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(manifest.parent / "slides" / f"{slide_id}.svs", raw / f"{slide_id}.svs")
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
        "from e2e_wsi.cli import main\n"
        f"sys.exit(main(['predict', '--onnx', {str(exported['onnx'])!r}, '--slides', {str(raw)!r}, "
        f"'--out', {str(out)!r}, '--quiet']))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds["slide_id"]) == [slide_id]
    # the same slide through the PyTorch model, tiled the same way (the ONNX run's own cache)
    from e2e_wsi.cache.store import PatchCache
    from e2e_wsi.inference.attention import slide_attention

    loaded = load_run(tiny_run / "checkpoints" / "last.ckpt")
    cache = PatchCache(out / "cache")
    _, ref = slide_attention(
        loaded.model,
        cache,
        slide_id,
        loaded.eval_magnifications,
        loaded.eval_patch_size,
        loaded.eval_crop_fraction,
    )
    np.testing.assert_allclose(preds[["prob_0", "prob_1"]].to_numpy()[0], ref["probs"][0].numpy(), atol=1e-4)
    table = pd.read_csv(out / "attention" / f"{slide_id}.csv")
    assert len(table) == ref["attention"].shape[-1]
    assert json.loads((out / "summary.json").read_text())["counts"] == {"ok": 1, "failed": 0}
    assert (out / f"{slide_id}.geojson").is_file()


def test_export_of_a_crossval_folder_asks_for_one_fold(tmp_path: Path, capsys) -> None:
    for k in (0, 1):
        (tmp_path / f"fold_{k}" / "checkpoints").mkdir(parents=True)
        torch.save({}, tmp_path / f"fold_{k}" / "checkpoints" / "last.ckpt")
    assert main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "export one fold" in capsys.readouterr().err


def test_eval_transform_is_what_the_card_describes() -> None:
    # model.json's eval_resize is EvalTransform's contract: uint8 in, centre crop, resize, uint8 out
    out = EvalTransform(32, crop_fraction=0.875)(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 32, 32)


@pytest.mark.slow  # two more exports (~40 s each on a loaded 2-core machine)
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_feature_models_export_with_features_in(tmp_path: Path, fmt: str) -> None:
    from e2e_wsi.export.exporter import _export_onnx, _export_torchscript, verify
    from e2e_wsi.models.encoders import PrecomputedFeatures
    from e2e_wsi.models.module import SlideModule

    torch.manual_seed(0)
    graph = ExportGraph(SlideModule(encoder=PrecomputedFeatures(dim=24)).eval()).eval()
    assert graph.features_in
    path = tmp_path / "model"
    (_export_onnx if fmt == "onnx" else _export_torchscript)(graph, example_input(graph, 0, 5, 24), path)
    checked = verify(graph, path, fmt, 0, 24)  # bags of 1, 7 and 33 feature rows
    assert max(checked["max_abs_diff"].values()) <= 1e-4
