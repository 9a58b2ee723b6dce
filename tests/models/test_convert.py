"""Official E2E-WSI-ABMILX weights -> our modules give the official outputs (issue 11, item 4).

State dicts are built with the OFFICIAL parameter names and shapes (``modules/abmilx.py`` class
``DAttentionX``, ``modules/abmil.py`` class ``DAttention``, ``modules/vit_mil.py`` class ``Mlp``, with the
paper settings ``mil_norm=ln``, ``no_mil_bias``), converted with :mod:`e2e_wsi.models.convert`, loaded,
and compared with a small re-computation of the official forward written out here with plain tensor
operations (no code shared with the modules under test).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from e2e_wsi.cli import main as cli
from e2e_wsi.models.aggregators import ABMIL, ABMILX
from e2e_wsi.models.convert import convert_state_dict, load_official, official_weights
from e2e_wsi.models.heads import ClassificationHead
from tests.helpers.official import CLASSES, INNER, D, official_abmilx_forward, official_abmilx_state
from tests.helpers.official import ln as _ln

N = 7


class MilAndHead(torch.nn.Module):
    """aggregator + head under the names SlideModule uses, without an encoder."""

    def __init__(self, aggregator: torch.nn.Module) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.head = ClassificationHead(aggregator.out_dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.aggregator(x)[0])


# The aggregator settings of the paper configs: subtyping/diagnosis, survival (attention bias), PANDA.
PAPER_VARIANTS = {
    "subtype": {"heads": 8, "attn_bias": False, "ffn": False},
    "survival": {"heads": 8, "attn_bias": True, "ffn": False},
    "panda": {"heads": 4, "attn_bias": False, "ffn": True},
}


@pytest.mark.parametrize("variant", sorted(PAPER_VARIANTS))
def test_converted_abmilx_matches_the_official_equations(variant: str) -> None:
    cfg = PAPER_VARIANTS[variant]
    official = official_abmilx_state(**cfg)
    model = MilAndHead(ABMILX(D, inner_dim=INNER, **cfg)).eval()
    load_official(model, official)
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, naive = model(x), model.head(model.aggregator.forward_naive(x)[0])
    expected = official_abmilx_forward(official, x, cfg["heads"])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(naive, expected, atol=1e-5, rtol=1e-5)
    assert model.aggregator.alpha.item() == pytest.approx(-0.7)


def test_converted_abmil_matches_the_official_equations() -> None:
    g = torch.Generator().manual_seed(2)
    official = {
        "mil.feature.0.weight": 1 + 0.1 * torch.randn(D, generator=g),
        "mil.feature.1.weight": 0.5 * torch.randn(INNER, D, generator=g),
        "mil.attention.0.weight": 0.5 * torch.randn(128, INNER, generator=g),
        "mil.attention.2.weight": 0.5 * torch.randn(1, 128, generator=g),
        "mil.norm1.weight": 1 + 0.1 * torch.randn(INNER, generator=g),
        "mil.classifier.weight": 0.5 * torch.randn(CLASSES, INNER, generator=g),
    }
    model = MilAndHead(ABMIL(D, inner_dim=INNER, attn_dim=128)).eval()
    load_official(model, official)
    x = torch.randn(2, N, D, generator=g)
    h = F.gelu(_ln(x, official["mil.feature.0.weight"]) @ official["mil.feature.1.weight"].T)
    a = torch.tanh(h @ official["mil.attention.0.weight"].T) @ official["mil.attention.2.weight"].T
    z = (torch.softmax(a.transpose(-1, -2), -1) @ h).squeeze(1)
    expected = _ln(z, official["mil.norm1.weight"]) @ official["mil.classifier.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_layout_prefixes_and_encoder_names() -> None:
    official = {f"module.{k}": v for k, v in official_abmilx_state(8, False, False).items()}
    official["module.encoder.model.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    ckpt = {"model": official, "teacher": {"module." + k: v + 1 for k, v in official.items()}, "epoch": 3}
    live = convert_state_dict(official_weights(ckpt, "model"))
    ema = convert_state_dict(ckpt)  # auto: the EMA ("teacher") weights, as the official test reports
    assert live["encoder.conv1.weight"].shape == (64, 3, 7, 7)
    assert live["aggregator.alpha"].shape == ()
    assert "head.fc.weight" in live and not any(k.startswith(("mil.", "module.")) for k in live)
    torch.testing.assert_close(ema["aggregator.proj.weight"], live["aggregator.proj.weight"] + 1)


def test_unmatched_keys_are_reported_by_name() -> None:
    official = official_abmilx_state(8, False, False)
    official["mil.norm_ffn.weight"] = torch.ones(INNER)
    official["mil.something_new.weight"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"mil\.norm_ffn\.weight, mil\.something_new\.weight"):
        convert_state_dict(official)


def test_config_mismatch_names_missing_and_unexpected_keys() -> None:
    official = official_abmilx_state(8, False, ffn=True)
    model = MilAndHead(ABMILX(D, inner_dim=INNER, heads=8))  # config without the FFN
    with pytest.raises(ValueError, match=r"unexpected \['aggregator\.ffn\.0\.bias'"):
        load_official(model, official)


def test_cli_writes_a_loadable_checkpoint(tmp_path) -> None:
    official = official_abmilx_state(8, False, False)
    src, dst = tmp_path / "fold_0_model_best.pt", tmp_path / "converted.ckpt"
    torch.save({"model": official, "teacher": None, "epoch": 1}, src)
    assert cli(["convert", str(src), str(dst)]) == 0
    state = torch.load(dst, weights_only=True)["state_dict"]
    model = MilAndHead(ABMILX(D, inner_dim=INNER, heads=8))
    model.load_state_dict(state)  # strict: every key fits
    torch.save({"model": {**official, "mil.bogus.weight": torch.ones(1)}}, src)
    assert cli(["convert", str(src), str(tmp_path / "bad.ckpt")]) == 2
    assert not (tmp_path / "bad.ckpt").exists()


def test_torch_compile_prefix_is_stripped() -> None:
    official = {f"_orig_mod.module.{k}": v for k, v in official_abmilx_state(8, False, False).items()}
    converted = convert_state_dict({"model": official, "teacher": None, "epoch": 0})
    assert "aggregator.alpha" in converted and not any("_orig_mod" in k for k in converted)


def test_converted_checkpoint_records_the_official_input(tmp_path) -> None:
    src, dst = tmp_path / "fold_0_ema_model_best.pt", tmp_path / "converted.ckpt"
    torch.save({"teacher": official_abmilx_state(8, False, False), "epoch": 1}, src)
    assert cli(["convert", str(src), str(dst)]) == 0
    saved = torch.load(dst, weights_only=True)
    assert saved["e2e_wsi_input"] == {"channel_order": "bgr", "eval_resize": True}
