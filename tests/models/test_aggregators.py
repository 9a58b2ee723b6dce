"""Contract tests run over every aggregator (as timm loops over every model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from e2e_wsi.models import aggregators
from e2e_wsi.models.aggregators import ABMIL, ABMILX
from e2e_wsi.models.encoders import ResNetEncoder

IN_DIM = 12

# Small sizes keep each case in milliseconds; an aggregator missing here runs with its defaults.
SMALL: dict[str, dict] = {
    "abmilx": {"inner_dim": 32, "heads": 4},
    "abmil": {"inner_dim": 32, "attn_dim": 16},
    "transmil": {"dim": 32, "heads": 4},
    "dsmil": {"inner_dim": 32, "num_critical": 2, "query_dim": 16},
}
# Options worth their own case, on top of one case per registered aggregator.
VARIANTS: dict[str, tuple[str, dict]] = {
    "abmilx_heads1": ("abmilx", {"inner_dim": 16, "heads": 1}),
    "abmilx_mhla_only": ("abmilx", {"inner_dim": 32, "heads": 4, "attn_plus": False}),
    "abmilx_ffn_bias": ("abmilx", {"inner_dim": 32, "heads": 4, "ffn": True, "attn_bias": True}),
    "abmilx_ffn_prenorm": ("abmilx", {"inner_dim": 32, "heads": 4, "ffn": True, "ffn_variant": "prenorm"}),
    "abmilx_mil_bias": ("abmilx", {"inner_dim": 32, "heads": 4, "mil_bias": True}),
    "abmil_gated": ("abmil", {"inner_dim": 32, "attn_dim": 16, "gated": True, "attn_bias": True}),
    "abmil_no_norm": ("abmil", {"inner_dim": 32, "attn_dim": 16, "output_norm": False}),
    "meanpool_proj": ("meanpool", {"proj_dim": 16}),
    "maxpool_proj": ("maxpool", {"proj_dim": 16}),
}
CASES: dict[str, tuple[str, dict]] = {
    **{name: (name, SMALL.get(name, {})) for name in aggregators.list_aggregators()},
    **VARIANTS,
}
NAMES = sorted(CASES)
# PPEG lays the tokens on a 2-D grid and convolves them, so instance order changes the output.
ORDER_DEPENDENT = {"transmil": "TransMIL's PPEG positional convolution depends on instance order"}
# The bias of the last attention-logit layer shifts every logit of a bag equally, and the instance
# softmax is shift-invariant: its gradient is exactly zero by construction (numerically, rounding noise).
SHIFT_INVARIANT = {"attn_w.bias", "attention.2.bias"}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    registered, kwargs = CASES[name]
    return aggregators.create_aggregator(registered, in_dim=IN_DIM, **kwargs)


def test_every_exported_aggregator_is_registered() -> None:
    exported = [getattr(aggregators, n) for n in aggregators.__all__]
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, nn.Module)}
    assert classes == set(aggregators.AGGREGATORS.values())
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        aggregators.create_aggregator("nope", in_dim=IN_DIM)


def expected_heads(model: nn.Module) -> int:
    return model.heads if isinstance(model, ABMILX) else 1


def scalar_objective(slide: torch.Tensor, seed: int = 1) -> torch.Tensor:
    # A random projection: sum(slide**2) would be nearly constant after a LayerNorm.
    gen = torch.Generator().manual_seed(seed)
    return (slide * torch.randn(slide.shape, generator=gen)).sum()


@pytest.mark.parametrize("name", NAMES)
def test_shapes_finite_and_normalised(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 9, IN_DIM)
    slide, attention = model(x)
    assert slide.shape == (2, model.out_dim)
    assert attention.shape == (2, expected_heads(model), 9)
    assert torch.isfinite(slide).all() and torch.isfinite(attention).all()
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, expected_heads(model)))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name: str) -> None:
    model = build(name).train()
    x = torch.randn(2, 10, IN_DIM, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    slide, _ = model(x, mask)
    scalar_objective(slide).backward()
    assert x.grad[mask].abs().sum(-1).gt(0).any(), f"{name}: no gradient reached the instances"
    assert (x.grad[~mask] == 0).all(), f"{name}: padded instances received a gradient"
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}.{pname} has a non-finite gradient"
        if pname in SHIFT_INVARIANT:
            assert param.grad.abs().max() < 1e-5, f"{name}.{pname}: a softmax shift got a real gradient"
            continue
        assert param.grad.abs().sum() > 0, f"{name}.{pname} got an all-zero gradient"


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_the_encoder(name: str) -> None:
    torch.manual_seed(0)
    encoder = ResNetEncoder("resnet18", weights="none")
    model = build(name)
    to_in = nn.Linear(encoder.out_dim, IN_DIM, bias=False)  # keeps the aggregators' test width
    patches = torch.randn(5, 3, 32, 32)
    feats = to_in(encoder(patches)).unsqueeze(0)  # [1, 5, IN_DIM]
    slide, _ = model(feats)
    scalar_objective(slide).backward()
    for pname in ("conv1.weight", "layer3.1.conv2.weight"):
        grad = encoder.get_parameter(pname).grad
        assert grad is not None and grad.abs().sum() > 0, (
            f"no gradient reached encoder.{pname} through {name}"
        )


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariance(name: str) -> None:
    if name in ORDER_DEPENDENT:
        pytest.skip(ORDER_DEPENDENT[name])
    model = build(name).eval()
    x = torch.randn(2, 11, IN_DIM)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        slide, attention = model(x)
        slide_p, attention_p = model(x[:, perm])
    torch.testing.assert_close(slide_p, slide, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_p, attention[:, :, perm], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padding_with_junk_changes_nothing(name: str) -> None:
    model = build(name).eval()
    gen = torch.Generator().manual_seed(5)
    bags = [torch.randn(7, IN_DIM, generator=gen), torch.randn(7, IN_DIM, generator=gen)]
    # Padding interleaved (bag 0) and trailing (bag 1), filled with large junk.
    valid_at = [torch.tensor([0, 2, 3, 5, 8, 9, 10]), torch.arange(7)]
    x = 100.0 * torch.randn(2, 11, IN_DIM, generator=gen)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    for b in range(2):
        x[b, valid_at[b]] = bags[b]
        mask[b, valid_at[b]] = True
    with torch.no_grad():
        slide, attention = model(x, mask)
        for b in range(2):
            ref_slide, ref_attention = model(bags[b].unsqueeze(0))
            torch.testing.assert_close(slide[b], ref_slide[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attention[b][:, valid_at[b]], ref_attention[0], atol=1e-6, rtol=1e-5)
    assert (attention.masked_select(~mask.unsqueeze(1)) == 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, expected_heads(model)))


@pytest.mark.parametrize("name", ["abmilx", "abmil", "transmil", "dsmil", "meanpool", "maxpool"])
def test_bad_masks_are_rejected(name: str) -> None:
    model = build(name)
    x = torch.randn(2, 4, IN_DIM)
    with pytest.raises(ValueError, match="no valid instance"):
        model(x, torch.tensor([[True, False, False, False], [False, False, False, False]]))
    with pytest.raises(ValueError, match="bool"):
        model(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="does not match"):
        model(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        model(torch.randn(4, IN_DIM))


def test_abmil_output_norm_by_hand_and_old_checkpoints() -> None:
    torch.manual_seed(0)
    model = ABMIL(in_dim=IN_DIM, inner_dim=32, attn_dim=16).eval()
    raw = ABMIL(in_dim=IN_DIM, inner_dim=32, attn_dim=16, output_norm=False).eval()
    raw.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("norm_out")})
    x = torch.randn(2, 9, IN_DIM)
    pooled, _ = raw(x)
    expected = (pooled - pooled.mean(-1, keepdim=True)) / torch.sqrt(
        pooled.var(-1, unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(model(x)[0], expected * model.norm_out.weight)
    assert "norm_out.bias" not in model.state_dict()  # bias-free, as the official baseline
    with pytest.raises(RuntimeError, match="output_norm: false"):
        ABMIL(in_dim=IN_DIM, inner_dim=32, attn_dim=16).load_state_dict(raw.state_dict())
