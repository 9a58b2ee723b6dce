"""A small timm model with random weights trains end to end and frozen; inputs use its own statistics."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from e2e_wsi.cli import main
from e2e_wsi.data.transforms import normalize_images
from e2e_wsi.models.encoders import TimmEncoder
from e2e_wsi.models.module import SlideModule


def test_slide_module_normalises_with_the_encoders_statistics() -> None:
    torch.manual_seed(0)
    encoder = TimmEncoder("test_resnet")  # mean = std = 0.5, unlike ImageNet
    module = SlideModule(encoder=encoder).eval()
    images = torch.randint(0, 256, (1, 3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        got = module.encode(images[0])
        expected = encoder(normalize_images(images[0], (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        imagenet = encoder(normalize_images(images[0]))
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, imagenet)


def _encoder_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("encoder.") and v.is_floating_point()}


@pytest.mark.slow  # two real (tiny) end-to-end trainings
@pytest.mark.parametrize("freeze", [False, True])
def test_timm_encoder_trains_end_to_end_and_frozen(
    synth_cache: tuple[Path, Path], tiny_args: Callable[..., list[str]], tmp_path: Path, freeze: bool
) -> None:
    manifest, cache = synth_cache
    run = tmp_path / "run"
    encoder = json.dumps(
        {
            "class_path": "e2e_wsi.models.encoders.TimmEncoder",
            "init_args": {"model_name": "test_resnet", "freeze": freeze},
        }
    )
    args = tiny_args(manifest, cache, run, "--model.encoder", encoder, "--trainer.max_epochs", "1")
    torch.manual_seed(0)
    initial = {f"encoder.{k}": v for k, v in TimmEncoder("test_resnet").state_dict().items()}
    assert main(args) == 0
    trained = _encoder_weights(run)
    changed = [k for k, v in trained.items() if not torch.equal(v, initial[k])]
    if freeze:
        assert not changed  # frozen: weights and BatchNorm statistics untouched
    else:
        assert any(k.endswith("weight") and "conv" in k for k in changed)  # fine-tuned end to end
