"""Labels and ids checked before any training (issue 21 items 7 and 8): a case whose slides disagree on the
label, a training split of one class, a survival training split without events, and case ids that later
verbs refuse are all refused at the start of every verb, naming the lines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from e2e_wsi.cli import main
from e2e_wsi.data.manifest import load_manifest
from e2e_wsi.errors import UserError
from e2e_wsi.tasks import get_task_spec


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def test_a_case_with_slides_of_different_labels_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "case_id,slide_id,label\nP1,a1,0\nP1,a2,1\nP2,b1,1\nP3,c1,0\n")
    with pytest.raises(ValueError, match=r"lines 2, 3 \(case_id 'P1'\): slides of one case have different"):
        load_manifest(path, "classification", num_classes=2)
    path.write_text("case_id,slide_id,label\nP1,a1,0\nP1,a2,0\nP2,b1,1\n")
    assert len(load_manifest(path, "classification", num_classes=2)) == 3


@pytest.mark.parametrize("case_id", ["Fall+é0", "..", ".hidden", "a..b", "x" * 129])
def test_case_ids_follow_the_slide_id_rule(tmp_path: Path, case_id: str) -> None:
    # `test` and `evaluate` refuse these in predictions.csv; fit must refuse them before training.
    path = _write(tmp_path, f"case_id,slide_id,label\nA,a1,0\n{case_id},b1,1\n")
    with pytest.raises(ValueError, match=r"line 3 \(slide_id 'b1'\): case_id .* is not a valid id"):
        load_manifest(path, "classification")


def test_training_splits_that_cannot_teach_are_refused() -> None:
    one_class = pd.DataFrame({"label": [1, 1, 1]})
    with pytest.raises(UserError, match="m.csv: every training slide has label 1 .*two classes"):
        get_task_spec("classification").check_training(one_class, "m.csv")
    with pytest.raises(UserError, match="a grading model"):
        get_task_spec("grading").check_training(one_class, "m.csv")
    get_task_spec("grading").check_training(pd.DataFrame({"label": [0, 1]}), "m.csv")
    with pytest.raises(UserError, match="no training case has an event"):
        get_task_spec("survival").check_training(pd.DataFrame({"event": [0, 0]}), "m.csv")
    get_task_spec("survival").check_training(pd.DataFrame({"event": [0, 1]}), "m.csv")
    with pytest.raises(UserError, match="training split is empty"):
        get_task_spec("regression").check_training(pd.DataFrame({"target": []}), "m.csv")


def test_fit_refuses_a_one_class_training_split_before_training(
    synth_cache: tuple[Path, Path],
    tmp_path: Path,
    tiny_args: Callable[..., list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest, cache = synth_cache
    table = pd.read_csv(manifest)
    table["path"] = [str(manifest.parent / p) for p in table["path"]]
    ones = table.index[table["label"] == 1]
    table["split"] = "train"
    table.loc[ones[::2], "split"] = "val"
    table.loc[ones[1::2], "split"] = "test"
    table.to_csv(tmp_path / "m.csv", index=False)
    run = tmp_path / "run"
    assert main(tiny_args(tmp_path / "m.csv", cache, run, "--trainer.max_epochs", "1")) == 2
    assert "every training slide has label 0" in capsys.readouterr().err
    assert not (run / "checkpoints").exists()
