"""Training progress as plain lines when the output is a file or a pipe (real Lightning Trainer)."""

from __future__ import annotations

import io

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from e2e_wsi.training.progress import PlainProgress, wants_plain_progress


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_plain_lines_every_n_steps_and_per_epoch(tmp_path) -> None:
    data = TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    stream = io.StringIO()
    trainer = L.Trainer(
        max_epochs=2, callbacks=[PlainProgress(every_n_steps=2, every_seconds=1e9, stream=stream)],
        enable_progress_bar=False, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_Tiny(), DataLoader(data, batch_size=2))
    lines = stream.getvalue().splitlines()
    assert lines[0] == "e2e-wsi fit: training for 2 epoch(s), 6 batch(es) per epoch"
    steps = [line for line in lines if " batch " in line]
    assert len(steps) == 6  # batches 2, 4, 6 of each of the two epochs
    assert steps[0].startswith("e2e-wsi fit: epoch 1 batch 2/6 step 2 loss ") and "elapsed 0:0" in steps[0]
    done = [line for line in lines if "done" in line]
    assert len(done) == 2 and "train/loss " in done[1]


def test_only_a_non_terminal_output_gets_plain_lines() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert wants_plain_progress(io.StringIO()) and not wants_plain_progress(Tty())
