"""Patch encoders beyond the truncated ResNet: any timm model, and precomputed features.

``TimmEncoder`` wraps ``timm.create_model(name, num_classes=0)`` (pooled features), so every timm
architecture and every hub id (``hf-hub:MahmoodLab/UNI``, ``hf-hub:prov-gigapath/prov-gigapath``,
``hf-hub:bioptimus/H-optimus-0`` ...) is one YAML line. Its normalisation and input size come from the
model's ``pretrained_cfg`` (``timm.data.resolve_data_config``), so the data follows the encoder.

``PrecomputedFeatures`` is the "encoder" of the two-stage paradigm: the bag already holds features.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from e2e_wsi.errors import UserError
from e2e_wsi.models.registry import register_encoder
from e2e_wsi.runs.checkpoints import load_torch_file, state_dict_of
from e2e_wsi.utils import sha256_file

_HUB_HELP = (
    "To use it: (1) request access on the model's Hugging Face page if it is gated, (2) log in with "
    "`huggingface-cli login` (or set HF_TOKEN) on a machine with network access so the weights land in "
    "the Hugging Face cache (HF_HOME), or (3) download the weights file yourself and pass "
    "`weights_path: /path/to/file` (works offline)."
)


def state_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, shapes, dtypes, values): identifies the exact weights.

    Unlike a weights file hash this also tells a fine-tuned encoder from its initial weights.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _check_model_name(model_name: str) -> None:
    """Unknown architecture -> ValueError with close names (hub ids are checked by the hub)."""
    import timm

    if model_name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return
    arch = model_name.split(".", 1)[0]  # "vit_base_patch16_224.augreg_in21k" -> architecture
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"timm does not know the model {model_name!r}{hint} (list them with `timm.list_models('*pattern*')`; "
        "hub models are written 'hf-hub:org/name')"
    )


def _load_weights_file(model: nn.Module, path: Path) -> None:
    """Load a local state dict (``.safetensors`` or tensor-only ``torch.save`` file) into ``model``."""
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_torch_file(path)  # weights_only=True: unsafe files are refused
    state = state_dict_of(state)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    # Classifier weights of the original model are not part of a num_classes=0 feature extractor.
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("head.", "fc.", "classifier."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]} "
            "(is it the checkpoint of this architecture, without a 'module.'-style prefix?)"
        )
    model.load_state_dict(state, strict=True)


class HubAccessError(UserError, RuntimeError):
    """A hub model that cannot be loaded (no access, offline); the message says what to do."""


def _create(model_name: str, pretrained: bool, model_kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(model_name, pretrained=pretrained, num_classes=0, **model_kwargs)
    except Exception as err:
        if model_name.startswith("hf-hub:") or _is_hub_error(err):
            raise HubAccessError(
                f"could not load {model_name!r} from the Hugging Face hub "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). {_HUB_HELP}"
            ) from err
        raise


def _is_hub_error(err: Exception) -> bool:
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - old huggingface_hub
        return False
    return isinstance(err, HfHubHTTPError | LocalEntryNotFoundError | OSError)


@register_encoder("timm", arg="model_name")
@register_encoder("hf-hub", arg="model_name", keep_prefix=True)
class TimmEncoder(nn.Module):
    """Any timm model as a patch encoder: [N, 3, H, W] -> pooled features [N, num_features].

    Args:
        model_name: timm name (``resnet50``, ``vit_large_patch16_224``) or hub id (``hf-hub:MahmoodLab/UNI``).
        pretrained: Load the model's pretrained weights through timm (hub cache, standard HF token).
        weights_path: Local state dict (``.safetensors`` or ``torch.save``); works offline and wins over
            ``pretrained``.
        freeze: No gradients and always eval mode (dropout/BatchNorm fixed): a fixed feature extractor.
        model_kwargs: Extra ``timm.create_model`` arguments (e.g. ``{init_values: 1e-5,
            dynamic_img_size: true}`` for UNI).

    Raises:
        ValueError: Unknown model name (close names suggested), unreadable or mismatching weights file.
        RuntimeError: Hub model not reachable (gated, no token, offline) - the message says what to do.
    """

    @staticmethod
    def weights_kwargs(weights: str | None, spec: str = "") -> dict[str, object]:
        """Constructor arguments of ``e2e-wsi extract --weights``: ``pretrained`` (timm's weights; the
        default for ``hf-hub:`` ids), ``none``, or a local weights file."""
        pretrained = weights == "pretrained" or (weights is None and spec.startswith("hf-hub:"))
        path = weights if weights not in (None, "pretrained", "none") else None
        return {"pretrained": pretrained, "weights_path": path}

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        weights_path: str | None = None,
        freeze: bool = False,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        import timm

        _check_model_name(model_name)
        kwargs = dict(model_kwargs or {})
        self.model = _create(model_name, pretrained and weights_path is None, kwargs)
        self._file_sha256: str | None = None
        if weights_path is not None:
            _load_weights_file(self.model, Path(weights_path))
            self._file_sha256 = sha256_file(weights_path)
        config = timm.data.resolve_data_config({}, model=self.model)
        self.model_name = model_name
        self.pretrained = bool(pretrained or weights_path)
        self.out_dim = int(self.model.num_features)
        self.input_size = int(config["input_size"][-1])
        self.mean = tuple(float(v) for v in config["mean"])
        self.std = tuple(float(v) for v in config["std"])
        self.frozen = freeze
        if freeze:
            self.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> TimmEncoder:
        """A frozen encoder stays in eval mode so it is a fixed function."""
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float patches [N, 3, H, W] -> features [N, out_dim]."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder input must be [N, 3, H, W] float patches, got shape {tuple(x.shape)}")
        return self.model(x)

    def describe(self) -> dict[str, object]:
        """What makes these features what they are (stored as feature provenance)."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "name": self.model_name,
            "weights": "file" if self._file_sha256 else ("pretrained" if self.pretrained else "none"),
            "weights_file_sha256": self._file_sha256,
            "state_sha256": state_sha256(self.model),
            "out_dim": self.out_dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


class PrecomputedFeatures(nn.Module):
    """The two-stage "encoder": bags already hold features, so this only checks their width.

    Args:
        dim: Feature width D. ``None`` (the default in configs): taken from the feature folder when the
            trainer sets up (:class:`~e2e_wsi.features.datamodule.FeatureDataModule`), so the aggregator's
            input width follows the features.
    """

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        if dim is not None and dim < 1:
            raise ValueError(f"PrecomputedFeatures: dim must be positive, got {dim}")
        self.out_dim = dim
        self.frozen = True
        # The width travels in the state dict, so a lazily built model can be rebuilt from weights alone.
        self.register_buffer("width", torch.tensor(dim or 0, dtype=torch.int64))

    def set_dim(self, dim: int) -> None:
        """Fix the width once the features are known (``SlideModule.configure_model``)."""
        self.out_dim = int(dim)
        self.width.fill_(int(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features [N, D] -> the same features as float32 (checked against ``out_dim``)."""
        if x.dim() != 2:
            raise ValueError(
                f"PrecomputedFeatures expects feature rows [N, D], got shape {tuple(x.shape)}: "
                "a feature model needs a feature datamodule (data.features_dir), not patch images"
            )
        if self.out_dim is not None and x.shape[1] != self.out_dim:
            raise ValueError(
                f"features are {x.shape[1]}-d but this model was built for {self.out_dim}-d features: "
                "they were made by another encoder than the one the model was trained on"
            )
        return x.float()
