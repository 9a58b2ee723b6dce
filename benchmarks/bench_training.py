"""Training-side benchmark on CPU: step breakdown, Lightning overhead, encoder patches/s.

Sections (``--only`` picks some):

* ``loading``: seconds per ``next()`` on the real :class:`WSIDataModule` train loader (MRIS + LMDB read
  + JPEG decode + RandomResizedCrop), for each ``--workers`` value; the first batch (worker start-up)
  is excluded.
* ``breakdown``: one training step of :class:`SlideModule` split into its parts, each timed on its
  own with ``time.perf_counter`` after warm-up: normalise + encoder forward, aggregator + head forward
  + loss, aggregator + head backward (down to the features), encoder backward, AdamW step, and the
  torchmetrics update that ``SlideModule.step`` does. The same batches are pre-loaded, so loading is
  excluded; a fused step (all parts in one go) is timed as a check of the sum.
* ``lightning``: the same model and the same pre-loaded batches, a bare PyTorch loop (forward, loss,
  backward, AdamW step, zero_grad) vs ``lightning.Trainer.fit`` of :class:`SlideModule` on a
  DataLoader yielding those batches. Steps/s is measured between step ends after ``--warmup`` steps;
  runs alternate bare/Lightning ``--repeats`` times and the median is reported.
* ``encoder``: truncated ResNet-18 patches/s, fp32, train (fwd+bwd, BatchNorm in train mode) and
  inference (``no_grad``, eval), channels_last on and off, at each ``--encoder-sizes`` side.
* ``bf16``: the same train/inference at 128 px under ``torch.autocast('cpu', dtype=torch.bfloat16)``.

The 1-minute load average is printed before and after each section (the machine may be shared).

Usage::

    e2e-wsi synth --task subtype --num-slides 8 --size 16384 --out /tmp/bt/cohort
    e2e-wsi preprocess --manifest /tmp/bt/cohort/manifest.csv --out /tmp/bt/cache --magnifications 10 5 \\
        --patch-size 256
    .venv/bin/python benchmarks/bench_training.py --cache /tmp/bt/cache --manifest /tmp/bt/cohort/manifest.csv
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from e2e_wsi.data.datamodule import WSIDataModule  # noqa: E402
from e2e_wsi.data.transforms import normalize_images  # noqa: E402
from e2e_wsi.models.aggregators import ABMILX  # noqa: E402
from e2e_wsi.models.encoders import ResNetEncoder  # noqa: E402
from e2e_wsi.models.module import SlideModule  # noqa: E402
from e2e_wsi.models.tasks import ClassificationTask  # noqa: E402

SECTIONS = ("loading", "breakdown", "lightning", "encoder", "bf16")
RESULTS: list[dict[str, Any]] = []


def report(**row: Any) -> None:
    """Print one figure as a JSON line and keep it for ``--json``."""
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def load_avg(tag: str) -> None:
    one, five, _ = os.getloadavg()
    report(bench="load", at=tag, load1=round(one, 2), load5=round(five, 2))


# ------------------------------------------------------------------------------------------ data
def make_datamodule(args: argparse.Namespace, workers: int) -> WSIDataModule:
    dm = WSIDataModule(
        cache_dir=args.cache,
        manifest=args.manifest,
        task="classification",
        magnifications=[10.0, 5.0],
        mag_ratios=[0.75, 0.25],
        sample_size=args.sample_size,
        train_patch_size=args.patch_size,
        batch_size=args.batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        seed=0,
    )
    dm.setup("fit")
    return dm


def cycle(loader: torch.utils.data.DataLoader) -> Iterator[dict]:
    """Endless batches over epochs, advancing the MRIS epoch like Lightning does."""
    epoch = 0
    while True:
        loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_loading(args: argparse.Namespace) -> None:
    for workers in args.workers:
        batches = cycle(make_datamodule(args, workers).train_dataloader())
        next(batches)  # worker start-up + first prefetch
        times = []
        for _ in range(args.load_batches):
            start = time.perf_counter()
            next(batches)
            times.append(time.perf_counter() - start)
        mean = statistics.fmean(times)
        report(
            bench="loading",
            workers=workers,
            batches=len(times),
            mean_s=mean,
            median_s=statistics.median(times),
            patches_per_s=args.batch_size * args.sample_size / mean,
        )
        del batches


def preload(args: argparse.Namespace, count: int) -> tuple[list[dict], int]:
    dm = make_datamodule(args, 0)
    batches = cycle(dm.train_dataloader())
    keep = ("images", "mask", "target")
    return [{k: v for k, v in next(batches).items() if k in keep} for _ in range(count)], int(dm.num_classes)


def build_module(num_classes: int) -> SlideModule:
    torch.manual_seed(0)
    return SlideModule(
        task=ClassificationTask(num_classes=num_classes),
        encoder=ResNetEncoder("resnet18", weights="none", channels_last=True),
        aggregator=ABMILX,
        optimizer=torch.optim.AdamW,
        lr_scheduler=None,
    ).train()


def adamw(model: SlideModule) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


# ------------------------------------------------------------------------------------- breakdown
def bench_breakdown(args: argparse.Namespace) -> None:
    batches, k = preload(args, 4)
    model = build_module(k)
    opt = adamw(model)
    parts: dict[str, list[tuple[float, float]]] = {}

    def tick(name: str, start: tuple[float, float]) -> tuple[float, float]:
        now = clocks()
        parts.setdefault(name, []).append((now[0] - start[0], now[1] - start[1]))
        return now

    for it in range(args.warmup + args.steps):
        if it == args.warmup:
            parts.clear()
        batch = batches[it % len(batches)]
        images, mask = batch["images"], batch["mask"]
        b, n = images.shape[:2]
        t = clocks()
        feats = model.encoder(normalize_images(images.flatten(0, 1)))
        t = tick("encoder_fwd", t)
        leaf = feats.detach().requires_grad_()
        slide, _ = model.aggregator(leaf.view(b, n, -1), mask)
        outputs = model.head(slide)
        loss = model.task.loss(model.loss_fn, outputs, batch)
        t = tick("aggregator_head_fwd_loss", t)
        loss.backward()
        t = tick("aggregator_head_bwd", t)
        feats.backward(leaf.grad)
        t = tick("encoder_bwd", t)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = tick("optimizer_step", t)
        model.task.update_metrics(model.train_metrics, outputs.detach(), batch)
        tick("metrics_update", t)
    medians = {name: statistics.median(w for w, _ in v) for name, v in parts.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in parts.items()}
    total = sum(v for name, v in medians.items() if name != "metrics_update")
    cpu_total = sum(v for name, v in cpu.items() if name != "metrics_update")
    for name, value in medians.items():
        report(
            bench="breakdown",
            part=name,
            median_s=value,
            share_of_compute=value / total,
            cpu_s=cpu[name],
            cpu_share=cpu[name] / cpu_total,
        )

    fused = []
    for it in range(args.steps):
        batch = batches[it % len(batches)]
        start = clocks()
        out = model(batch["images"], batch["mask"])
        model.task.loss(model.loss_fn, out["outputs"], batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        end = clocks()
        fused.append((end[0] - start[0], end[1] - start[1]))
    report(bench="breakdown", part="sum_of_parts_excl_metrics", median_s=total, cpu_s=cpu_total)
    report(
        bench="breakdown",
        part="fused_step",
        median_s=statistics.median(w for w, _ in fused),
        cpu_s=statistics.median(c for _, c in fused),
    )


# ------------------------------------------------------------------------------------- lightning
def clocks() -> tuple[float, float]:
    """(wall, process CPU) seconds; CPU time is less distorted by other jobs on a shared machine."""
    return time.perf_counter(), time.process_time()


def steps_per_s(ends: list[tuple[float, float]], warmup: int) -> tuple[float, float, float]:
    """Rates after ``warmup`` steps, from the clock readings at each step's end.

    Returns:
        (1 / median wall step, 1 / median CPU step, overall steps per wall second). The median step
        is robust to the spikes that other jobs on a shared machine cause; the overall rate is not.
    """
    timed = ends[warmup - 1 :] if warmup > 0 else ends
    wall = [b[0] - a[0] for a, b in pairwise(timed)]
    cpu = [b[1] - a[1] for a, b in pairwise(timed)]
    return 1 / statistics.median(wall), 1 / statistics.median(cpu), len(wall) / sum(wall)


def bare_loop(batches: list[dict], num_classes: int, steps: int) -> list[tuple[float, float]]:
    model = build_module(num_classes)
    opt = adamw(model)
    ends = []
    for it in range(steps):
        batch = batches[it % len(batches)]
        out = model(batch["images"], batch["mask"])
        loss = model.task.loss(model.loss_fn, out["outputs"], batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(clocks())
    return ends


class _Batches(torch.utils.data.Dataset):
    """The pre-loaded batches, one per item, cycled up to ``steps`` items."""

    def __init__(self, batches: list[dict], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


def lightning_loop(
    batches: list[dict], num_classes: int, steps: int
) -> tuple[list[tuple[float, float]], float]:
    import lightning as L

    ends: list[tuple[float, float]] = []

    class StepEnds(L.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            ends.append(clocks())

    model = build_module(num_classes)
    loader = torch.utils.data.DataLoader(_Batches(batches, steps), batch_size=None, shuffle=False)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[StepEnds()],
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    return ends, time.perf_counter() - start


def bench_lightning(args: argparse.Namespace) -> None:
    batches, k = preload(args, 4)
    total = args.warmup + args.steps
    bare, light, fits = [], [], []
    for rep in range(args.repeats):
        ends = bare_loop(batches, k, total)
        bare.append(steps_per_s(ends, args.warmup))
        ends, fit_s = lightning_loop(batches, k, total)
        assert len(ends) == total, f"Lightning ran {len(ends)} steps, expected {total}"
        light.append(steps_per_s(ends, args.warmup))
        fits.append(fit_s)
        report(
            bench="lightning_rep",
            rep=rep,
            bare_steps_per_s=bare[-1][0],
            lightning_steps_per_s=light[-1][0],
            bare_steps_per_cpu_s=bare[-1][1],
            lightning_steps_per_cpu_s=light[-1][1],
            bare_overall_steps_per_s=bare[-1][2],
            lightning_overall_steps_per_s=light[-1][2],
            lightning_fit_wall_s=fit_s,
        )
    row: dict[str, Any] = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats}
    for i, kind in enumerate(("steps_per_s", "steps_per_cpu_s", "overall_steps_per_s")):
        rb, rl = statistics.median(r[i] for r in bare), statistics.median(r[i] for r in light)
        row |= {f"bare_{kind}": rb, f"lightning_{kind}": rl, f"overhead_pct_{kind}": 100.0 * (rb / rl - 1.0)}
    report(bench="lightning", **row, lightning_fit_wall_s_median=statistics.median(fits))


# --------------------------------------------------------------------------------------- encoder
def time_runs(step: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``repeats`` calls after one warm-up (oneDNN primitive creation)."""
    step()
    times = []
    for _ in range(repeats):
        start = clocks()
        step()
        end = clocks()
        times.append((end[0] - start[0], end[1] - start[1]))
    return statistics.median(w for w, _ in times), statistics.median(c for _, c in times)


def encoder_step(mode: str, size: int, batch: int, channels_last: bool, bf16: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    enc = ResNetEncoder("resnet18", weights="none", channels_last=channels_last)
    x = torch.randn(batch, 3, size, size)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if mode == "train":
        enc.train()

        def step() -> None:
            with autocast:
                out = enc(x)
            out.float().sum().backward()
    else:
        enc.eval()

        def step() -> None:
            with torch.no_grad(), autocast:
                enc(x)

    return step


def bench_encoder(args: argparse.Namespace, bf16: bool) -> None:
    """fp32 grid over sizes x modes x layouts; with ``bf16``, bf16 autocast vs fp32 at 128 px, same batch."""
    sizes = [128] if bf16 else args.encoder_sizes
    variants = [(True, False), (True, True)] if bf16 else [(True, False), (False, False)]
    for size in sizes:
        for mode in ("train", "inference"):
            batch = (args.bf16_batch if bf16 else args.encoder_batch) * (2 if mode == "inference" else 1)
            for channels_last, autocast in variants:
                step = encoder_step(mode, size, batch, channels_last, autocast)
                wall, cpu = time_runs(step, args.encoder_repeats)
                report(
                    bench="encoder",
                    dtype="bf16-autocast" if autocast else "fp32",
                    size=size,
                    mode=mode,
                    batch=batch,
                    channels_last=channels_last,
                    median_s=wall,
                    cpu_s=cpu,
                    patches_per_s=batch / wall,
                    patches_per_cpu_s=batch / cpu,
                )


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="patch cache dir (needed by loading/breakdown/lightning)")
    parser.add_argument("--manifest", help="manifest CSV of the cohort")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--sample-size", type=int, default=32, help="patches per bag (MRIS s)")
    parser.add_argument("--patch-size", type=int, default=96, help="training crop side")
    parser.add_argument("--batch-size", type=int, default=1, help="bags per batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--load-batches", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder-sizes", type=int, nargs="+", default=[224, 128])
    parser.add_argument("--encoder-batch", type=int, default=16, help="train batch; inference uses 2x")
    parser.add_argument("--encoder-repeats", type=int, default=3)
    parser.add_argument("--bf16-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    args = parser.parse_args(argv)
    needs_data = {"loading", "breakdown", "lightning"} & set(args.only)
    if needs_data and not (args.cache and args.manifest):
        parser.error(f"--cache and --manifest are needed for {sorted(needs_data)}")

    if args.threads:
        torch.set_num_threads(args.threads)
    report(
        bench="config",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        sample_size=args.sample_size,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    runners = {
        "loading": lambda: bench_loading(args),
        "breakdown": lambda: bench_breakdown(args),
        "lightning": lambda: bench_lightning(args),
        "encoder": lambda: bench_encoder(args, bf16=False),
        "bf16": lambda: bench_encoder(args, bf16=True),
    }
    for name in SECTIONS:
        if name in args.only:
            load_avg(f"before {name}")
            start = time.perf_counter()
            runners[name]()
            report(bench="section", name=name, wall_s=round(time.perf_counter() - start, 1))
            load_avg(f"after {name}")
    if args.json:
        args.json.write_text(json.dumps(RESULTS, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
