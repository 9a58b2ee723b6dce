"""A converted official checkpoint predicts like the official pipeline (issue 18), through `e2e-wsi test`.

The official evaluation is rebuilt here from its definition (DearCaat/E2E-WSI-ABMILX):

* patches: the cached JPEG decoded in BGR channel order (TurboJPEG ``TJPF_BGR``,
  ``datasets/data_utils.py:227-278``, used by ``datasets/dataset_img.py:149``);
* geometry: the whole 256 px patch resized to 224 px with antialiasing (``CLAM/save_patches.py:50-53``
  writes the 224 px test LMDB; the evaluation loader adds no crop, ``datasets/dataloader.py:102-103``);
* normalisation: ``(x - 255 * mean) / (255 * std)`` with the ImageNet mean/std in RGB order applied to
  the BGR channels (``datasets/data_utils.py:171-174,199-203``);
* every patch of the main magnification (``datasets/dataloader.py:79``, the test LMDB is the main scale);
* encoder: the timm ResNet-18 to ``layer3`` + global average pool (``modules/encoders.py``), run here
  with torchvision's ResNet-18 modules on the same weights; aggregator: the official ``DAttentionX``
  equations written out in :mod:`tests.helpers.official`.

A random official-format state dict is saved as an official ``fold_0_ema_model_best.pt`` (``teacher``
only), converted with ``e2e-wsi convert`` and tested with the shipped ``configs/brca_subtype.yaml``
and no extra model flags. P(class 1) must agree within 0.01 per slide; the self-checks show that RGB
input or a centre crop moves it by more than that, so the comparison discriminates.
"""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torchvision.transforms.v2 import functional as TF

from e2e_wsi.cache.store import PatchCache
from e2e_wsi.cli import main as cli
from e2e_wsi.models.encoders import ResNetEncoder
from tests.helpers.official import MAIN, official_abmilx_forward, official_abmilx_state, textured_tile
from tests.helpers.official import write_textured_cache as _write_cache

ROOT = Path(__file__).resolve().parents[2]
EVAL = 224
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


def _official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """An official E2E state dict (``encoder.model.*`` timm ResNet-18 to layer3, ``mil.*`` DAttentionX)."""
    torch.manual_seed(seed)
    encoder = ResNetEncoder("resnet18", weights="none", channels_last=False)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in encoder.state_dict().items():
        if name.endswith("running_mean"):  # eval-mode BatchNorm with non-trivial statistics
            tensor = torch.randn(tensor.shape, generator=g) * 0.1
        elif name.endswith("running_var"):
            tensor = 0.5 + torch.rand(tensor.shape, generator=g)
        state[f"encoder.model.{name}"] = tensor
    # Subtyping recipe: 256-d features, inner 256, 8 heads, no attention bias, no FFN, 2 classes.
    mil = official_abmilx_state(
        8, attn_bias=False, ffn=False, seed=seed, dim=256, inner=256, classes=2, scale=0.1
    )
    state = {**state, **mil}
    state["mil.classifier.weight"] = _mid_range_classifier(state, g)
    return state


@torch.no_grad()
def _mid_range_classifier(state: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """A random 2-class classifier orthogonal to the mean slide vector of random bags.

    A random ResNet's slide vectors share a large common part; a classifier blind to it keeps
    P(class 1) mid-range, where it moves with the input (which the self-checks need).
    """
    probe = dict(state, **{"mil.classifier.weight": torch.eye(256)})  # logits = slide vectors
    rng = np.random.default_rng(99)
    bags = [
        torch.stack([torch.from_numpy(textured_tile(rng)).permute(2, 0, 1) for _ in range(4)])
        for _ in range(4)
    ]
    mean = torch.stack([_official_logits(probe, b.flip(1)) for b in bags]).mean(0)
    d = torch.randn(256, generator=g)
    d = d - (d @ mean) / (mean @ mean) * mean
    return torch.stack([-d / 2, d / 2])


def _official_encoder(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    net = torchvision.models.resnet18(weights=None)
    own = {k[len("encoder.model.") :]: v for k, v in state.items() if k.startswith("encoder.model.")}
    net.load_state_dict(own, strict=False)  # layer4 / fc stay unused
    return net.eval()


@torch.no_grad()
def _official_logits(
    state: dict[str, torch.Tensor], imgs: torch.Tensor, centre_crop: bool = False
) -> torch.Tensor:
    """Official evaluation of one bag of uint8 patches [N, 3, 256, 256] in the channel order given -> [K]."""
    if centre_crop:
        imgs = TF.center_crop(imgs, [EVAL, EVAL])
    else:
        imgs = TF.resize(imgs, [EVAL, EVAL], antialias=True)
    x = (imgs.float() - MEAN) / STD
    net = _official_encoder(state)
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    feats = net.layer3(net.layer2(net.layer1(x))).mean(dim=(-2, -1))  # [N, 256]
    return official_abmilx_forward(state, feats[None], heads=8)[0]


def _official_prob(
    state: dict[str, torch.Tensor], jpegs: list[bytes], bgr: bool = True, centre_crop: bool = False
) -> float:
    """P(class 1) of one slide by the official evaluation; ``bgr``/``centre_crop`` perturb it for the self-checks."""
    imgs = torch.stack([torch.from_numpy(imagecodecs.jpeg8_decode(b)).permute(2, 0, 1) for b in jpegs])
    if bgr:
        imgs = imgs.flip(1)  # RGB -> BGR, as TurboJPEG TJPF_BGR decodes it
    return float(_official_logits(state, imgs, centre_crop).softmax(-1)[1])


@pytest.mark.slow
def test_converted_official_checkpoint_predicts_like_the_official_pipeline(tmp_path: Path) -> None:
    ids = _write_cache(tmp_path / "cache")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "case_id,slide_id,label\n" + "".join(f"c{s},{s},{i % 2}\n" for i, s in enumerate(ids))
    )
    state = _official_state()
    official = tmp_path / "fold_0_ema_model_best.pt"
    torch.save({"teacher": state, "epoch": 7}, official)  # the file the official EMA numbers come from
    converted = tmp_path / "converted.ckpt"
    assert cli(["convert", str(official), str(converted)]) == 0

    run = tmp_path / "run"
    code = cli([
        "test", "--config", str(ROOT / "configs" / "brca_subtype.yaml"), "--run_dir", str(run),
        "--data.manifest", str(manifest), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.num_workers", "0", "--data.persistent_workers", "false", "--trainer.accelerator", "cpu",
        "--model.encoder.init_args.weights", "none", "--ckpt_path", str(converted), "--bootstrap", "10",
    ])  # fmt: skip
    assert code in (0, None)
    preds = pd.read_csv(run / "predictions.csv").set_index("slide_id")
    assert len(preds) >= 2

    cache = PatchCache(tmp_path / "cache")
    gaps, rgb_moves, crop_moves = [], [], []
    for slide_id, row in preds.iterrows():
        jpegs = [cache.get_bytes(slide_id, MAIN, i) for i in range(cache.count(slide_id, MAIN))]
        expected = _official_prob(state, jpegs)
        gaps.append(abs(row["prob_1"] - expected))
        rgb_moves.append(abs(_official_prob(state, jpegs, bgr=False) - expected))
        crop_moves.append(abs(_official_prob(state, jpegs, centre_crop=True) - expected))
    assert max(gaps) < 0.01, f"|ours - official| per slide: {gaps}"
    # Self-checks: the comparison would catch RGB input or a centre crop.
    assert max(rgb_moves) > 0.01, rgb_moves
    assert max(crop_moves) > 0.01, crop_moves
