"""The ``e2e-wsi`` command line.

Each verb lives in the module that owns its feature and is imported only when that verb runs, so
``e2e-wsi --help`` stays fast and no argument parsing happens at import time. A verb's entry point is
a function ``(argv: list[str]) -> int`` returning the process exit status.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from e2e_wsi.errors import UserError

# Exceptions that mean "the input is wrong" (a bad manifest, a task mismatch, a missing file): the
# message says what to fix, so the user gets it without a traceback unless they ask with --debug.
# Verbs raise these and never catch them (UserError is the project's own; SlideError, CacheLockedError,
# UnsafeCheckpointError ... subclass it).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, FileNotFoundError, NotADirectoryError)
# Lightning's configuration error, matched by name so `e2e-wsi --help` does not import Lightning.
_USER_ERROR_NAMES = {"MisconfigurationException"}
DEBUG_ENV = "E2E_WSI_DEBUG"

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
    "predict": (
        "e2e_wsi.inference.cli:main",
        "run a trained model (or an ensemble) on new slide files: predictions, heatmaps, GeoJSON",
    ),
    "export": (
        "e2e_wsi.export.cli:main",
        "write a trained run as an ONNX or TorchScript model with model.json (for other runtimes)",
    ),
    "crossval": (
        "e2e_wsi.training.crossval_cli:main",
        "k-fold patient-level cross-validation with pooled out-of-fold predictions",
    ),
    "evaluate": (
        "e2e_wsi.evaluation.cli:main",
        "bootstrap report from a saved predictions.csv, or compare two runs",
    ),
    "heatmap": ("e2e_wsi.inference.heatmap_cli:main", "attention heatmap of a slide from a checkpoint"),
    "convert": ("e2e_wsi.training.convert_cli:main", "turn an official E2E-WSI-ABMILX checkpoint into ours"),
}


def _usage() -> str:
    width = max(len(v) for v in VERBS)
    lines = [
        "usage: e2e-wsi VERB [options]",
        "       e2e-wsi --debug VERB [options]",
        "",
        "End-to-end learning on whole-slide images (ResNet encoder + ABMILX aggregator).",
        "",
        "--debug  show the full traceback of input errors (they otherwise print one message, exit 2)",
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
        The exit status: 0 on success, 2 on an input error (bad manifest, task mismatch, missing or
        refused checkpoint, ...), whose message goes to stderr; ``--debug`` (before the verb) or
        ``E2E_WSI_DEBUG=1`` re-raises it with its traceback instead. The console script passes the status
        to ``sys.exit``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    while argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
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
    try:
        result = func(rest)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(f"e2e-wsi {verb}: error: {err}", file=sys.stderr)
        print("(run `e2e-wsi --debug ...` for the traceback)", file=sys.stderr, flush=True)
        return 2
    return int(result or 0)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` reports bad input (message only, exit 2) rather than a bug (traceback)."""
    return isinstance(err, USER_ERRORS) or any(t.__name__ in _USER_ERROR_NAMES for t in type(err).__mro__)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
