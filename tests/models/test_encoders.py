"""Truncated ResNet encoder: dims, weight loading, freezing, BatchNorm modes, checkpointing."""

from __future__ import annotations

from pathlib import Path

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


def test_missing_imagenet_weights_name_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert imagenet_weights_path("resnet18") == expected
    with pytest.raises(FileNotFoundError) as info:
        ResNetEncoder("resnet18", weights="imagenet")
    assert str(expected) in str(info.value) and imagenet_weights_url("resnet18") in str(info.value)


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
