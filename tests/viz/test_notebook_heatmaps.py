"""notebooks/attention_heatmaps.ipynb runs top to bottom (nbclient, a real kernel) on a tiny trained run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "attention_heatmaps.ipynb"
KERNEL = "e2e-wsi-test"


def _kernel_for_this_interpreter(root: Path) -> Path:
    """A kernelspec that starts this very interpreter (the venv's), whatever `python` is on PATH.

    Returns:
        The folder to put on JUPYTER_PATH.
    """
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"})
    )
    return root


def test_committed_notebook_has_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow  # starts a Jupyter kernel and renders heatmaps on a trained run
def test_notebook_runs_on_a_trained_run(
    tiny_run: Path, synth_cache: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out_dir = tmp_path / "heatmaps"
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_for_this_interpreter(tmp_path / "jupyter")))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    # The kernel inherits these: they point the notebook's parameters at the tiny run.
    monkeypatch.setenv("E2E_WSI_RUN_DIR", str(tiny_run))
    monkeypatch.setenv("E2E_WSI_CACHE_DIR", str(synth_cache[1]))
    monkeypatch.setenv("E2E_WSI_NUM_SLIDES", "2")
    monkeypatch.setenv("E2E_WSI_HEATMAP_DIR", str(out_dir))
    monkeypatch.setenv("E2E_WSI_MASK_DIR", str(synth_cache[0].parent / "masks"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    splits = pd.read_csv(tiny_run / "splits.csv")
    slides = list(splits.loc[splits["split"] == "test", "slide_id"])[:2]
    assert slides
    # One heatmap per slide plus the top-patch mosaic, shown inline and written to the output folder.
    assert len(images) == len(slides) + 1
    for slide_id in slides:
        assert (out_dir / f"{slide_id}.png").stat().st_size > 10_000
        loc = json.loads((out_dir / f"{slide_id}.localization.json").read_text())
        assert loc["slide_id"] == slide_id
    assert (out_dir / f"{slides[0]}.top_patches.png").is_file()
    # The localisation table lists every drawn slide.
    tables = [
        o["data"]["text/plain"]
        for o in outputs
        if "text/html" in o.get("data", {}) and "auroc" in o["data"]["text/html"]
    ]
    assert tables and all(s in tables[0] for s in slides)
