"""`e2e-wsi extract`: features equal the encoder on the cached patches; resumable; failures isolated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cli import main
from e2e_wsi.data.transforms import EvalTransform, normalize_images
from e2e_wsi.features.extract import ExtractConfig, extract_features
from e2e_wsi.features.store import FeatureFolder
from e2e_wsi.models.encoders import ResNetEncoder, TimmEncoder

ROOT = Path(__file__).resolve().parents[2]


def test_features_equal_the_encoder_on_cached_patches(synth_cache: tuple[Path, Path], tmp_path: Path) -> None:
    _, cache_dir = synth_cache
    torch.manual_seed(0)
    encoder = TimmEncoder("test_resnet")  # non-ImageNet statistics (0.5, 0.5): normalisation must follow
    rows = extract_features(
        cache_dir,
        tmp_path,
        encoder,
        ExtractConfig(magnification=5, batch_size=7, input_size=48, progress=False),
    )
    assert {r["status"] for r in rows} == {"ok"}
    cache = PatchCache(cache_dir)
    slide = cache.slide_ids()[0]
    n = cache.count(slide, 5)
    patches = torch.from_numpy(cache.get_many(slide, 5, range(n))).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = encoder.eval()(normalize_images(EvalTransform(48)(patches), encoder.mean, encoder.std))
    feats, coords = FeatureFolder(tmp_path).read(slide)
    assert feats.shape == (n, encoder.out_dim)
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(coords, cache.coords(slide, 5))  # level-0 x, y per row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"] == {"ok": len(rows), "skipped": 0, "failed": 0}
    assert summary["params"]["encoder"]["mean"] == [0.5, 0.5, 0.5]


def _arrays(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    out = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as f:
            out[path.stem] = (f["features"][()], f["coords"][()], f.attrs["e2e_wsi_provenance"])
    return out


@pytest.mark.slow  # a real subprocess killed with SIGKILL, then resumed (~20 s on 2 shared cores)
def test_resume_after_a_kill_gives_identical_files(synth_cache: tuple[Path, Path], tmp_path: Path) -> None:
    _, cache_dir = synth_cache
    args = ["--cache", str(cache_dir), "--encoder", "resnet18", "--magnification", "5", "--input-size", "64",
            "--batch-size", "4", "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(["extract", *args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "e2e_wsi", "extract", *args, "--out", str(out)], env=env)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.h5")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = len(list(out.glob("*.h5")))
    total = len(PatchCache(cache_dir).slide_ids())
    assert 1 <= before < total, "the kill came too late to test resuming"
    assert main(["extract", *args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["skipped"] == before and summary["counts"]["ok"] == total - before
    ref, got = _arrays(tmp_path / "ref"), _arrays(out)
    assert sorted(ref) == sorted(got) and not list(out.glob("*.tmp"))
    for slide, (f, c, prov) in ref.items():
        np.testing.assert_array_equal(got[slide][0], f)
        np.testing.assert_array_equal(got[slide][1], c)
        assert got[slide][2] == prov


def test_one_bad_slide_does_not_stop_the_others(
    synth_cache: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, cache_dir = synth_cache
    bad = PatchCache(cache_dir).slide_ids()[1]
    real = PatchCache.get_many

    def broken(self, slide_id, magnification, indices):  # a damaged slide in the cache
        if slide_id == bad:
            raise KeyError(f"patch {slide_id} missing from the cache (damaged LMDB?)")
        return real(self, slide_id, magnification, indices)

    monkeypatch.setattr(PatchCache, "get_many", broken)
    rows = extract_features(
        cache_dir, tmp_path, ResNetEncoder(), ExtractConfig(magnification=5, input_size=32, progress=False)
    )
    status = {r["slide_id"]: r["status"] for r in rows}
    assert status.pop(bad) == "failed" and set(status.values()) == {"ok"}
    assert not (tmp_path / f"{bad}.h5").exists()
    failed = json.loads((tmp_path / "summary.json").read_text())["slides"][1]
    assert failed["slide_id"] == bad and "damaged LMDB" in failed["error"]


def test_a_folder_of_other_settings_is_not_mixed_into(synth_cache: tuple[Path, Path], tmp_path: Path) -> None:
    _, cache_dir = synth_cache
    config = ExtractConfig(magnification=5, input_size=32, progress=False)
    extract_features(
        cache_dir, tmp_path, ResNetEncoder(), config, slide_ids=PatchCache(cache_dir).slide_ids()[:1]
    )
    with pytest.raises(ValueError, match="extracted with other settings.*another --out folder"):
        extract_features(cache_dir, tmp_path, ResNetEncoder("resnet50"), config)


def test_cli_errors_are_one_clear_line(synth_cache: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    _, cache_dir = synth_cache
    base = ["extract", "--cache", str(cache_dir), "--out", str(tmp_path)]
    assert main([*base, "--encoder", "timm:resnet51x"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main([*base, "--encoder", "resnet18"]) == 2  # two magnifications cached: which one?
    assert "choose one with --magnification" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_encoder_of_an_end_to_end_run_is_rebuilt_from_its_checkpoint(tmp_path: Path) -> None:
    from e2e_wsi.features.extract import encoder_from_spec

    torch.manual_seed(7)
    trained = ResNetEncoder("resnet18", weights="none")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    node = {
        "class_path": "e2e_wsi.models.encoders.ResNetEncoder",
        "init_args": {"arch": "resnet18", "weights": "imagenet"},
    }
    (run / "config.yaml").write_text(
        json.dumps({"model": {"encoder": node}, "data": {"eval_patch_size": 96}})
    )
    state = {f"encoder.{k}": v for k, v in trained.state_dict().items()} | {"head.w": torch.zeros(1)}
    torch.save({"state_dict": state}, run / "checkpoints" / "last.ckpt")
    encoder, size = encoder_from_spec(
        str(run / "checkpoints" / "last.ckpt")
    )  # never fetches ImageNet weights
    assert size == 96 and not any(p.requires_grad for p in encoder.parameters())
    assert encoder.describe()["state_sha256"] == trained.describe()["state_sha256"]
