"""Stain normalisation: recoloured copies of synthetic slides come back close to the original, in pixels
and in a trained model's probabilities, and the normaliser travels with the cache into `predict`.

Setup (chosen before looking at results, kept as measured): the recoloured copy of a synthetic slide is
written as a new pyramidal file, both slides are tiled raw and with Reinhard normalisation to a *different*
cohort slide's thumbnail, and the tiny run (trained on raw patches) predicts all four. Macenko is only
checked in pixels under a stain-matrix change: on the channel-wise recolouring it moves the copy further
from the original (synthetic H&E is not a two-stain Beer-Lambert mixture); docs/benchmarks.md has the
numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from e2e_wsi.cache.preprocess import preprocess
from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cache.worker import PreprocessConfig, SlideJob
from e2e_wsi.errors import UserError
from e2e_wsi.inference.params import preprocess_config
from e2e_wsi.slides.reader import Slide
from e2e_wsi.slides.writer import write_pyramidal_tiff
from e2e_wsi.synth.render import render_slide

pytest.importorskip("torchstain", reason="the stain extra: pip install 'e2e-wsi[stain]'")
from e2e_wsi.stain import StainNormalizer  # noqa: E402


def gamma_recolour(image: np.ndarray) -> np.ndarray:
    """A scanner-like colour shift: a different gamma per RGB channel."""
    x = image.astype(np.float32) / 255.0
    return np.clip(255.0 * x ** np.array([1.5, 0.8, 1.2]), 0, 255).round().astype(np.uint8)


def stain_recolour(image: np.ndarray, reference: StainNormalizer) -> np.ndarray:
    """A staining shift: the same concentrations remixed with rotated H and E vectors and rescaled."""
    he = torch.tensor(reference.target["stain_matrix"])
    od = -torch.log((torch.from_numpy(image).reshape(-1, 3).T.float() + 1.0) / 240.0)
    conc = torch.linalg.lstsq(he, od).solution * torch.tensor([[1.3], [0.8]])
    shifted = he + torch.tensor([[0.15, -0.1], [-0.1, 0.05], [0.0, 0.1]])
    shifted = shifted / shifted.norm(dim=0, keepdim=True)
    out = (240.0 * torch.exp(-shifted @ conc)).clamp(0, 255).round().to(torch.uint8)
    return out.T.reshape(image.shape).numpy()


@pytest.fixture(scope="module")
def painted() -> tuple[np.ndarray, np.ndarray]:
    image, _ = render_slide(np.random.default_rng(0), size=(1024, 1024), task="subtype", label=1)
    image = np.ascontiguousarray(image)
    return image, image.mean(axis=-1) < 220  # (RGB, tissue pixels)


def _mae(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32))[where].mean())


def _normalised(norm: StainNormalizer, image: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    out = norm.apply(torch.from_numpy(image).permute(2, 0, 1)[None], norm.source_stats(image[tissue]))
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    ("method", "recolour"), [("reinhard", "gamma"), ("reinhard", "stain"), ("macenko", "stain")]
)
def test_a_recoloured_copy_is_brought_back_towards_the_original(painted, method: str, recolour: str) -> None:
    image, tissue = painted
    copy = (
        gamma_recolour(image)
        if recolour == "gamma"
        else stain_recolour(image, StainNormalizer.fit("macenko", image[tissue]))
    )
    norm = StainNormalizer.fit(method, image[tissue])  # the target: the original's own statistics
    raw = _mae(copy, image, tissue)
    fixed = _mae(_normalised(norm, copy, tissue), _normalised(norm, image, tissue), tissue)
    assert raw > 8  # the recolouring is visible
    assert fixed < 0.8 * raw


def test_normaliser_is_plain_json_and_validates(painted, tmp_path: Path) -> None:
    image, tissue = painted
    norm = StainNormalizer.fit("reinhard", image[tissue], reference="ref.png")
    again = StainNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert again == norm
    with pytest.raises(UserError, match="choose one of macenko, reinhard"):
        StainNormalizer("vahadane")
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(UserError, match=r"x\.png: cannot read it as an image"):
        StainNormalizer.from_image_file("macenko", tmp_path / "x.png")


# --------------------------------------------------------------------- slides, cache, model, predict
def _recoloured_copy(src: Path, dst: Path) -> Path:
    with Slide(src) as slide:
        w, h = slide.dimensions
        level0 = np.asarray(slide.read_rgb((0, 0), 0, (w, h)))
        power, mpp = slide.resolution.objective_power, slide.resolution.mpp
    write_pyramidal_tiff(dst, gamma_recolour(level0), mpp=mpp, objective_power=power, downsamples=(1, 4, 16))
    return dst


def _probs(run: Path, cache: Path, slide_id: str) -> np.ndarray:
    from e2e_wsi.inference.attention import slide_attention
    from e2e_wsi.runs import load_run

    loaded = load_run(run / "checkpoints" / "last.ckpt")
    _, out = slide_attention(
        loaded.model, PatchCache(cache), slide_id, loaded.eval_magnifications, loaded.eval_patch_size,
        loaded.eval_crop_fraction,
    )  # fmt: skip
    return out["probs"][0].double().numpy()


def test_normalised_probabilities_of_a_recoloured_slide_are_closer_to_the_original(
    synth_cache: tuple[Path, Path], tiny_run: Path, tmp_path: Path
) -> None:
    manifest, _ = synth_cache
    slides = manifest.parent / "slides"
    ids = list(pd.read_csv(manifest)["slide_id"])
    original, other = slides / f"{ids[0]}.svs", slides / f"{ids[1]}.svs"
    copy = _recoloured_copy(original, tmp_path / "copy.svs")
    with Slide(other) as slide:  # the reference: another cohort slide's thumbnail
        Image.fromarray(np.asarray(slide.read_downsampled(8))).save(tmp_path / "ref.png")
    reference = StainNormalizer.from_image_file("reinhard", tmp_path / "ref.png")
    jobs = [SlideJob("orig", original), SlideJob("copy", copy)]
    probs = {}
    for name, stain in (("raw", None), ("norm", reference)):
        config = PreprocessConfig(magnifications=(10.0, 5.0), patch_size=64, stain=stain)
        rows = preprocess(jobs, tmp_path / name, config, workers=0, qc=False, progress=False)
        assert {r["status"] for r in rows} == {"ok"}
        probs[name] = {j.slide_id: _probs(tiny_run, tmp_path / name, j.slide_id) for j in jobs}
    raw_gap = np.abs(probs["raw"]["copy"] - probs["raw"]["orig"]).max()
    norm_gap = np.abs(probs["norm"]["copy"] - probs["norm"]["orig"]).max()
    print(f"max |p(copy) - p(original)|: raw {raw_gap:.4f}, Reinhard-normalised {norm_gap:.4f}")
    assert raw_gap > 1e-3  # the model sees the recolouring at all
    assert norm_gap < raw_gap
    # the normaliser is in the cache parameters, so `predict` tiles new slides with it
    params = PatchCache(tmp_path / "norm").meta("orig")["params"]
    assert preprocess_config(params, [10.0]).stain == reference
    assert preprocess_config(PatchCache(tmp_path / "raw").meta("orig")["params"], [10.0]).stain is None


def test_predict_opt_in_applies_to_runs_without_and_defers_to_runs_with_normalisation(
    painted, tmp_path
) -> None:
    image, tissue = painted
    mine = StainNormalizer.fit("reinhard", image[tissue], reference="mine.png")
    theirs = StainNormalizer.fit("macenko", image[tissue], reference="run.png")
    params = {"patch_size": 64, "jpeg_quality": 90, "tissue_threshold": 0.5, "tissue": {}}
    assert preprocess_config(params, [10.0], stain=mine).stain == mine  # a run trained raw: opt in
    recorded = {**params, "stain_normalization": theirs.to_dict()}
    assert preprocess_config(recorded, [10.0]).stain == theirs  # the run's own, without asking
    with pytest.raises(UserError, match="trained on patches normalised with macenko to run.png"):
        preprocess_config(recorded, [10.0], stain=mine)
    assert StainNormalizer.from_options("none", None) is None
    with pytest.raises(UserError, match="needs --stain_reference"):
        StainNormalizer.from_options("reinhard", None)
    with pytest.raises(UserError, match="--stain_reference needs --stain_normalization"):
        StainNormalizer.from_options("none", tmp_path / "ref.png")
