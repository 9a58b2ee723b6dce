"""Shared initial weights for paired ablation runs (``benchmarks/replicate_mil.py --ablation``).

Runs of one seed differ only in the module option under study (alpha fixed at 0 vs learnable). Seeding
alone does not pair them: an arm that draws one more random number at construction (the official alpha
draw) shifts every weight built after it, the head included. So the first run of a seed saves its
whole initial state and every run of that seed loads it, keeping only the keys named in ``keep`` (the
option under study) from its own construction. Training randomness (dropout) is re-seeded at the start
of training so both arms also see the same dropout masks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from e2e_wsi.runs.checkpoints import load_torch_file


def state_digest(state: dict[str, torch.Tensor], skip: list[str]) -> str:
    """SHA-256 over the names and bytes of every tensor except ``skip`` (a pairing check)."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if k not in skip):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class SharedInit(Callback):
    """Load (or, for the first run of a seed, create) the seed's shared initial state.

    Args:
        folder: Where the states live, relative to the run folder (``init/seed<S>.pt`` under it).
        keep: State keys each run keeps from its own construction.
        timeout_s: How long a run waits for another run of its seed to write the state.
    """

    def __init__(
        self, folder: str = "../../init", keep: list[str] | None = None, timeout_s: float = 600
    ) -> None:
        self.folder = folder
        self.keep = list(keep or [])
        self.timeout_s = timeout_s

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if str(getattr(stage, "value", stage)) != "fit" or trainer.ckpt_path is not None:
            return  # a resumed run restores its own checkpoint after setup
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        run_dir = Path(trainer.default_root_dir)
        path = (run_dir / self.folder / f"seed{seed}.pt").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        own = pl_module.state_dict()
        try:
            os.close(os.open(f"{path}.lock", os.O_CREAT | os.O_EXCL))
            tmp = path.with_suffix(".tmp")
            torch.save(own, tmp)
            tmp.replace(path)
        except FileExistsError:
            deadline = time.monotonic() + self.timeout_s
            while not path.is_file():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no shared initial state at {path} after {self.timeout_s} s"
                    ) from None
                time.sleep(1)
        shared = load_torch_file(path)
        for key in self.keep:
            shared[key] = own[key]
        pl_module.load_state_dict(shared)
        ema = getattr(pl_module, "ema", None)
        if ema is not None:  # the EMA copy was taken at construction: restart it from the shared weights
            for avg, live in zip(ema.module.parameters(), pl_module._trainable().parameters(), strict=True):
                avg.data.copy_(live.data)
        info = {
            "shared_state": str(path),
            "digest_without_keep": state_digest(pl_module.state_dict(), self.keep),
            "kept": {k: own[k].tolist() for k in self.keep if own[k].numel() == 1},
        }
        (run_dir / "init.json").write_text(json.dumps(info, indent=2) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Construction consumed different amounts of randomness per arm; re-seed so dropout matches.
        if trainer.ckpt_path is None:
            L.seed_everything(int(os.environ.get("PL_GLOBAL_SEED", "0")), verbose=False)
