"""The classes a config from a run folder may name, checked before anything is imported or instantiated.

A run folder is something people download and share. Its ``config.yaml`` is instantiated through
jsonargparse, whose class and callable parameters accept any import path: ``model.lr_scheduler:
{class_path: subprocess.call, init_args: {args: "touch /tmp/x", shell: true}}`` would run a shell
command while the model is built. So every config that comes from a run folder (and every encoder YAML
of ``extract``) is walked first, on the plain YAML data, and refused unless each code reference in it is
on the allow-list:

* this package's classes: classes defined in :data:`PACKAGE_MODULES` (models, encoders, aggregators,
  tasks, the training callbacks, the datamodules), never its functions;
* torch optimisers (``torch.optim.*`` subclasses of ``Optimizer``);
* known LR schedulers: :data:`TORCH_SCHEDULERS` and :data:`TIMM_SCHEDULERS` (not ``LambdaLR`` or
  ``MultiplicativeLR``, which call a function named in the config);
* Lightning's own callbacks (not ``LambdaCallback``, which calls functions named in the config) and the
  file loggers a run config records (:data:`LIGHTNING_LOGGERS`).

A code reference is a ``class_path`` value (at any depth, in ``init_args`` and ``dict_kwargs`` too,
full or short name) and any other string that jsonargparse could import: a dotted name such as
``os.system`` given where a class or callable is expected. Dotted strings whose first name is no
importable module (file names such as ``manifest.csv``, timm model tags) cannot be imported and pass. After jsonargparse has parsed the
checked data (resolving short names such as ``LambdaCallback`` to full paths), :func:`check_parsed`
checks the result again before anything is instantiated.

``fit`` configs a user writes are trusted and not checked: they are the user's own code choices.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from e2e_wsi.errors import UserError

# Modules (and packages, walked recursively) whose classes a run config may name.
PACKAGE_MODULES = (
    "e2e_wsi.models",
    "e2e_wsi.tasks",
    "e2e_wsi.training.callbacks",
    "e2e_wsi.data.datamodule",
    "e2e_wsi.features.datamodule",
)
TORCH_SCHEDULERS = (
    "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
    "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR",
    "ReduceLROnPlateau", "SequentialLR", "ChainedScheduler",
)  # fmt: skip
TIMM_SCHEDULERS = {
    "CosineLRScheduler": "cosine_lr",
    "StepLRScheduler": "step_lr",
    "MultiStepLRScheduler": "multistep_lr",
    "PlateauLRScheduler": "plateau_lr",
    "PolyLRScheduler": "poly_lr",
    "TanhLRScheduler": "tanh_lr",
}
LIGHTNING_LOGGERS = ("TensorBoardLogger", "CSVLogger")
# Lightning callbacks that call functions named in the config.
REFUSED_CALLBACKS = frozenset({"LambdaCallback"})

# Keys whose values jsonargparse treats as code references in a subclass/callable spec.
CLASS_KEY = "class_path"
# File suffixes of data a config names (manifests, splits, weights, slides): such strings are file names.
DATA_SUFFIXES = frozenset(
    "csv tsv txt h5 hdf5 ckpt pt pth safetensors bin npy npz png jpg jpeg tif tiff svs ndpi mrxs scn vms "
    "bif geojson parquet lmdb log md".split()
)
# A string ending so, given for a group (``model: other.yaml``), makes jsonargparse read that file.
NESTED_CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".jsonnet")
# Command-line options that name a config file, and the section the file fills.
CONFIG_OPTIONS = {"-c": "", "--config": "", "--model": "model", "--data": "data", "--trainer": "trainer"}
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_WHAT = (
    "a config from a run folder may only name this package's classes, torch optimisers, known LR "
    "schedulers and Lightning's callbacks and file loggers (docs/security.md)"
)


class RefusedConfigError(UserError):
    """A config from a run folder names code outside the allow-list; nothing was imported or run."""


@cache
def allowed_paths() -> frozenset[str]:
    """Every import path (full and re-exported) of an allowed class."""
    paths: set[str] = set()
    for obj, aliases in _allowed_objects():
        paths.add(f"{obj.__module__}.{obj.__qualname__}")
        paths.update(aliases)
    for name, module in TIMM_SCHEDULERS.items():  # not imported: timm is slow to import, names suffice
        paths.update({f"timm.scheduler.{name}", f"timm.scheduler.{module}.{name}"})
    return frozenset(paths)


@cache
def allowed_names() -> frozenset[str]:
    """Short names (``ABMILX``, ``EarlyStopping``) that jsonargparse may resolve to an allowed class."""
    return frozenset(path.rpartition(".")[2] for path in allowed_paths())


def is_allowed(class_path: str) -> bool:
    """Whether ``class_path`` (full import path or short class name) names an allowed class."""
    if "." not in class_path:
        return class_path in allowed_names()
    return class_path in allowed_paths()


def _allowed_objects() -> Iterator[tuple[type, set[str]]]:
    yield from _package_classes()
    import torch.optim
    import torch.optim.lr_scheduler as sched
    from lightning.pytorch import callbacks as pl_callbacks
    from lightning.pytorch import loggers as pl_loggers

    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if (
            inspect.isclass(obj)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
        ):
            yield obj, {f"torch.optim.{name}"}
    for name in TORCH_SCHEDULERS:
        yield getattr(sched, name), {f"torch.optim.lr_scheduler.{name}"}
    for name in dir(pl_callbacks):
        obj = getattr(pl_callbacks, name)
        if inspect.isclass(obj) and issubclass(obj, pl_callbacks.Callback) and name not in REFUSED_CALLBACKS:
            yield obj, {f"lightning.pytorch.callbacks.{name}"}
    for name in LIGHTNING_LOGGERS:
        yield getattr(pl_loggers, name), {f"lightning.pytorch.loggers.{name}"}


def _package_classes() -> Iterator[tuple[type, set[str]]]:
    for module in _package_modules():
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and _is_own(obj) and not name.startswith("_"):
                yield obj, {f"{module.__name__}.{name}"}


def _is_own(obj: type) -> bool:
    return any(obj.__module__ == m or obj.__module__.startswith(m + ".") for m in PACKAGE_MODULES)


def _package_modules() -> Iterator[Any]:
    for name in PACKAGE_MODULES:
        if importlib.util.find_spec(name) is None:
            continue  # e2e_wsi.tasks exists only once the task plug-ins land
        module = importlib.import_module(name)
        yield module
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{name}."):
            if not info.name.rpartition(".")[2].endswith("cli"):  # command lines hold no config classes
                yield importlib.import_module(info.name)


# -------------------------------------------------------------------------------------------- checks
def check_config(node: Any, source: str | Path, key: str = "") -> None:
    """Refuse ``node`` (plain data loaded with ``yaml.safe_load``) if it names code off the allow-list.

    Args:
        node: The config, or the part of it that will be parsed.
        source: The file it came from (named in the error).
        key: Dotted key of ``node`` inside the file (``model`` when only that section is given).

    Raises:
        RefusedConfigError: Naming the file, the dotted key and the refused class or import path.
    """
    for where, ref in _code_references(node, key):
        if ref.lower().endswith(NESTED_CONFIG_SUFFIXES):
            raise RefusedConfigError(
                f"{source}: refusing {where or '<top>'} = {ref!r}: a config from a run folder is read as "
                "`fit` wrote it, without nested config files (copy the file's content into this key)"
            )
        if not is_allowed(ref):
            raise RefusedConfigError(f"{source}: refusing {where or '<top>'} = {ref!r}: {_WHAT}")


def check_parsed(node: Any, source: str | Path, key: str = "") -> None:
    """Check a config after jsonargparse parsed it, before instantiation (short names now resolved).

    ``node`` is a jsonargparse ``Namespace`` or plain data; functions and classes found in it (callable
    parameters parse to the object itself) must be allowed too.

    Raises:
        RefusedConfigError: As :func:`check_config`.
    """
    check_config(_plain(node), source, key)


def _plain(node: Any) -> Any:
    """A parsed Namespace as dicts and lists; imported objects as their import paths."""
    if hasattr(node, "as_dict") and callable(node.as_dict):
        node = node.as_dict()
    if isinstance(node, Mapping):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    if inspect.isclass(node) or inspect.isroutine(node):
        return f"{getattr(node, '__module__', '?')}.{getattr(node, '__qualname__', repr(node))}"
    return node


def _code_references(node: Any, key: str) -> Iterator[tuple[str, str]]:
    """``(dotted key, reference)`` for every class path and importable-looking string in ``node``."""
    if isinstance(node, Mapping):
        if CLASS_KEY in node:
            value = node[CLASS_KEY]
            yield key, value if isinstance(value, str) else repr(value)
        for k, v in node.items():
            if k == CLASS_KEY:
                continue
            child = key if k in ("init_args", "dict_kwargs") else f"{key}.{k}" if key else str(k)
            yield from _code_references(v, child)
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            yield from _code_references(v, f"{key}[{i}]")
    elif isinstance(node, str) and (_could_import(node) or node.lower().endswith(NESTED_CONFIG_SUFFIXES)):
        yield key, node


def _could_import(text: str) -> bool:
    """Whether jsonargparse could take ``text`` as an import path (``os.system``, ``evil.yaml``).

    Data, not code: a dotted string whose first name is no importable module (a timm model tag such as
    ``vit_small_patch16_224.augreg_in21k``; ``find_spec`` on a top-level name imports nothing), and a
    file name with a data suffix (``test.csv`` would otherwise name the standard library's ``test``).
    """
    if not _DOTTED.match(text) or text.rpartition(".")[2].lower() in DATA_SUFFIXES:
        return False
    try:
        return importlib.util.find_spec(text.partition(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def check_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config with ``yaml.safe_load`` and refuse it if it names code off the allow-list.

    Returns:
        The config as plain data.

    Raises:
        RefusedConfigError: As :func:`check_config`.
        UserError: If the file is not valid YAML.
    """
    data = _read_yaml(Path(path))
    check_config(data, path)
    return data


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {err}") from None


def checked_command_configs(subcommand: str, configs: Sequence[tuple[str, str]]) -> list[Path]:
    """Check the config files of a LightningCLI verb that the allow-list applies to.

    ``validate``/``test``/``predict`` evaluate trained runs: each of their config files is checked.
    ``fit`` trusts the configs its user wrote and checks only those that lie in a run folder (a resume
    with ``--config RUN/config.yaml``, a cross-validation fold).

    Args:
        subcommand: The verb.
        configs: ``(file, section)`` pairs of :func:`config_arguments`, in order (values that are no
            file, such as inline YAML typed on the command line, are the user's own and not checked).

    Returns:
        The files checked (their parsed result is checked again with :func:`check_parsed`).

    Raises:
        RefusedConfigError: If a checked file names code outside the allow-list.
    """
    from e2e_wsi.runs.folder import RunFolder

    checked = []
    for config, section in configs:
        path = Path(config)
        if not path.is_file():
            continue
        if subcommand == "fit" and not RunFolder.is_run_folder(path.parent):
            continue  # a config the user wrote: trusted (docs/security.md)
        check_config(_read_yaml(path), path, section)
        checked.append(path)
    return checked


def config_arguments(args: Sequence[str]) -> list[tuple[str, str]]:
    """``(value, section)`` of every config-file option in a command line (:data:`CONFIG_OPTIONS`)."""
    found = []
    for i, arg in enumerate(args):
        option, eq, value = arg.partition("=")
        if option not in CONFIG_OPTIONS:
            continue
        if not eq:
            if i + 1 >= len(args):
                continue
            value = args[i + 1]
        found.append((str(value), CONFIG_OPTIONS[option]))
    return found
