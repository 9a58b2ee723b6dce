"""Shared initial weights for paired ablation runs (``benchmarks/replicate_mil.py --ablation``).

Runs of one seed differ only in the module option under study (alpha fixed at 0 vs learnable). Seeding
alone does not pair them: an arm that draws one more random number at construction (the official alpha
draw) shifts every weight built after it, the head included. So the first run of a seed saves its
whole initial state and every run of that seed loads it, keeping only the keys named in ``keep`` (the
option under study) from its own construction. Training randomness (dropout) is re-seeded at the start
of training so both arms also see the same dropout masks.

Arms whose modules differ in structure (ABMIL vs TransMIL vs ABMILX) can share only the parts they have
in common: ``share`` names the key prefixes taken from the shared state (e.g. ``encoder.`` and ``head.``),
and ``name`` keeps one shared state per group (``trunk`` for encoder + head across all aggregators,
``abmilx`` for the aggregator of the two ABMILX arms), so one run may use several ``SharedInit``.
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
        folder: Where the states live, relative to the run folder (``init/<name><S>.pt`` under it).
        keep: State keys each run keeps from its own construction.
        share: Key prefixes taken from the shared state (``None``: every key); the other keys stay as
            the run built them.
        name: The shared state's group (file stem); runs of one group and seed share one state.
        timeout_s: How long a run waits for another run of its seed to write the state.
    """

    def __init__(
        self,
        folder: str = "../../init",
        keep: list[str] | None = None,
        share: list[str] | None = None,
        name: str = "seed",
        timeout_s: float = 600,
    ) -> None:
        self.folder = folder
        self.keep = list(keep or [])
        self.share = None if share is None else list(share)
        self.name = name
        self.timeout_s = timeout_s

    def _taken(self, key: str) -> bool:
        """Whether ``key`` comes from the shared state."""
        shared = self.share is None or any(key.startswith(p) for p in self.share)
        return shared and key not in self.keep

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if str(getattr(stage, "value", stage)) != "fit" or trainer.ckpt_path is not None:
            return  # a resumed run restores its own checkpoint after setup
        seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        run_dir = Path(trainer.default_root_dir)
        path = (run_dir / self.folder / f"{self.name}{seed}.pt").resolve()
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
        merged = {k: shared[k] if self._taken(k) else v for k, v in own.items()}
        for key in (k for k in own if self._taken(k)):
            if key not in shared or shared[key].shape != own[key].shape:
                raise ValueError(f"shared initial state {path} has no {key} of shape {tuple(own[key].shape)}")
        pl_module.load_state_dict(merged)
        ema = getattr(pl_module, "ema", None)
        if ema is not None:  # the EMA copy was taken at construction: restart it from the shared weights
            for avg, live in zip(ema.module.parameters(), pl_module._trainable().parameters(), strict=True):
                avg.data.copy_(live.data)
        now = pl_module.state_dict()
        info = {
            "shared_state": str(path),
            "digest_without_keep": state_digest(now, [k for k in now if not self._taken(k)]),
            "kept": {k: own[k].tolist() for k in self.keep if own[k].numel() == 1},
        }
        stem = "init" if self.name == "seed" else f"init_{self.name}"
        (run_dir / f"{stem}.json").write_text(json.dumps(info, indent=2) + "\n")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Construction consumed different amounts of randomness per arm; re-seed so dropout matches.
        if trainer.ckpt_path is None:
            L.seed_everything(int(os.environ.get("PL_GLOBAL_SEED", "0")), verbose=False)
