"""The ``e2e-wsi`` command line.

Each verb lives in the module that owns its feature and is imported only when that verb runs, so
``e2e-wsi --help`` stays fast and no argument parsing happens at import time. A verb's entry point is
a function ``(argv: list[str]) -> int`` returning the process exit status.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# verb -> ("module:function", one-line help). Order is the order shown in --help.
VERBS: dict[str, tuple[str, str]] = {
    "synth": (
        "e2e_wsi.synth.cli:main",
        "write a synthetic cohort of pyramidal slides with known lesions",
    ),
    "preprocess": (
        "e2e_wsi.cache.preprocess:main",
        "detect tissue, tile at several magnifications, cache patches in LMDB",
    ),
    "cache": ("e2e_wsi.cache.cli:main", "inspect a patch cache (`cache info CACHE_DIR`)"),
    "extract": (
        "e2e_wsi.features.cli:main",
        "encode cached patches once into per-slide HDF5 features (two-stage paradigm)",
    ),
    "fit": ("e2e_wsi.training.cli:fit_main", "train encoder + aggregator + head end to end (LightningCLI)"),
    "validate": ("e2e_wsi.training.cli:validate_main", "evaluate a checkpoint on the validation split"),
    "test": ("e2e_wsi.training.cli:test_main", "evaluate on the test split with a bootstrap report"),
    "predict": ("e2e_wsi.training.cli:predict_main", "write per-slide predictions and attention"),
    "evaluate": (
        "e2e_wsi.evaluation.cli:main",
        "bootstrap report from a saved predictions.csv, or compare two runs",
    ),
    "heatmap": ("e2e_wsi.viz.cli:main", "attention heatmap of a slide from a checkpoint"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [
        "usage: e2e-wsi VERB [options]",
        "",
        "End-to-end learning on whole-slide images (ResNet encoder + ABMILX aggregator).",
        "",
        "verbs:",
    ]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "Run `e2e-wsi VERB --help` for the options of one verb."]
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> int:
    """Run the CLI in-process.

    Args:
        args: Arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status (0 on success). The console script passes it to ``sys.exit``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from e2e_wsi import __version__

        print(f"e2e-wsi {__version__}")
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"e2e-wsi: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = VERBS[verb][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
