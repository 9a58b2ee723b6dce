"""ABMILX-specific behaviour: SDPA vs naive A+, MHLA-only ablation, heads, attention rows."""

from __future__ import annotations

import pytest
import torch

from e2e_wsi.models.aggregators import ABMILX


def make(seed: int = 0, **kwargs) -> ABMILX:
    torch.manual_seed(seed)
    defaults = {"in_dim": 24, "inner_dim": 32, "heads": 4}
    return ABMILX(**{**defaults, **kwargs}).eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 40, 24, generator=gen)
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[0, 25:] = False
    mask[2, ::3] = False
    return x, mask


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_sdpa_path_equals_naive_path(use_mask: bool, heads: int) -> None:
    model = make(heads=heads, alpha_init=1.5)
    x, mask = padded_batch()
    mask = mask if use_mask else None
    x_fast = x.clone().requires_grad_(True)
    x_naive = x.clone().requires_grad_(True)
    slide, attention = model(x_fast, mask)
    slide_n, attention_n = model.forward_naive(x_naive, mask)
    torch.testing.assert_close(slide, slide_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention, attention_n, atol=1e-5, rtol=0)
    weights = torch.randn_like(slide)
    (slide * weights).sum().backward()
    (slide_n * weights).sum().backward()
    torch.testing.assert_close(x_fast.grad, x_naive.grad, atol=1e-5, rtol=1e-4)


def test_attention_plus_changes_the_attention() -> None:
    # Guards the SDPA-vs-naive test against a propagation term that is silently zero.
    x, mask = padded_batch(1)
    with torch.no_grad():
        _, with_plus = make(alpha_init=1.0)(x, mask)
        _, without = make(alpha_init=0.0)(x, mask)
    assert (with_plus - without).abs().max() > 1e-3


def test_mhla_only_is_alpha_free_attention() -> None:
    x, mask = padded_batch(2)
    full = make(alpha_init=0.0)
    mhla = make(attn_plus=False)
    missing, unexpected = mhla.load_state_dict(full.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"alpha", "plus_norm.weight", "plus_norm.bias", "qk.weight"}
    assert mhla.alpha is None and not any("qk" in n for n, _ in mhla.named_parameters())
    with torch.no_grad():
        slide_full, attention_full = full(x, mask)
        slide_mhla, attention_mhla = mhla(x, mask)
        # Literal MHLA: the shared MLP's logits per head, masked softmax over instances.
        logits = mhla.local_logits(mhla.split_heads(x, mask)).masked_fill(~mask[:, None, :], float("-inf"))
        expected = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(attention_mhla, attention_full)
    torch.testing.assert_close(slide_mhla, slide_full)
    torch.testing.assert_close(attention_mhla, expected)


def test_attention_rows_sum_to_one_over_valid_instances() -> None:
    x, mask = padded_batch(3)
    with torch.no_grad():
        _, attention = make()(x, mask)
    assert attention.shape == (3, 4, 40)
    torch.testing.assert_close((attention * mask[:, None, :]).sum(-1), torch.ones(3, 4))
    assert (attention[~mask.unsqueeze(1).expand_as(attention)] == 0).all()


def test_alpha_is_learned_and_initialised_as_configured() -> None:
    model = make(alpha_init=0.5).train()
    assert model.alpha.item() == 0.5
    slide, _ = model(torch.randn(2, 16, 24))
    (slide * torch.randn_like(slide)).sum().backward()
    assert model.alpha.grad is not None and model.alpha.grad.abs() > 0


def test_heads_must_divide_inner_dim() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ABMILX(in_dim=8, inner_dim=30, heads=4)


def test_large_bag_runs_with_sdpa() -> None:
    # 4096 instances: the naive path would build 8 x 4096 x 4096 floats (512 MB); SDPA stays O(N).
    model = make(in_dim=16, inner_dim=64, heads=8).train()
    slide, attention = model(torch.randn(1, 4096, 16))
    (slide * torch.randn_like(slide)).sum().backward()
    assert attention.shape == (1, 8, 4096) and torch.isfinite(model.qk.weight.grad).all()
