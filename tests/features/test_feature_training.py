"""MIL on features through the real CLI: fit, test, predict; CLAM folders; refusals of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch

from e2e_wsi.cli import main
from e2e_wsi.features.store import FeatureFolder
from e2e_wsi.runs import load_run
from tests.helpers.features import TINY_FEATURE_FIT, TWO_STAGE_CONFIG, extract_random_resnet


@pytest.fixture(scope="module")
def features(synth_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-18 (random init, 256-d) features of the 8 synthetic slides at 5x."""
    return extract_random_resnet(synth_cache[1], tmp_path_factory.mktemp("feat") / "r18", seed=0)


@pytest.fixture(scope="module")
def other_features(synth_cache: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same slides encoded by another encoder (other random weights)."""
    return extract_random_resnet(synth_cache[1], tmp_path_factory.mktemp("feat") / "other", seed=1)


def fit_args(manifest: Path, features: Path, run: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(TWO_STAGE_CONFIG), "--data.manifest", str(manifest), "--data.features_dir",
            str(features), "--run_dir", str(run), *TINY_FEATURE_FIT, *extra]  # fmt: skip


def test_fit_test_predict_on_features(
    synth_cache: tuple[Path, Path], features: Path, other_features: Path, tmp_path: Path
) -> None:
    manifest, _ = synth_cache
    run = tmp_path / "run"
    assert main(fit_args(manifest, features, run)) == 0
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (
        state["state_dict"]["aggregator.stem.0.weight"].shape[1] == 256
    )  # width follows the features (no input LayerNorm in two-stage)
    loaded = load_run(ckpt)
    model, data = loaded.model, loaded.data  # outside a Trainer the width comes from the weights
    assert model.encoder.out_dim == 256 and data["features_dir"] == str(features)
    assert (
        main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt), "--bootstrap", "50"])
        == 0
    )
    preds = pd.read_csv(run / "predictions.csv")
    assert list(preds.columns[:3]) == ["case_id", "slide_id", "label"] and (run / "metrics.json").is_file()
    assert set(preds["slide_id"]) == set(pd.read_csv(run / "splits.csv").query("split == 'test'")["slide_id"])
    assert main(["predict", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt)]) == 0
    slide = FeatureFolder(features).slide_ids()[0]
    att = pd.read_csv(run / "predict" / "attention" / f"{slide}.csv")
    _, coords = FeatureFolder(features).read(slide)
    assert (att[["x", "y"]].to_numpy() == coords).all()  # attention sits on the feature coordinates
    assert len(att) == len(coords) and (att["magnification"] == 5.0).all()
    # Another encoder's features: refused, and the message says how they differ.
    with pytest.raises(ValueError, match="made differently.*state_sha256"):
        main(["--debug", "test", "--config", str(run / "config.yaml"), "--ckpt_path", str(ckpt),
              "--data.features_dir", str(other_features)])  # fmt: skip


def test_clam_folder_and_csv_train_with_a_warning(
    synth_cache: tuple[Path, Path], features: Path, tmp_path: Path
) -> None:
    manifest, _ = synth_cache
    clam = tmp_path / "h5_files"
    clam.mkdir()
    for path in features.glob("*.h5"):  # what CLAM writes: features + coords, no provenance of ours
        with h5py.File(path) as src, h5py.File(clam / path.name, "w") as dst:
            dst["features"], dst["coords"] = src["features"][()], src["coords"][()]
    csv = tmp_path / "clam.csv"
    pd.read_csv(manifest)[["case_id", "slide_id", "label"]].to_csv(csv, index=False)
    with pytest.warns(UserWarning, match="no e2e-wsi provenance"):
        assert main(fit_args(csv, clam, tmp_path / "run")) == 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_mixed_folder_is_refused(
    synth_cache: tuple[Path, Path], features: Path, other_features: Path, tmp_path: Path
) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(features, mixed)
    odd = sorted(other_features.glob("*.h5"))[2]
    shutil.copy(odd, mixed / odd.name)
    with pytest.raises(ValueError, match=rf"(?s)mixes features.*'{odd.stem}' differ.*encoder.state_sha256"):
        main(["--debug", *fit_args(synth_cache[0], mixed, tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_features_are_listed_at_once(
    synth_cache: tuple[Path, Path], features: Path, tmp_path: Path
) -> None:
    part = tmp_path / "part"
    shutil.copytree(features, part)
    gone = sorted(part.glob("*.h5"))[:2]
    for path in gone:
        path.unlink()
    with pytest.raises(ValueError, match=r"2 manifest slide\(s\) have no features") as info:
        main(["--debug", *fit_args(synth_cache[0], part, tmp_path / "run")])
    assert all(p.stem in str(info.value) for p in gone)


def test_feature_width_mismatching_the_config(
    synth_cache: tuple[Path, Path], features: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="are 256-d but the model expects 1024-d"):
        main(
            [
                "--debug",
                *fit_args(
                    synth_cache[0], features, tmp_path / "run", "--model.encoder.init_args.dim", "1024"
                ),
            ]
        )


def test_old_patch_configs_still_pick_the_patch_datamodule(tmp_path: Path) -> None:
    from e2e_wsi.data.datamodule import WSIDataModule
    from e2e_wsi.features.datamodule import FeatureDataModule
    from e2e_wsi.training.cli import _datamodule_class

    demo = TWO_STAGE_CONFIG.parent / "demo_subtype.yaml"
    assert _datamodule_class(["fit", "--config", str(demo)]) is WSIDataModule
    assert _datamodule_class(["fit", "--config", str(TWO_STAGE_CONFIG)]) is FeatureDataModule
    assert _datamodule_class(["fit", "--config", str(demo), "--data.features_dir", "x"]) is FeatureDataModule
