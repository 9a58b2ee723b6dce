"""Truncated ResNet patch encoders (last stage removed, as in the paper's appendix B.3).

ResNet-18 and ResNet-50 keep ``conv1 .. layer3`` and global-average-pool the ``layer3`` map, giving
256 and 1024 features per patch. Parameter names match torchvision's, so torchvision checkpoints and
our own encoder's state dicts load directly.

Every encoder exposes ``out_dim``, ``input_size`` (the patch side it was trained at) and ``mean``/``std``
(its normalisation, RGB in [0, 1] units), and ``describe()`` for feature provenance. The encoder itself
expects float patches [N, 3, H, W] already normalised with its own ``mean``/``std``
(:func:`e2e_wsi.images.normalize_images` does it on the device); it does no normalisation itself.

:class:`TimmEncoder` (any timm model, including ``hf-hub:`` foundation models) and
:class:`PrecomputedFeatures` (the two-stage input: features already extracted) live in
:mod:`e2e_wsi.models.timm_encoder`; they are re-exported here so configs name one module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from e2e_wsi.images import ChannelOrder, check_channel_order
from e2e_wsi.models.registry import register_encoder
from e2e_wsi.models.timm_encoder import state_sha256
from e2e_wsi.runs.checkpoints import load_torch_file, state_dict_of
from e2e_wsi.utils import sha256_file

_ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 256),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 1024),
}
_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3")
_MAX_LISTED = 8


def imagenet_weights_url(arch: str) -> str:
    """URL of torchvision's ImageNet-1k (V1) checkpoint for ``arch``."""
    return _ARCHS[_check_arch(arch)][1].url


def imagenet_weights_path(arch: str) -> Path:
    """Where the ImageNet checkpoint is looked for: ``torch.hub.get_dir()/checkpoints/<file name>``.

    This is the file torchvision itself would cache (``$TORCH_HOME/hub/checkpoints``).
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_weights_url(arch).rsplit("/", 1)[-1]


def _check_arch(arch: str) -> str:
    if arch not in _ARCHS:
        raise ValueError(f"unknown encoder arch {arch!r}; choose one of {sorted(_ARCHS)}")
    return arch


def _download_imagenet(arch: str, path: Path) -> None:
    """Fetch torchvision's checkpoint into torch's standard cache, as torchvision itself would.

    ``download_url_to_file`` writes a temp file and renames it, and checks the hash prefix that
    torchvision puts in the file name, so an interrupted download never leaves a bad file behind.
    """
    url = imagenet_weights_url(arch)
    hash_prefix = path.stem.rsplit("-", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix, progress=True)
    except Exception as err:  # URLError, HTTPError, OSError, RuntimeError (hash) ...
        raise FileNotFoundError(
            f"ImageNet weights for {arch} are not in torch's cache ({path}) and downloading "
            f"{url} failed ({type(err).__name__}: {err}). Offline: download that file elsewhere and "
            f"save it as {path} (or point TORCH_HOME at a directory whose hub/checkpoints/ holds it), "
            "or use weights='none' / a path to a state dict."
        ) from err


def _weights_file(weights: str, arch: str) -> Path:
    if weights == "imagenet":
        path = imagenet_weights_path(arch)
        if not path.is_file():
            _download_imagenet(arch, path)
        return path
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights file {path} does not exist; weights must be 'none', 'imagenet' "
            "or the path of a state dict saved with torch.save(model.state_dict(), path)"
        )
    return path


def load_resnet_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a ResNet state dict for the truncated encoder from ``path``.

    Accepts a plain state dict, a dict with a ``state_dict`` entry (e.g. a Lightning checkpoint saved
    tensor-only), and keys under any prefix (``module.``, ``encoder.`` ...): the prefix is found from
    the stem convolution (a ``conv1.weight`` of shape [64, 3, 7, 7]). ``layer4`` and ``fc`` entries are
    dropped because the encoder has no last stage.

    Args:
        path: File written by ``torch.save``; read by :func:`e2e_wsi.runs.checkpoints.load_torch_file`.

    Returns:
        Mapping from torchvision parameter/buffer names to tensors.

    Raises:
        ValueError: If the file cannot be read tensor-only or holds no ResNet stem.
    """
    obj = state_dict_of(load_torch_file(path))  # weights_only=True: unsafe files are refused
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    stems = [k for k, v in tensors.items() if k.endswith("conv1.weight") and tuple(v.shape[1:]) == (3, 7, 7)]
    if not stems:
        raise ValueError(
            f"{path} has no ResNet stem ('conv1.weight' of shape [64, 3, 7, 7]); is it a ResNet state dict?"
        )
    prefix = min(stems, key=len)[: -len("conv1.weight")]
    stripped = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in stripped.items() if not k.startswith(("layer4.", "fc."))}


def _listed(keys: list[str]) -> str:
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


@register_encoder("resnet18", arch="resnet18")
@register_encoder("resnet50", arch="resnet50")
class ResNetEncoder(nn.Module):
    """ResNet-18/50 up to ``layer3`` + global average pooling: [N, 3, H, W] -> [N, D].

    Args:
        arch: ``resnet18`` (D = 256) or ``resnet50`` (D = 1024).
        weights: ``none`` (random init), ``imagenet`` (torchvision's file in torch's hub cache, see
            :func:`imagenet_weights_path`; downloaded there once when missing and online) or a path to
            a state dict.
        freeze: Set ``requires_grad=False`` on every parameter. A frozen encoder also keeps BatchNorm
            in eval mode, so it is a fixed function.
        bn_eval: Keep BatchNorm layers in eval mode (running statistics used and not updated) even
            when the module is in train mode.
        checkpoint_chunk: When set and gradients are needed, the forward runs in chunks of this many
            patches under activation checkpointing (``use_reentrant=False``), so activations of only
            one chunk live at a time. In train-mode BatchNorm each chunk is normalised with its own
            statistics, and the recomputation in backward does not update the running statistics a
            second time.
            The chunks are the BatchNorm groups of training: set it to the official group (the
            patches one official encoder call normalises together) to get the official statistics.
            Patches arrive bag by bag and, within a bag, scale by scale, so a chunk smaller than a bag
            holds one scale only (see ``mix_chunks``).
        mix_chunks: With ``checkpoint_chunk``, shuffle the patches of the batch before chunking (and
            restore the order after), so every BatchNorm group mixes scales and bags in the batch's
            proportions. Off by default: the paper configs' chunks hold whole bags, as official.
        channels_last: Store weights and inputs in channels-last memory format (faster convolutions).
        channel_order: The channel order the weights expect: ``rgb`` (torchvision's ImageNet weights,
            our training) or ``bgr`` (weights trained by the official code, which feeds BGR patches
            normalised with the RGB-ordered ImageNet statistics). :meth:`SlideModule.encode
            <e2e_wsi.models.module.SlideModule.encode>` reverses the channels for ``bgr``.
        eval_resize: The model must be evaluated on whole patches resized to ``input_size`` (the
            official evaluation), whatever ``data.eval_crop_fraction`` says. ``e2e-wsi convert`` sets
            it (and ``channel_order: bgr``) in the checkpoints it writes; checkpoints carry both.

    Raises:
        ValueError: Unknown arch, unreadable or mismatching state dict.
        FileNotFoundError: ``imagenet`` file absent and not downloadable, or a weights path that does
            not exist.
    """

    # ImageNet statistics: torchvision's ResNets were trained with them (and random init does not care).
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_size: int = 224

    @staticmethod
    def weights_kwargs(weights: str | None, spec: str = "") -> dict[str, object]:
        """Constructor arguments of ``e2e-wsi extract --weights``: ``none`` (default), ``imagenet`` or a file."""
        return {"weights": weights or "none"}

    def __init__(
        self,
        arch: Literal["resnet18", "resnet50"] = "resnet18",
        weights: str = "none",
        freeze: bool = False,
        bn_eval: bool = False,
        checkpoint_chunk: int | None = None,
        channels_last: bool = True,
        channel_order: ChannelOrder = "rgb",
        eval_resize: bool = False,
        mix_chunks: bool = False,
    ) -> None:
        super().__init__()
        self.mix_chunks = bool(mix_chunks)
        self.channel_order = check_channel_order(channel_order)
        self.eval_resize = bool(eval_resize)
        builder, _, out_dim = _ARCHS[_check_arch(arch)]
        if checkpoint_chunk is not None and checkpoint_chunk <= 0:
            raise ValueError(
                f"checkpoint_chunk must be a positive number of patches or None, got {checkpoint_chunk}"
            )
        net = builder(weights=None)
        for name in _STAGES:
            setattr(self, name, getattr(net, name))
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.arch = arch
        self.out_dim = out_dim
        self.checkpoint_chunk = checkpoint_chunk
        self.channels_last = channels_last
        self.bn_eval = bn_eval or freeze
        self.frozen = freeze
        self.weights = weights
        self._weights_sha256: str | None = None
        if weights != "none":
            path = _weights_file(weights, arch)
            self._load(path)
            self._weights_sha256 = sha256_file(path)
        if freeze:
            self.requires_grad_(False)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self.train()

    def _load(self, path: Path) -> None:
        loaded = load_resnet_state_dict(path)
        own = self.state_dict()
        missing = sorted(set(own) - set(loaded))
        unexpected = sorted(set(loaded) - set(own))
        mismatched = sorted(k for k in set(own) & set(loaded) if own[k].shape != loaded[k].shape)
        problems = []
        if missing:
            problems.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listed(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_listed(mismatched)}")
        if problems:
            raise ValueError(
                f"{path} does not fit a truncated {self.arch} encoder ({'; '.join(problems)}); "
                "check the arch matches the checkpoint"
            )
        self.load_state_dict(loaded, strict=True)

    def describe(self) -> dict[str, object]:
        """What makes these features what they are (stored as feature provenance)."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "name": self.arch,
            "weights": self.weights if self.weights in ("none", "imagenet") else "file",
            "weights_file_sha256": self._weights_sha256,
            "state_sha256": state_sha256(self),
            "out_dim": int(self.out_dim),
            "input_size": int(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def train(self, mode: bool = True) -> ResNetEncoder:
        """Set train/eval mode; with ``bn_eval`` BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode and self.bn_eval:
            for module in self._batchnorms():
                module.eval()
        return self

    def _batchnorms(self) -> Iterator[_BatchNorm]:
        return (m for m in self.modules() if isinstance(m, _BatchNorm))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.pool(x).flatten(1)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder input must be [N, 3, H, W] float patches, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"encoder input must be float (normalised patches), got dtype {x.dtype}")
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _needs_checkpoint(self, x: torch.Tensor) -> bool:
        if self.checkpoint_chunk is None or not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode patches [N, 3, H, W] -> features [N, out_dim] (with autograd)."""
        x = self._prepare(x)
        if not self._needs_checkpoint(x):
            return self._features(x)
        order = torch.randperm(x.shape[0], device=x.device) if self.mix_chunks else None
        if order is not None:
            x = x[order]
        chunks = x.split(self.checkpoint_chunk)
        out = torch.cat(
            [
                checkpoint(self._features, chunk, use_reentrant=False, context_fn=self._checkpoint_contexts)
                for chunk in chunks
            ]
        )
        if order is None:
            return out
        restored = torch.empty_like(out)
        restored[order] = out
        return restored

    def _checkpoint_contexts(
        self,
    ) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), self._running_stats_frozen()

    @contextlib.contextmanager
    def _running_stats_frozen(self) -> Iterator[None]:
        """During recomputation, stop train-mode BatchNorm from updating its running stats twice."""
        saved = [
            (m, m.momentum, m.num_batches_tracked.clone())
            for m in self._batchnorms()
            if m.training and m.track_running_stats and m.num_batches_tracked is not None
        ]
        for m, _, _ in saved:
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        try:
            yield
        finally:
            for m, momentum, tracked in saved:
                m.momentum = momentum
                m.num_batches_tracked.copy_(tracked)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
        """Inference over many patches (10k+) in chunks without autograd.

        The current train/eval mode is used as is (call ``eval()`` first for inference). Chunks are
        moved to the encoder's device one at a time, so ``x`` may stay on the CPU.

        Args:
            x: Patches [N, 3, H, W].
            chunk_size: Patches per forward pass.

        Returns:
            Features [N, out_dim] on the encoder's device.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        device = self.conv1.weight.device
        return torch.cat([self._features(self._prepare(c.to(device))) for c in x.split(chunk_size)])


from e2e_wsi.models.timm_encoder import PrecomputedFeatures, TimmEncoder  # noqa: E402  (re-export)

__all__ = ["PrecomputedFeatures", "ResNetEncoder", "TimmEncoder", "load_resnet_state_dict"]
