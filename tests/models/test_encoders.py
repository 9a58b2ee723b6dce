"""Truncated ResNet encoder: dims, weight loading, freezing, BatchNorm modes, checkpointing."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch.nn.modules.batchnorm import _BatchNorm

from e2e_wsi.models.encoders import ResNetEncoder, imagenet_weights_path, imagenet_weights_url


def patches(n: int = 5, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def running_means(model: torch.nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in model.modules() if isinstance(m, _BatchNorm)]


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 256), ("resnet50", 1024)])
def test_output_dim(arch: str, dim: int) -> None:
    encoder = ResNetEncoder(arch, weights="none")
    assert encoder.out_dim == dim
    assert not hasattr(encoder, "layer4") and not hasattr(encoder, "fc")
    out = encoder(patches(2))
    assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_missing_imagenet_weights_offline_name_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == expected

    def offline(url: str, dst: str, **kwargs) -> None:  # what urllib raises without a network
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError) as info:
        ResNetEncoder("resnet18", weights="imagenet")
    text = str(info.value)
    assert str(expected) in text and imagenet_weights_url("resnet18") in text and "name resolution" in text
    assert not expected.exists()


def test_missing_imagenet_weights_are_downloaded_into_torch_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    published = torchvision.models.resnet18(weights=None)
    calls = []

    def fake_server(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, dst, hash_prefix))  # the file a test writes stands in for torchvision's server
        torch.save(published.state_dict(), dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_server)
    encoder = ResNetEncoder("resnet18", weights="imagenet")
    assert calls == [(imagenet_weights_url("resnet18"), str(imagenet_weights_path("resnet18")), "f37072fd")]
    torch.testing.assert_close(encoder.conv1.weight, published.conv1.weight, rtol=0, atol=0)
    ResNetEncoder("resnet18", weights="imagenet")
    assert len(calls) == 1  # cached: fetched once


def test_imagenet_weights_load_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    target = imagenet_weights_path("resnet18")
    target.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), target)
    encoder = ResNetEncoder("resnet18", weights="imagenet")
    torch.testing.assert_close(encoder.conv1.weight, reference.conv1.weight, rtol=0, atol=0)


@pytest.mark.parametrize("prefix", ["", "module.encoder."])
def test_state_dict_path_loads_matching_weights(tmp_path: Path, prefix: str) -> None:
    torch.manual_seed(2)
    reference = torchvision.models.resnet18(weights=None)
    reference.layer3[1].bn2.running_mean.uniform_()  # a buffer that init would not reproduce
    path = tmp_path / "r18.pt"
    torch.save({prefix + k: v for k, v in reference.state_dict().items()}, path)
    encoder = ResNetEncoder("resnet18", weights=str(path))
    loaded = encoder.state_dict()
    for key, value in reference.state_dict().items():
        if key.startswith(("layer4.", "fc.")):
            assert key not in loaded
        else:
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_state_dict_of_another_arch_is_rejected_clearly(tmp_path: Path) -> None:
    path = tmp_path / "r50.pt"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match=r"r50\.pt does not fit a truncated resnet18.*unexpected keys"):
        ResNetEncoder("resnet18", weights=str(path))


def test_bad_weights_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResNetEncoder("resnet18", weights=str(tmp_path / "absent.pt"))
    junk = tmp_path / "junk.pt"
    torch.save({"weight": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match="no ResNet stem"):
        ResNetEncoder("resnet18", weights=str(junk))
    with pytest.raises(ValueError, match="unknown encoder arch"):
        ResNetEncoder("resnet34")  # type: ignore[arg-type]


def test_freeze_disables_gradients_and_fixes_batchnorm() -> None:
    encoder = ResNetEncoder("resnet18", freeze=True).train()
    assert not any(p.requires_grad for p in encoder.parameters())
    before = running_means(encoder)
    out = encoder(patches())
    assert not out.requires_grad
    for a, b in zip(before, running_means(encoder), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bn_eval", [True, False])
def test_bn_eval_keeps_running_stats(bn_eval: bool) -> None:
    encoder = ResNetEncoder("resnet18", bn_eval=bn_eval).train()
    assert encoder.training
    before = running_means(encoder)
    encoder(patches()).sum().backward()
    changed = any(not torch.equal(a, b) for a, b in zip(before, running_means(encoder), strict=True))
    assert changed is (not bn_eval)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_forward_matches_plain_forward() -> None:
    torch.manual_seed(3)
    plain = ResNetEncoder("resnet18", bn_eval=True).train()
    ckpt = ResNetEncoder("resnet18", bn_eval=True, checkpoint_chunk=2).train()
    ckpt.load_state_dict(plain.state_dict())
    x = patches(5)
    x_plain, x_ckpt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_plain, out_ckpt = plain(x_plain), ckpt(x_ckpt)
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(out_plain)
    (out_plain * weights).sum().backward()
    (out_ckpt * weights).sum().backward()
    torch.testing.assert_close(x_ckpt.grad, x_plain.grad, atol=1e-5, rtol=1e-4)
    grads_plain, grads_ckpt = _grads(plain), _grads(ckpt)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-4, rtol=1e-3, msg=name)


def test_checkpoint_with_train_batchnorm_updates_running_stats_once_per_chunk() -> None:
    torch.manual_seed(4)
    plain = ResNetEncoder("resnet18").train()
    ckpt = ResNetEncoder("resnet18", checkpoint_chunk=3).train()
    ckpt.load_state_dict(plain.state_dict())
    x = patches(6)
    # Reference: the same chunks through a plain forward, one after the other.
    reference = torch.cat([plain(chunk) for chunk in x.split(3)])
    out = ckpt(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    out.sum().backward()  # the recomputation must not move the running stats again
    for a, b in zip(running_means(plain), running_means(ckpt), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_chunked_encode_matches_forward(channels_last: bool) -> None:
    encoder = ResNetEncoder("resnet18", channels_last=channels_last).eval()
    x = patches(7)
    with torch.no_grad():
        expected = encoder(x)
    out = encoder.encode(x, chunk_size=3)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bad_input_is_rejected() -> None:
    encoder = ResNetEncoder("resnet18")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        encoder(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="float"):
        encoder(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------ timm


def test_timm_encoder_exposes_dim_and_its_own_normalisation() -> None:
    from e2e_wsi.models.encoders import TimmEncoder

    encoder = TimmEncoder("test_vit")  # a tiny timm ViT, random weights
    assert encoder.out_dim == 64 and encoder.input_size == 160
    assert encoder.mean == (0.5, 0.5, 0.5) and encoder.std == (0.5, 0.5, 0.5)  # from timm's pretrained_cfg
    out = encoder(patches(3, size=32))
    assert out.shape == (3, 64) and torch.isfinite(out).all()
    described = encoder.describe()
    assert (
        described["name"] == "test_vit"
        and described["weights"] == "none"
        and len(described["state_sha256"]) == 64
    )


def test_unknown_timm_model_suggests_close_names() -> None:
    from e2e_wsi.models.encoders import TimmEncoder

    with pytest.raises(ValueError, match=r"timm does not know the model 'resnet51x'.*did you mean.*resnet50"):
        TimmEncoder("resnet51x")


def test_timm_local_weights_file_works_offline(tmp_path: Path) -> None:
    from e2e_wsi.models.encoders import TimmEncoder

    torch.manual_seed(4)
    source = TimmEncoder("test_resnet")
    path = tmp_path / "weights.pt"
    torch.save(source.model.state_dict(), path)
    torch.manual_seed(5)
    loaded = TimmEncoder("test_resnet", weights_path=str(path))
    x = patches(2, size=32)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))
    assert (
        loaded.describe()["weights"] == "file"
        and loaded.describe()["state_sha256"] == source.describe()["state_sha256"]
    )
    with pytest.raises(ValueError, match="does not fit the model"):
        TimmEncoder("test_convnext", weights_path=str(path))


def test_hub_model_without_access_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from e2e_wsi.models.encoders import TimmEncoder

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    with pytest.raises(RuntimeError) as info:
        TimmEncoder("hf-hub:MahmoodLab/UNI", pretrained=True)
    text = str(info.value)
    assert "huggingface-cli login" in text and "request access" in text and "weights_path" in text


def test_frozen_timm_encoder_is_a_fixed_function() -> None:
    from e2e_wsi.models.encoders import TimmEncoder

    encoder = TimmEncoder("test_resnet", freeze=True)
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    x = patches(2, size=32)
    torch.testing.assert_close(encoder(x), encoder(x))  # BatchNorm uses running stats, not the batch


def test_chunk_is_the_batchnorm_group_and_mix_chunks_restores_order() -> None:
    # Train-mode BatchNorm: a chunk equal to the whole batch gives the unchunked output (one BN group);
    # a smaller chunk normalises each chunk on its own, which changes the features (issue 18, item 3).
    torch.manual_seed(5)
    plain = ResNetEncoder("resnet18").train()
    x = patches(8)
    whole = ResNetEncoder("resnet18", checkpoint_chunk=8).train()
    whole.load_state_dict(plain.state_dict())
    small = ResNetEncoder("resnet18", checkpoint_chunk=2).train()
    small.load_state_dict(plain.state_dict())
    reference = plain(x)
    torch.testing.assert_close(whole(x), reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(small(x), reference, atol=1e-3)
    # mix_chunks: each group is a random subset, and the output rows come back in the input order.
    mixed = ResNetEncoder("resnet18", checkpoint_chunk=4, mix_chunks=True).train()
    mixed.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    order = torch.randperm(8)
    torch.manual_seed(0)
    out = mixed(x)
    expected = torch.empty_like(out)
    expected[order] = torch.cat([plain(c) for c in x[order].split(4)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
