"""``e2e-wsi convert``: thin command line over :mod:`e2e_wsi.models.convert`.

It lives with training because it reads a checkpoint safely (:mod:`e2e_wsi.training.checkpoints`) and
writes a Lightning one; the conversion itself (key mapping) stays with the models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from e2e_wsi.cli_common import ArgumentParser
from e2e_wsi.errors import UserError
from e2e_wsi.models import convert
from e2e_wsi.models.convert import convert_state_dict, official_weights, with_ema_copy
from e2e_wsi.training.checkpoints import load_torch_file


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi convert`` command line."""
    p = ArgumentParser(prog="e2e-wsi convert", description=convert.__doc__.split("\n\n")[0])
    p.add_argument("official", help="official checkpoint (e.g. fold_0_model_best.pt) or state dict file")
    p.add_argument("out", help="where to write the converted checkpoint (.ckpt)")
    p.add_argument(
        "--weights", default="auto", choices=["auto", "model", "teacher"], help="live or EMA weights"
    )
    p.add_argument(
        "--ema", action="store_true", help="also fill ema.* keys (for configs with model.ema_decay)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """``e2e-wsi convert``: official checkpoint -> a checkpoint ``e2e-wsi test|predict|heatmap`` can load.

    Raises:
        UserError: The file cannot be read safely or holds no official weights (names the file).
    """
    args = build_parser().parse_args(argv)
    import lightning

    try:
        raw = load_torch_file(args.official)  # weights_only=True: an unsafe file is refused, never run
        state = convert_state_dict(official_weights(raw, args.weights))
    except (ValueError, RuntimeError, OSError) as err:  # torch/state-dict errors: say which file
        raise UserError(f"{args.official}: {err}") from err
    if args.ema:
        state = with_ema_copy(state)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    payload = {
        "state_dict": state,
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
        "converted_from": str(Path(args.official).resolve()),
    }
    torch.save(payload, tmp)
    tmp.replace(out)  # never leave a half-written checkpoint
    print(f"e2e-wsi convert: wrote {out} ({len(state)} tensors)")
    return 0
