"""`convert` given a non-checkpoint (issue 21 item 14): a text file or slide is named as "not a checkpoint"
(not as an unsafe pickle), and a torch file holding a list or a tensor gets one line, not a TypeError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from e2e_wsi.cli import main
from tests.helpers.slides import CMU


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p.write_text("case_id,slide_id\n"), "is not a checkpoint: it starts with b'case'"),
        (lambda p: p.write_bytes(CMU.read_bytes()[:4096]), "is not a checkpoint: it starts with b'II*"),
        (lambda p: torch.save([1, 2], p), "holds a list, not a checkpoint"),
        (lambda p: torch.save(torch.zeros(3), p), "holds a Tensor, not a checkpoint"),
        (lambda p: torch.save({"model": {"w": [1.0]}}, p), "entry 'w' is not a named tensor"),
    ],
)
def test_convert_refuses_a_non_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make, needle: str
) -> None:
    path = tmp_path / "in.pt"
    make(path)
    assert main(["convert", str(path), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert not (tmp_path / "out.ckpt").exists()
