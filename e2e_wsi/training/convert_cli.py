"""``e2e-wsi convert``: thin command line over :mod:`e2e_wsi.models.convert`.

It lives with training because it reads a checkpoint safely (:mod:`e2e_wsi.runs.checkpoints`) and
writes a Lightning one; the conversion itself (key mapping) stays with the models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from e2e_wsi.cli_common import ArgumentParser
from e2e_wsi.errors import UserError
from e2e_wsi.models import convert
from e2e_wsi.models.convert import (
    OFFICIAL_INPUT_CONTRACT,
    convert_state_dict,
    official_weights,
    with_ema_copy,
)
from e2e_wsi.models.module import INPUT_CONTRACT_KEY
from e2e_wsi.runs.checkpoints import checkpoint_payload, load_torch_file

_EPILOG = """\
Which official file gives which numbers (DearCaat/E2E-WSI-ABMILX, main.py):
  fold_k_ema_model_best.pt   'teacher' only: the EMA weights of the epoch with the best EMA validation
                             metric (main.py:393-406). The official EMA test numbers come from this
                             file (main.py:437-452): convert it (--weights auto or teacher).
  fold_k_model_best.pt       'model' = the live weights of the epoch with the best live validation
                             metric, 'teacher' = the EMA weights of that same epoch (main.py:375-390).
                             The official live test numbers come from 'model' (--weights model);
                             --weights auto picks its 'teacher', which is NOT the official EMA result.
The converted checkpoint records what the official weights need (BGR channels, whole 256 -> 224
resize at evaluation), so `e2e-wsi test|predict --ckpt_path OUT` feeds them like the official pipeline;
its EMA keys are fitted to the config at load time (the --ema flag is no longer needed)."""


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi convert`` command line."""
    p = ArgumentParser(prog="e2e-wsi convert", description=convert.__doc__.split("\n\n")[0], epilog=_EPILOG)
    p.add_argument("official", help="official checkpoint (e.g. fold_0_model_best.pt) or state dict file")
    p.add_argument("out", help="where to write the converted checkpoint (.ckpt)")
    p.add_argument(
        "--weights", default="auto", choices=["auto", "model", "teacher"], help="live or EMA weights"
    )
    p.add_argument(
        "--ema",
        action="store_true",
        help="also fill ema.* keys now (default: off; loading fits them to the config anyway)",
    )
    p.add_argument(
        "--channel_order",
        default=str(OFFICIAL_INPUT_CONTRACT["channel_order"]),
        choices=["bgr", "rgb"],
        help="channel order the weights were trained on (default: bgr, the official TurboJPEG decode)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """``e2e-wsi convert``: official checkpoint -> a checkpoint ``e2e-wsi test|predict|heatmap`` can load.

    Raises:
        UserError: The file cannot be read safely or holds no official weights (names the file).
    """
    args = build_parser().parse_args(argv)

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
    payload = checkpoint_payload(
        state,
        converted_from=str(Path(args.official).resolve()),
        **{INPUT_CONTRACT_KEY: {**OFFICIAL_INPUT_CONTRACT, "channel_order": args.channel_order}},
    )
    torch.save(payload, tmp)
    tmp.replace(out)  # never leave a half-written checkpoint
    print(f"e2e-wsi convert: wrote {out} ({len(state)} tensors)")
    return 0
