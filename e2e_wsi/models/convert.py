"""Load checkpoints of the authors' code (DearCaat/E2E-WSI-ABMILX) into this package's modules.

The official E2E model (``modules/e2e.py``) holds ``encoder`` (a timm ResNet wrapped as ``encoder.model``)
and ``mil`` (``DAttentionX`` in ``modules/abmilx.py`` or ``DAttention`` in ``modules/abmil.py``, whose
``classifier`` is the task head). Its training script saves ``{"model": state, "teacher": EMA state,
"epoch": n}``; the EMA state carries one more ``module.`` prefix, DDP another. The name map, official ->
ours:

=================================  ==========================================  =======================
official                            ours                                        note
=================================  ==========================================  =======================
``encoder.model.X``                 ``encoder.X``                               timm ResNet to layer3
``mil.feature.0`` (LayerNorm)       ``aggregator.stem.0``                        MIL input LayerNorm
``mil.feature.1`` (Linear)          ``aggregator.stem.1``
``mil.attention.fc1`` / ``fc2``     ``aggregator.attention.0`` / ``.2``          ABMILX local MLP
``mil.attn_plus_fn.norm_x``         ``aggregator.plus_norm``                     A+ LayerNorm
``mil.attn_plus_fn.qk``             ``aggregator.qk``                            A+ query/key
``mil.attn_plus_fn.v`` [1, 1]       ``aggregator.alpha`` []                      alpha (1x1 weight)
``mil.proj``                        ``aggregator.proj``
``mil.mlp.fc1`` / ``fc2``           ``aggregator.ffn.0`` / ``.2``                ``ffn_variant: official``
``mil.norm1``                       ``aggregator.norm_out``                      output LayerNorm
``mil.attention.0`` / ``.2``        ``aggregator.attn_v.0`` / ``attn_w``         ABMIL (``DAttention``)
``mil.classifier``                  ``head.fc``                                  bias-free by default
=================================  ==========================================  =======================

Python: ``state = convert_state_dict(torch.load(path, weights_only=True))`` then
``SlideModule(...).load_state_dict(state)``; or ``e2e-wsi convert`` (see :func:`main`) writes a checkpoint
that ``e2e-wsi test|predict|heatmap --ckpt_path`` accept with a config whose model matches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (official pattern, our replacement); the first match wins. Patterns see names without the
# ``module.`` (DDP / EMA) prefixes.
_RULES: list[tuple[str, str]] = [
    (r"^encoder\.model\.(.+)$", r"encoder.\1"),
    (r"^mil\.feature\.([01])\.(weight|bias)$", r"aggregator.stem.\1.\2"),
    (r"^mil\.attention\.fc1\.(weight|bias)$", r"aggregator.attention.0.\1"),
    (r"^mil\.attention\.fc2\.(weight|bias)$", r"aggregator.attention.2.\1"),
    (r"^mil\.attention\.0\.(weight|bias)$", r"aggregator.attn_v.0.\1"),
    (r"^mil\.attention\.2\.(weight|bias)$", r"aggregator.attn_w.\1"),
    (r"^mil\.attn_plus_fn\.norm_x\.(weight|bias)$", r"aggregator.plus_norm.\1"),
    (r"^mil\.attn_plus_fn\.qk\.weight$", r"aggregator.qk.weight"),
    (r"^mil\.attn_plus_fn\.v\.weight$", r"aggregator.alpha"),
    (r"^mil\.proj\.(weight|bias)$", r"aggregator.proj.\1"),
    (r"^mil\.mlp\.fc1\.(weight|bias)$", r"aggregator.ffn.0.\1"),
    (r"^mil\.mlp\.fc2\.(weight|bias)$", r"aggregator.ffn.2.\1"),
    (r"^mil\.norm1\.(weight|bias)$", r"aggregator.norm_out.\1"),
    (r"^mil\.classifier\.(weight|bias)$", r"head.fc.\1"),
    (r"^mil\.classifier\.0\.(weight|bias)$", r"head.fc.\1"),  # gated ABMIL wraps it in a Sequential
]


def official_weights(checkpoint: Mapping, which: str = "auto") -> dict[str, torch.Tensor]:
    """Pick the state dict inside an official checkpoint file.

    Args:
        checkpoint: What ``torch.load`` returned: ``{"model", "teacher", "epoch"}`` or a bare state dict.
        which: ``"model"`` (the live weights), ``"teacher"`` (the EMA weights) or ``"auto"`` (teacher
            when present, else model). Which epoch: ``fold_k_model_best.pt`` is saved when the *live*
            model's validation metric improves and holds the live weights and the EMA weights of that
            epoch (main.py:375-390); ``fold_k_ema_model_best.pt`` holds only ``teacher``, saved when the
            EMA model's metric improves (main.py:393-406). The official EMA test numbers come from the
            latter (main.py:437-452), its live numbers from the former's ``model`` (main.py:434-443).

    Returns:
        The chosen state dict (names still official).

    Raises:
        ValueError: If the requested weights are not in the file.
    """
    if which not in ("auto", "model", "teacher"):
        raise ValueError(f"which must be auto, model or teacher, got {which!r}")
    if not any(k in checkpoint for k in ("model", "teacher")):
        if which == "teacher":
            raise ValueError("this file is a bare state dict: it has no EMA ('teacher') weights")
        return dict(checkpoint)
    if which == "auto":
        which = "teacher" if checkpoint.get("teacher") is not None else "model"
    if checkpoint.get(which) is None:
        raise ValueError(f"the checkpoint has no {which!r} weights (keys: {sorted(checkpoint)})")
    return dict(checkpoint[which])


# Wrapper prefixes in front of the official names: DDP / EMA ``module.`` and torch.compile's
# ``_orig_mod.`` (the official code compiles with ``--torchcompile``, main.py:227-228,258-259, and
# strips that prefix itself only in one place, main.py:250-251).
_WRAPPERS = ("module.", "_orig_mod.")

# What the official pipeline feeds its weights, written into converted checkpoints
# (SlideModule.input_contract): BGR channels (TurboJPEG decode, datasets/data_utils.py:227-278, used
# by datasets/dataset_img.py:149,277; normalised with the RGB-ordered ImageNet mean/std and never
# swapped back, datasets/data_utils.py:171-174,199-203) and whole patches resized to 224 px at
# evaluation (CLAM/save_patches.py:50-53; datasets/dataloader.py:59,79,102-103).
OFFICIAL_INPUT_CONTRACT: dict[str, object] = {"channel_order": "bgr", "eval_resize": True}


def _strip_wrappers(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPERS:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name


def convert_state_dict(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official E2E state dict to :class:`~e2e_wsi.models.module.SlideModule` names.

    Args:
        official: ``{name: tensor}`` with official names (``encoder.model.*``, ``mil.*``), optionally
            behind ``module.`` prefixes; a whole checkpoint file is accepted too (see
            :func:`official_weights`).

    Returns:
        ``{name: tensor}`` with our names; alpha becomes a 0-d tensor.

    Raises:
        ValueError: Listing every official key that has no counterpart here, by name, e.g. a
            ``mil.norm_ffn`` LayerNorm (the official FFN pre-norm, only present when the MIL input
            LayerNorm is off, a setting no paper config uses).
    """
    if any(k in official for k in ("model", "teacher")):
        official = official_weights(official)
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    for raw, tensor in official.items():
        name = _strip_wrappers(raw)
        for pattern, repl in _RULES:
            if re.match(pattern, name):
                out[re.sub(pattern, repl, name)] = tensor
                break
        else:
            unmatched.append(raw)
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} official key(s) have no counterpart in e2e_wsi: {', '.join(sorted(unmatched))}. "
            "Only the official ResNet encoder, DAttentionX (ABMILX) and DAttention (ABMIL) with "
            "mil_norm=ln are mapped (see e2e_wsi/models/convert.py)"
        )
    if "aggregator.alpha" in out:
        out["aggregator.alpha"] = out["aggregator.alpha"].reshape(())
    return out


def with_ema_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the ``ema.*`` keys a ``SlideModule(ema_decay=...)`` expects, holding the same weights."""
    out = dict(state)
    parts = {"encoder.": "ema.module.0.", "aggregator.": "ema.module.1.", "head.": "ema.module.2."}
    for name, tensor in state.items():
        for prefix, ema_prefix in parts.items():
            if name.startswith(prefix):
                out[ema_prefix + name[len(prefix) :]] = tensor.clone()
    out["ema.n_averaged"] = torch.tensor(1, dtype=torch.long)
    return out


def load_official(module: torch.nn.Module, official: Mapping, strict: bool = True) -> None:
    """Convert and load official weights into a built model, naming every key that does not fit.

    Args:
        module: A :class:`~e2e_wsi.models.module.SlideModule` whose config matches the official run.
        official: An official checkpoint file's content or state dict.
        strict: Require every key of ``module`` to be provided.

    Raises:
        ValueError: Unmapped official keys, or (``strict``) keys ``module`` expects that the converted
            dict lacks, or keys it has that ``module`` does not, each listed by name.
    """
    state = convert_state_dict(official)
    if any(k.startswith("ema.") for k in module.state_dict()):
        state = with_ema_copy(state)
    result = module.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(
            "the converted official weights do not fit this model: "
            f"missing {sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)}. "
            "Match the config to the official run (heads, inner_dim, ffn, attn_bias, head_bias, ...)"
        )
