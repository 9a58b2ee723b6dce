"""`predict` never loses or mixes outputs (issue 21): an ensemble aligns classes by name (item 6), a
non-empty --out is refused unless --overwrite/--add and is locked while written (item 13), and a cache
entry tiled from another file of the same name is re-tiled (item 5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cli import main
from e2e_wsi.errors import UserError
from e2e_wsi.inference.outputs import out_lock, predictions_frame
from e2e_wsi.inference.predict import Ensemble
from e2e_wsi.runs import load_run


def _named(ckpt: Path, names: list[str], scale: float = 1.0):
    """The run's model with ``data.class_names`` set (and its aggregator scaled: a different model)."""
    loaded = load_run(ckpt)
    if scale != 1.0:
        with torch.no_grad():
            for p in loaded.model.aggregator.parameters():
                p.mul_(scale)
    loaded.data = {**loaded.data, "class_names": names}
    return loaded


def test_an_ensemble_aligns_classes_by_name(tiny_run: Path, synth_cache: tuple[Path, Path]) -> None:
    last = tiny_run / "checkpoints" / "last.ckpt"
    a, b = _named(last, ["IDC", "ILC"]), _named(last, ["ILC", "IDC"], scale=1.5)
    cache = PatchCache(synth_cache[1])
    slide_id = cache.slide_ids()[0]
    pa, pb = Ensemble([a]).predict_slide(cache, slide_id), Ensemble([b]).predict_slide(cache, slide_id)
    assert not np.allclose(pa.probs, pb.probs[::-1], atol=1e-4)  # the alignment is visible
    both = Ensemble([a, b])
    np.testing.assert_allclose(both.predict_slide(cache, slide_id).probs, (pa.probs + pb.probs[::-1]) / 2)
    assert both.class_names == ["IDC", "ILC"]
    frame = predictions_frame([pa], "classification", both.class_names)
    assert list(frame.columns) == ["slide_id", "pred", "pred_class", "prob_0", "prob_1"]
    assert frame["pred_class"][0] == ["IDC", "ILC"][int(np.argmax(pa.probs))]
    with pytest.raises(UserError, match=r"different classes.*\['IDC', 'ILC'\].*\['IDC', 'LOB'\]"):
        Ensemble([a, _named(last, ["IDC", "LOB"])])
    with pytest.raises(UserError, match="different classes"):
        Ensemble([a, load_run(last)])  # one named, one not: nothing to align by


def _predict(run: Path, slides: list[Path], out: Path, *extra: str) -> int:
    return main(["predict", "--run", str(run), "--ckpt", "last.ckpt", "--slides", *map(str, slides),
                 "--out", str(out), "--quiet", "--no_heatmaps", *extra])  # fmt: skip


def test_a_non_empty_out_is_refused_unless_overwrite_or_add(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = PatchCache(synth_cache[1]).slide_ids()[:2]
    s0, s1 = (synth_cache[0].parent / "slides" / f"{i}.svs" for i in ids)
    out = tmp_path / "out"
    assert _predict(tiny_run, [s0], out) == 0
    first = (out / "predictions.csv").read_bytes()
    capsys.readouterr()
    assert _predict(tiny_run, [s1], out) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "predictions.csv").read_bytes() == first
    # --add: both slides, one row each; adding a slide again replaces its row.
    assert _predict(tiny_run, [s1], out, "--add") == 0
    assert _predict(tiny_run, [s0], out, "--add") == 0
    pred = pd.read_csv(out / "predictions.csv")
    assert sorted(pred["slide_id"]) == sorted(ids) and len(pred) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(s["slide_id"] for s in summary["slides"]) == sorted(ids) and summary["counts"]["ok"] == 2
    # --overwrite: the earlier slides' files go too.
    assert _predict(tiny_run, [s1], out, "--overwrite") == 0
    assert list(pd.read_csv(out / "predictions.csv")["slide_id"]) == [ids[1]]
    assert sorted(p.stem for p in (out / "attention").iterdir()) == [ids[1]]
    assert not (out / f"{ids[0]}.geojson").exists()
    # Another predict writing this folder: refused, naming the holder.
    capsys.readouterr()
    with out_lock(out):
        assert _predict(tiny_run, [s0], out, "--add") == 2
    assert "in use by another `e2e-wsi predict`" in capsys.readouterr().err


def test_a_slide_of_the_same_name_but_another_file_is_retiled(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    ids = PatchCache(synth_cache[1]).slide_ids()[:2]
    slides = synth_cache[0].parent / "slides"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(slides / f"{ids[0]}.svs", tmp_path / "a" / "X.svs")
    shutil.copy(slides / f"{ids[1]}.svs", tmp_path / "b" / "X.svs")
    shutil.copy(slides / f"{ids[1]}.svs", tmp_path / "Y.svs")
    cache = ["--cache_dir", str(tmp_path / "cache")]
    assert _predict(tiny_run, [tmp_path / "a" / "X.svs"], tmp_path / "o1", *cache) == 0
    assert _predict(tiny_run, [tmp_path / "b" / "X.svs"], tmp_path / "o2", *cache) == 0
    assert _predict(tiny_run, [tmp_path / "Y.svs"], tmp_path / "o3", *cache) == 0
    p1, p2, p3 = (pd.read_csv(tmp_path / o / "predictions.csv") for o in ("o1", "o2", "o3"))
    np.testing.assert_allclose(p2["prob_1"], p3["prob_1"], atol=1e-6)  # b/X.svs is Y.svs, not a/X.svs
    assert not np.allclose(p1["prob_1"], p3["prob_1"], atol=1e-4)
