"""`e2e-wsi predict` on raw slide files: same numbers as `test`, ensembles, GeoJSON, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import torch
from PIL import Image
from shapely.geometry import shape

from e2e_wsi.annotations.geojson import mask_to_geometry, measurements_of
from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cli import main
from e2e_wsi.inference.predict import Ensemble
from e2e_wsi.models.module import SlideModule
from e2e_wsi.models.tasks import CoxSurvivalTask
from e2e_wsi.runs import LoadedRun, load_run
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.writer import write_pyramidal_tiff
from e2e_wsi.viz.heatmap import patch_lesion_labels


@pytest.fixture(scope="module")
def tested_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny run after `e2e-wsi test` (its predictions.csv holds the test slides)."""
    run = tmp_path_factory.mktemp("predict") / "run"
    shutil.copytree(tiny_run, run)
    ckpt = run / "checkpoints" / "last.ckpt"
    args = ["test", "--config", str(run / "config.yaml"), "--run_dir", str(run), "--ckpt_path", str(ckpt)]
    assert main([*args, "--bootstrap", "20"]) == 0
    return run


@pytest.fixture(scope="module")
def raw_prediction(
    tested_run: Path, synth_cache: tuple[Path, Path], tmp_path_factory
) -> tuple[Path, list[str]]:
    """`predict` on copies of the test slides (new paths: no cache holds them, they are tiled afresh)."""
    manifest, _ = synth_cache
    test_ids = list(pd.read_csv(tested_run / "predictions.csv")["slide_id"])
    raw = tmp_path_factory.mktemp("raw")
    for slide_id in test_ids:
        shutil.copy(manifest.parent / "slides" / f"{slide_id}.svs", raw / f"{slide_id}.svs")
    out = raw / "out"
    ckpt = ["--ckpt", "last.ckpt"]
    assert (
        main(["predict", "--run", str(tested_run), *ckpt, "--slides", str(raw), "--out", str(out), "--quiet"])
        == 0
    )
    return out, test_ids


def test_predict_from_raw_slides_equals_test_through_the_cache(
    tested_run: Path, raw_prediction: tuple[Path, list[str]]
) -> None:
    out, test_ids = raw_prediction
    assert (tested_run / "preprocess.json").is_file()  # recorded by fit
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns) == ["slide_id", "pred", "prob_0", "prob_1"]
    truth = pd.read_csv(tested_run / "predictions.csv").set_index("slide_id").loc[pred["slide_id"]]
    np.testing.assert_allclose(pred[["prob_0", "prob_1"]], truth[["prob_0", "prob_1"]], atol=1e-5)
    assert (pred["pred"].to_numpy() == truth["pred"].to_numpy()).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"ok": len(test_ids), "failed": 0}
    assert not any(s["reused_cache"] for s in summary["slides"])
    assert summary["checkpoints"] == [str(tested_run / "checkpoints" / "last.ckpt")]
    for slide_id in test_ids:
        assert (out / "heatmaps" / f"{slide_id}.png").stat().st_size > 5_000
    assert not list(out.rglob(".*.tmp*"))  # nothing half-written


def test_attention_csv_has_level0_coordinates_of_every_patch(
    raw_prediction: tuple[Path, list[str]], synth_cache: tuple[Path, Path]
) -> None:
    out, test_ids = raw_prediction
    cache = PatchCache(synth_cache[1])
    table = pd.read_csv(out / "attention" / f"{test_ids[0]}.csv")
    np.testing.assert_array_equal(table[["x", "y"]].to_numpy(), cache.coords(test_ids[0], 10.0))
    heads = table.filter(like="attention_head_").to_numpy()
    assert heads.shape[1] == 8
    np.testing.assert_allclose(heads.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_allclose(table["attention"], heads.mean(axis=1), atol=1e-7)


def _geojson(out: Path, slide_id: str) -> tuple[list[dict], list[dict]]:
    data = json.loads((out / f"{slide_id}.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    features = data["features"]
    patches = [f for f in features if f["properties"]["objectType"] == "detection"]
    tissue = [f for f in features if f["properties"]["objectType"] == "annotation"]
    return patches, tissue


def test_geojson_patches_land_on_tissue_pixels(
    raw_prediction: tuple[Path, list[str]], synth_cache: tuple[Path, Path]
) -> None:
    out, test_ids = raw_prediction
    slide_id = test_ids[0]
    patches, tissue = _geojson(out, slide_id)
    table = pd.read_csv(out / "attention" / f"{slide_id}.csv")
    assert len(patches) == len(table) and tissue
    m = measurements_of(patches[0]["properties"])
    assert set(m) == {"attention", "magnification", *(f"attention_head_{h}" for h in range(8))}
    assert m["attention"] == pytest.approx(np.mean([m[f"attention_head_{h}"] for h in range(8)]))
    tissue_area = shapely.union_all([shape(f["geometry"]) for f in tissue])
    polys = [shape(f["geometry"]) for f in patches]
    covered = shapely.union_all(polys)
    with Slide(synth_cache[0].parent / "slides" / f"{slide_id}.svs") as slide:

        def stained(x: int, y: int) -> float:  # share of saturated (stained, not white glass) pixels
            pixels = np.asarray(slide.read_rgb((x, y), 0, (256, 256)).convert("HSV"))
            return float((pixels[..., 1] > 8).mean())

        shares = []
        for poly in polys:
            assert poly.is_valid and poly.area == 256 * 256  # 64 px at 10x of a 40x slide
            # Patches above the tissue threshold, and those added to reach 95% coverage, touch tissue.
            assert poly.intersection(tissue_area).area > 0
            shares.append(stained(*(int(v) for v in poly.bounds[:2])))
        # Grid squares with no patch polygon are (mostly) glass; the grid is anchored on the tissue.
        ox, oy = (int(min(p.bounds[i] for p in polys)) % 256 for i in (0, 1))
        empty = [
            (x, y)
            for x in range(ox - 256 if ox else 0, 2048 - 255, 256)
            for y in range(oy - 256 if oy else 0, 2048 - 255, 256)
            if x >= 0 and y >= 0 and not covered.contains(shapely.Point(x + 128, y + 128))
        ]
        assert empty
        outside = [stained(x, y) for x, y in empty]
    assert min(shares) > 0.02 and np.median(shares) > 0.6
    assert np.median(outside) < 0.2


def test_a_lesion_patch_polygon_overlaps_the_truth_mask(
    raw_prediction: tuple[Path, list[str]], synth_cache: tuple[Path, Path]
) -> None:
    out, test_ids = raw_prediction
    masks = synth_cache[0].parent / "masks"
    found = 0
    for slide_id in test_ids:
        truth = np.asarray(Image.open(masks / f"{slide_id}.png").convert("L"))
        patches, _ = _geojson(out, slide_id)
        coords = np.array([shape(f["geometry"]).bounds[:2] for f in patches], dtype=np.int64)
        labels = patch_lesion_labels(coords, 256, truth, (2048, 2048))
        lesion = mask_to_geometry(truth == 255, 2048 / truth.shape[1])
        for feature, is_lesion in zip(patches, labels, strict=True):
            overlap = shape(feature["geometry"]).intersection(lesion).area / (256 * 256)
            assert overlap > 0.2 if is_lesion else overlap < 0.3
            found += bool(is_lesion)
    assert found > 0, "no test slide has a lesion patch"


def test_a_cache_that_holds_the_slide_is_reused(
    tested_run: Path, synth_cache: tuple[Path, Path], raw_prediction: tuple[Path, list[str]], tmp_path: Path
) -> None:
    manifest, _ = synth_cache
    raw_out, test_ids = raw_prediction
    slide = manifest.parent / "slides" / f"{test_ids[0]}.svs"
    out = tmp_path / "out"
    args = ["predict", "--run", str(tested_run), "--ckpt", "last.ckpt", "--slides", str(slide)]
    assert main([*args, "--out", str(out), "--quiet", "--no_heatmaps"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slides"][0]["reused_cache"] is True and not (out / "cache").exists()
    fresh = pd.read_csv(raw_out / "predictions.csv").set_index("slide_id")
    reused = pd.read_csv(out / "predictions.csv").set_index("slide_id")
    np.testing.assert_allclose(reused.loc[test_ids[0], "prob_1"], fresh.loc[test_ids[0], "prob_1"], atol=1e-6)


def test_a_manifest_without_labels_lists_the_slides(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest = pd.read_csv(synth_cache[0]).head(2)
    manifest["path"] = [str(synth_cache[0].parent / p) for p in manifest["path"]]
    manifest[["slide_id", "path"]].to_csv(tmp_path / "new.csv", index=False)  # no label column
    out = tmp_path / "out"
    args = ["predict", "--run", str(tiny_run), "--manifest", str(tmp_path / "new.csv"), "--out", str(out)]
    assert main([*args, "--quiet", "--no_heatmaps"]) == 0
    assert list(pd.read_csv(out / "predictions.csv")["slide_id"]) == list(manifest["slide_id"])


def _perturbed_copy(ckpt: Path, out: Path) -> Path:
    """A second, different checkpoint of the same run: the aggregator's weights scaled by 1.5."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for key, value in state["state_dict"].items():
        if key.startswith("aggregator.") and value.is_floating_point():
            state["state_dict"][key] = value * 1.5
    torch.save(state, out)
    return out


def test_an_ensemble_averages_probabilities_and_attention(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    last = tiny_run / "checkpoints" / "last.ckpt"
    other = _perturbed_copy(last, tmp_path / "other.ckpt")
    a, b = load_run(last), load_run(other, tiny_run / "config.yaml")
    cache = PatchCache(synth_cache[1])
    slide_id = cache.slide_ids()[0]
    pa, pb = Ensemble([a]).predict_slide(cache, slide_id), Ensemble([b]).predict_slide(cache, slide_id)
    both = Ensemble([a, b]).predict_slide(cache, slide_id)
    np.testing.assert_allclose(both.probs, (pa.probs + pb.probs) / 2, atol=1e-7)
    np.testing.assert_allclose(
        both.attention.attention, (pa.attention.attention + pb.attention.attention) / 2
    )
    assert not np.allclose(pa.attention.attention, pb.attention.attention)  # two different models


def test_the_cli_lists_the_checkpoints_of_an_ensemble(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpts = sorted(str(c) for c in (tiny_run / "checkpoints").glob("*.ckpt"))
    slide = synth_cache[0].parent / "slides" / f"{PatchCache(synth_cache[1]).slide_ids()[0]}.svs"
    out = tmp_path / "ens"
    assert (
        main(
            [
                "predict",
                "--ckpt",
                *ckpts,
                "--slides",
                str(slide),
                "--out",
                str(out),
                "--quiet",
                "--no_heatmaps",
            ]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["checkpoints"] == ckpts


def test_checkpoints_of_different_tasks_are_refused(tiny_run: Path) -> None:
    cls = load_run(tiny_run / "checkpoints" / "last.ckpt")
    surv = LoadedRun(SlideModule(task=CoxSurvivalTask()), cls.data, Path("surv.ckpt"), cls.run)
    with pytest.raises(ValueError, match="different tasks.*classification.*surv.ckpt is survival"):
        Ensemble([cls, surv])


def test_unreadable_slide_is_reported_and_the_rest_go_on(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    good = PatchCache(synth_cache[1]).slide_ids()[0]
    shutil.copy(synth_cache[0].parent / "slides" / f"{good}.svs", slides / f"{good}.svs")
    (slides / "broken.svs").write_bytes(b"not a slide at all")
    image = np.asarray(Slide(slides / f"{good}.svs").read_rgb((0, 0), 0, (2048, 2048)))
    write_pyramidal_tiff(slides / "nometa.tif", image, mpp=None, objective_power=None)
    out = tmp_path / "out"
    args = [
        "predict",
        "--run",
        str(tiny_run),
        "--slides",
        str(slides),
        "--out",
        str(out),
        "--quiet",
        "--no_heatmaps",
    ]
    assert main(args) == 1
    summary = json.loads((out / "summary.json").read_text())
    status = {s["slide_id"]: s for s in summary["slides"]}
    assert status[good]["status"] == "ok"
    assert status["broken"]["status"] == "failed" and "OpenSlide" in status["broken"]["reason"]
    assert status["nometa"]["status"] == "failed" and "--mpp" in status["nometa"]["reason"]
    assert list(pd.read_csv(out / "predictions.csv")["slide_id"]) == [good]
    assert "broken" in capsys.readouterr().err
    # --mpp rescues the slide without metadata; --allow-failures accepts the broken one.
    assert main([*args, "--mpp", "0.25", "--allow-failures"]) == 0
    assert sorted(pd.read_csv(out / "predictions.csv")["slide_id"]) == sorted([good, "nometa"])


def test_a_run_folder_without_checkpoint_is_a_clear_error(
    tmp_path: Path, synth_cache: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run").mkdir()
    slide = next((synth_cache[0].parent / "slides").glob("*.svs"))
    out = tmp_path / "out"
    assert main(["predict", "--run", str(tmp_path / "run"), "--slides", str(slide), "--out", str(out)]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err and not out.exists()


def test_preprocess_params_fall_back_to_the_training_cache(tiny_run: Path, tmp_path: Path) -> None:
    from e2e_wsi.inference.params import preprocess_config
    from e2e_wsi.runs import RunFolder, preprocess_params

    loaded = load_run(tiny_run / "checkpoints" / "last.ckpt")
    recorded = preprocess_params(loaded.run, loaded.data)
    bare = RunFolder(tmp_path)  # a run folder without preprocess.json (trained before it existed)
    assert preprocess_params(bare, loaded.data) == recorded
    config = preprocess_config(recorded, [10.0], mpp=0.5)
    assert config.patch_size == 64 and config.magnifications == (10.0,) and config.mpp == 0.5
    with pytest.raises(FileNotFoundError, match="no preprocess.json"):
        preprocess_params(bare, {"cache_dir": str(tmp_path / "gone")})


def test_the_same_slide_id_twice_is_refused(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slide = next((synth_cache[0].parent / "slides").glob("*.svs"))
    (tmp_path / "copy").mkdir()
    shutil.copy(slide, tmp_path / "copy" / slide.name)
    args = ["predict", "--run", str(tiny_run), "--slides", str(slide), str(tmp_path / "copy" / slide.name)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_survival_models_write_a_risk_per_slide(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path
) -> None:
    from e2e_wsi.inference.cli import slide_jobs
    from e2e_wsi.inference.pipeline import PredictOptions, predict_slides

    cls = load_run(tiny_run / "checkpoints" / "last.ckpt")
    members = [
        LoadedRun(SlideModule(task=CoxSurvivalTask()).eval(), cls.data, Path(f"cox{i}.ckpt"), cls.run)
        for i in range(2)
    ]
    slides = sorted((synth_cache[0].parent / "slides").glob("*.svs"))[:2]
    ensemble = Ensemble(members)
    summary = predict_slides(
        ensemble,
        slide_jobs([str(s) for s in slides], None),
        tmp_path,
        PredictOptions(heatmaps=False, progress=False),
    )
    frame = pd.read_csv(tmp_path / "predictions.csv")
    assert list(frame.columns) == ["slide_id", "risk"] and len(frame) == 2
    singles = [
        Ensemble([m]).predict_slide(PatchCache(synth_cache[1]), frame["slide_id"][0]).risk for m in members
    ]
    assert frame["risk"][0] == pytest.approx(np.mean(singles), rel=1e-5)
    assert summary["task"] == "survival" and summary["checkpoints"] == ["cox0.ckpt", "cox1.ckpt"]


def test_an_ensemble_of_differently_tiled_runs_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    from e2e_wsi.inference.pipeline import predict_slides
    from e2e_wsi.runs import RunFolder

    a = load_run(tiny_run / "checkpoints" / "last.ckpt")
    other = RunFolder(tmp_path / "other")
    other.root.mkdir()
    recorded = json.loads((tiny_run / "preprocess.json").read_text())
    recorded["params"]["patch_size"] = 128
    other.preprocess.write_text(json.dumps(recorded))
    b = LoadedRun(a.model, a.data, other.root / "b.ckpt", other)
    with pytest.raises(ValueError, match="tiled differently \\(patch_size\\)"):
        predict_slides(Ensemble([a, b]), [], tmp_path / "out")


def test_annotations_leave_regions_out_of_new_slides(
    raw_prediction: tuple[Path, list[str]], tested_run: Path, tmp_path: Path
) -> None:
    import geojson

    out, test_ids = raw_prediction
    slide_id = test_ids[0]
    before = pd.read_csv(out / "attention" / f"{slide_id}.csv")
    # A pen mark over the left half of the slide (level-0 pixels; the synthetic slides are 2048 px).
    notes = tmp_path / "notes"
    notes.mkdir()
    ring = [(0, 0), (1024, 0), (1024, 2048), (0, 2048), (0, 0)]
    pen = geojson.Feature(geometry=geojson.Polygon([ring]), properties={"classification": {"name": "Pen"}})
    (notes / f"{slide_id}.geojson").write_text(geojson.dumps(geojson.FeatureCollection([pen])))
    slide = raw_prediction[0].parent / f"{slide_id}.svs"
    args = ["predict", "--run", str(tested_run), "--ckpt", "last.ckpt", "--slides", str(slide)]
    new = tmp_path / "out"
    assert main([*args, "--out", str(new), "--annotations", str(notes), "--quiet", "--no_heatmaps"]) == 0
    after = pd.read_csv(new / "attention" / f"{slide_id}.csv")
    assert (before["x"] + before["size_level0"] <= 1024).any()  # the slide had tissue patches there
    assert len(after) < len(before)
    assert (after["x"] + after["size_level0"] > 1024).all()  # none lies wholly under the pen mark
    # A file for a slide that is not being predicted is refused, naming the file.
    (notes / "not_a_slide.geojson").write_text(geojson.dumps(geojson.FeatureCollection([pen])))
    assert main([*args, "--out", str(tmp_path / "o2"), "--annotations", str(notes), "--quiet"]) == 2
