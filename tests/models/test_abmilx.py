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


def test_official_alpha_init_is_a_standard_normal_draw() -> None:
    # Official: alpha is a 1x1 Linear weight re-drawn by Xavier-normal, std sqrt(2 / (1 + 1)) = 1.
    from e2e_wsi.models.aggregators.abmilx import initial_alpha

    torch.manual_seed(3)
    drawn = initial_alpha("official")
    torch.manual_seed(3)
    assert drawn.shape == () and drawn.item() == torch.empty(1, 1).normal_(0.0, 1.0).item()
    values = torch.stack([make(seed=s).alpha.detach() for s in range(40)])
    assert (values < 0).any() and (values > 0).any() and 0.5 < values.std().item() < 1.5
    assert make(alpha_init=0.25).alpha.item() == 0.25
    with pytest.raises(ValueError, match="alpha_init"):
        make(alpha_init="xavier")


def test_fixed_alpha_is_a_buffer_with_the_same_state_keys() -> None:
    learn, fixed = make(seed=0), make(seed=0, alpha_init=0.0, learn_alpha=False)
    assert set(learn.state_dict()) == set(fixed.state_dict())
    assert "alpha" not in dict(fixed.named_parameters()) and fixed.alpha.item() == 0.0
    fixed.load_state_dict({**learn.state_dict(), "alpha": torch.tensor(0.0)})
    x, mask = padded_batch()
    # alpha = 0 with A+ parameters present is exactly MHLA: the local logits alone.
    mhla = make(seed=0, attn_plus=False)
    mhla.load_state_dict({k: v for k, v in fixed.state_dict().items() if k in mhla.state_dict()})
    torch.testing.assert_close(fixed(x, mask)[1], mhla(x, mask)[1])
    fixed.train()
    slide, _ = fixed(x, mask)
    slide.sum().backward()
    assert fixed.alpha.grad is None


def test_ffn_variants_parameters_and_outputs() -> None:
    official, prenorm = make(ffn=True), make(ffn=True, ffn_variant="prenorm")
    names = set(official.state_dict())
    assert {"ffn.0.bias", "ffn.2.bias"} <= names and not any(n.startswith("ffn_norm") for n in names)
    assert "ffn_norm.weight" in prenorm.state_dict() and "ffn.0.bias" not in prenorm.state_dict()
    # By hand: the official FFN is x + fc2(gelu(fc1 x)) on the projected vector, no norm before it.
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        heads = official.split_heads(x, None)
        att = torch.softmax(
            official.local_logits(heads)
            + official.alpha * official._propagate(heads, official.local_logits(heads), None),
            -1,
        )
        z = official.proj(torch.einsum("bhn,bhnd->bhd", att, heads).reshape(2, 32))
        fc1, fc2 = official.ffn[0], official.ffn[2]
        z = z + fc2(torch.nn.functional.gelu(fc1(z)))
        torch.testing.assert_close(official(x)[0], official.norm_out(z))
    with pytest.raises(ValueError, match="ffn_variant"):
        make(ffn=True, ffn_variant="postnorm")


def test_old_prenorm_ffn_checkpoint_says_which_option_loads_it() -> None:
    old = make(ffn=True, ffn_variant="prenorm").state_dict()
    with pytest.raises(RuntimeError, match="ffn_variant: prenorm"):
        make(ffn=True).load_state_dict(old)
    make(ffn=True, ffn_variant="prenorm").load_state_dict(old)  # the named option loads it


def test_mil_bias_adds_biases_only_where_the_official_mil_bias_does() -> None:
    plain, biased = make(), make(mil_bias=True)
    extra = set(biased.state_dict()) - set(plain.state_dict())
    assert extra == {"stem.0.bias", "stem.1.bias", "proj.bias", "norm_out.bias"}


def test_two_stage_stem_has_no_layernorm_and_keeps_the_projection() -> None:
    """input_norm/output_norm off = the official module without mil_norm (no LN in, no norm1 out)."""
    model = make(input_norm=False, output_norm=False, mil_bias=True).eval()
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.stem)
    x = torch.randn(2, 9, 24)
    slide, attention = model(x)
    heads = model.split_heads(x, None)
    pooled = torch.einsum("bhn,bhnd->bhd", attention, heads).reshape(2, -1)
    torch.testing.assert_close(slide, model.proj(pooled))  # no LayerNorm on the slide vector
    # The E2E default keeps both LayerNorms, so the comparison above can tell them apart.
    e2e = make().eval()
    assert isinstance(e2e.stem[0], torch.nn.LayerNorm) and isinstance(e2e.norm_out, torch.nn.LayerNorm)


def test_weight_init_torch_keeps_pytorch_scale_and_xavier_redraws() -> None:
    """'torch' keeps nn.Linear's uniform(+-1/sqrt(fan_in)); 'xavier' re-draws N(0, 2/(fan_in+fan_out))."""
    torch.manual_seed(0)
    linear = ABMILX(in_dim=1024, inner_dim=512, heads=1, weight_init="torch").stem[1]
    torch.manual_seed(0)
    xavier = ABMILX(in_dim=1024, inner_dim=512, heads=1, weight_init="xavier").stem[1]
    bound = 1 / 1024**0.5
    assert linear.weight.abs().max() <= bound
    assert linear.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
    assert xavier.weight.std().item() == pytest.approx((2 / (1024 + 512)) ** 0.5, rel=0.02)
    with pytest.raises(ValueError, match="weight_init"):
        ABMILX(in_dim=8, weight_init="kaiming")
