"""The package import graph: the pipeline flows downhill and no two modules import each other.

Every ``import`` in ``e2e_wsi/`` counts, wherever it stands (module top, inside a function, under
``TYPE_CHECKING``): a lazy import is still a dependency, and a cycle through one is still a cycle.

Allowed order, lowest first. A package may import itself and anything in a lower layer, never a higher
one. The base modules are shared helpers every stage may use; ``cli`` (the dispatcher) is the top.

    base        errors, utils, images, stain, tables, task_kinds, cli_common (and the package's __init__)
    tasks       task specs (columns, targets, metrics, captions) on plain arrays and frames
    runs.core   run folder layout, safe checkpoint reading, config allow-list, checkpoint resolution
                (runs/folder.py, checkpoints.py, allowlist.py, resolve.py: they import only the base)
    slides      reading slide files, tiling geometry, tissue masks
    annotations QuPath GeoJSON in and out
    evaluation  metrics and bootstrap reports on plain arrays/frames
    viz         drawing: arrays in, images/TIFF out (never a model, a cache or a dataset)
    models      encoders, aggregators, heads, tasks, SlideModule: tensors in, tensors out (no data,
                no features: a model never knows where its tensors come from)
    synth       synthetic cohorts (writes slides)
    cache       preprocessing into the LMDB patch cache
    data        manifests, splits, datasets, datamodules over the cache
    runs        building models and encoders from a run, its preprocessing record (runs/loading.py,
                preprocess.py and the package's __init__, which re-exports them)
    features    two-stage feature extraction and feature datamodules
    training    LightningCLI, callbacks, run folders, checkpoints, cross-validation
    inference   running trained models on slides: predict, heatmaps, ensembles
    export      ONNX/TorchScript export of a run and its Lightning-free runtime (reuses inference's
                tiling and output writers)
    cli         the ``e2e-wsi`` dispatcher

A new package must be placed here (the test says so), which is the point: its place in the pipeline is a
decision, written down once.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "e2e_wsi"

LAYERS: list[tuple[str, ...]] = [
    (
        "__init__",
        "__main__",
        "errors",
        "utils",
        "locks",
        "images",
        "stain",
        "tables",
        "task_kinds",
        "cli_common",
    ),
    ("tasks",),
    ("runs.core",),
    ("slides",),
    ("annotations",),
    ("evaluation",),
    ("viz",),
    ("models",),
    ("synth",),
    ("cache",),
    ("data",),
    ("runs",),
    ("features",),
    ("training",),
    ("inference",),
    ("export",),
    ("cli",),
]
# ``python -m e2e_wsi`` calls the dispatcher: the one base module allowed to reach the top.
ENTRY_POINTS = {("__main__", "cli")}
# Verb modules that hand one of their routes to a higher package (module, package): `predict --onnx`
# runs an exported model through export's runtime, imported only on that route.
VERB_ROUTES = {("e2e_wsi.inference.cli", "export")}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = ["e2e_wsi", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """``(imported e2e_wsi module, line)`` for every import statement in the file."""
    me = next(name for name, p in modules.items() if p == path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import mod`` depends on pkg.mod when that is a module, else on pkg itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            if target == "e2e_wsi" or target.startswith("e2e_wsi."):
                yield target, node.lineno


# Packages whose modules sit on two layers: these modules form "<package>.core", the rest "<package>".
CORE_MODULES = {"runs": {"folder", "checkpoints", "allowlist", "resolve"}}


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    if len(parts) > 2 and parts[2] in CORE_MODULES.get(parts[1], ()):
        return f"{parts[1]}.core"
    return parts[1]


def layer_of(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(
        f"package e2e_wsi.{package} has no place in tests/test_layering.py LAYERS: add it to the layer of "
        "the pipeline stage it belongs to (it may import only layers below it)"
    )


def upward_imports(modules: dict[str, Path]) -> list[str]:
    bad = []
    for name, path in modules.items():
        mine = package_of(name)
        for target, line in imports_of(path, modules):
            theirs = package_of(target)
            if theirs == mine or (mine, theirs) in ENTRY_POINTS or theirs == f"{mine}.core":
                continue
            if (name, theirs) in VERB_ROUTES:
                continue
            # Base modules may use each other (the cycle check still applies); other layers only go down.
            if layer_of(theirs) > layer_of(mine) or (layer_of(theirs) == layer_of(mine) > 0):
                bad.append(f"{name}:{line} ({mine}) imports {target} ({theirs})")
    return bad


def module_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), i.e. import cycles."""
    graph = {name: sorted({t for t, _ in imports_of(path, modules) if t in modules} - {name})
             for name, path in modules.items()}  # fmt: skip
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_package_imports_one_above_it_in_the_pipeline() -> None:
    bad = upward_imports(all_modules())
    assert not bad, "imports against the pipeline order (see this file's docstring):\n" + "\n".join(bad)


def test_no_import_cycles_between_modules() -> None:
    cycles = module_cycles(all_modules())
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The checks discriminate: a lazy upward import (models -> data) and a cycle closed under
    TYPE_CHECKING are both caught, and an unplaced package is refused."""
    pkg = tmp_path / "e2e_wsi"
    for sub in ("models", "data"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from e2e_wsi.data import b\n")
    (pkg / "data" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from e2e_wsi.models.a import f\n"
    )
    modules = all_modules(pkg)
    assert module_cycles(modules) == [["e2e_wsi.data.b", "e2e_wsi.models.a"]]
    assert upward_imports(modules) == ["e2e_wsi.models.a:2 (models) imports e2e_wsi.data.b (data)"]
    with pytest.raises(AssertionError, match="no place in tests/test_layering.py LAYERS"):
        layer_of("runs_v2")
