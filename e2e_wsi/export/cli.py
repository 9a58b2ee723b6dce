"""``e2e-wsi export``: a trained run as an ONNX or TorchScript model plus ``model.json``.

Thin command line over :func:`e2e_wsi.export.exporter.export_run`; :data:`DESCRIPTION` is its help.
"""

from __future__ import annotations

from pathlib import Path

from e2e_wsi.cli_common import ArgumentParser

DESCRIPTION = """\
Export a trained run as an ONNX or TorchScript model plus model.json.

  e2e-wsi export --run RUN --format onnx --out DIR          # DIR/model.onnx + DIR/model.json
  e2e-wsi export --run RUN --format torchscript --out DIR   # DIR/model.pt + DIR/model.json
  e2e-wsi predict --onnx DIR --slides new/ --out OUT        # run it on raw slides, no Lightning

The graph takes one bag of uint8 RGB patches [N, 3, S, S] (N dynamic; S and the resize in model.json)
and returns the prediction (probs [1, K], risk [1] or pred [1]) and the attention [1, H, N]. The export
is checked against PyTorch on bags of 1, 7 and 33 patches and refused if any output differs by more
than 1e-4.
"""


def build_parser() -> ArgumentParser:
    """The ``e2e-wsi export`` command line."""
    from e2e_wsi.export.graph import FORMATS

    p = ArgumentParser(prog="e2e-wsi export", description=DESCRIPTION)
    p.add_argument("--run", default=None, help="run folder of `fit` (its best checkpoint); default: none")
    p.add_argument(
        "--ckpt_path",
        default=None,
        help="checkpoint file instead of (or, with --run, a name inside RUN/checkpoints); default: none",
    )
    p.add_argument("--format", choices=FORMATS, default="onnx", help="model file format (default: onnx)")
    p.add_argument("--out", required=True, help="output folder for the model file and model.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``e2e-wsi export``: 0 when the verified model is written; bad input raises a user
    error (the dispatcher prints it, exit 2)."""
    args = build_parser().parse_args(argv)
    from e2e_wsi.errors import UserError
    from e2e_wsi.export.exporter import export_run
    from e2e_wsi.runs.resolve import resolve_checkpoints

    ckpts = resolve_checkpoints(args.run, [args.ckpt_path] if args.ckpt_path else None)
    if len(ckpts) > 1:
        raise UserError(
            f"{args.run} is a cross-validation folder ({len(ckpts)} folds): export one fold, e.g. "
            f"--run {Path(args.run) / 'fold_0'}"
        )
    card = export_run(ckpts[0], args.format, args.out)
    print(f"e2e-wsi export: {args.format} model and {card.name} in {card.parent.resolve()}")
    return 0
