"""Paper Table 3 (top, "ResNet-18 ABMILX + MRIS (ours)") on whatever device is present.

The paper reports, for E2E ResNet-18 + ABMILX on BRCA-subtyping (appendix B.3, Table 3): training memory
9 GB ("GPU memory evaluated with batch size 1 and fp16 during training", 512 sampled patches of 224 px),
inference 1.7 s per slide (a 10,000-patch slide, "1 x 10000 x 3 x 224 x 224", data loading excluded) and
9 h of training ("3090 GPU hours"). This script measures the same three things with this package's
model (``SlideModule``: ResNet-18 to layer3 + ABMILX with the subtyping settings + bias-free head):

1. **memory**: peak memory of one training step (forward, backward, AdamW step) at ``--patches`` patches
   of 224 px, batch 1. GPU: fp16 autocast + GradScaler, ``torch.cuda.max_memory_allocated`` (and
   reserved); CPU: fp32, peak RSS (``ru_maxrss``) of a fresh process that builds the model and runs the
   steps, and its growth over the steps (each measurement runs in its own spawned process, so the peaks
   do not mix). Reduced runs project the growth linearly to 512 patches. Measured twice: the whole bag
   in one encoder call (``checkpoint_chunk: null``, what the official code does for 512 patches,
   ``modules/e2e.py:192-196``) and with activation checkpointing in chunks of ``--chunk``.
2. **inference**: seconds per slide of ``--infer_patches`` patches (eval mode, ``eval_chunk_size``
   patches at a time, fp16 autocast on GPU), median of ``--repeats`` after one warm-up, data excluded.
3. **training time**: seconds per training bag (median step time / batch) -> one epoch of the official
   BRCA-subtyping run projected: 794 training bags (``labels/subtyping_tcga_brca_resample.csv``: 518 IDC +
   276 ILC training rows) plus one evaluation of the 329 slides the official run validates on every
   epoch (``val2test``: its 95 validation + 234 test slides, ~3,000 patches each at 10x, paper B.2),
   and 75 epochs (paper B.3; early stopping may end it sooner).

On a CPU, sizes are reduced (``--reduced``, on by default without CUDA): fewer patches, and the
per-patch cost is scaled linearly to the paper's sizes (labelled "projected"). Usage::

    python benchmarks/paper_table3.py                  # GPU: the paper's sizes
    python benchmarks/paper_table3.py --reduced        # CPU: 32 training / 256 inference patches
    python benchmarks/paper_table3.py --json out.json  # also write the figures
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from e2e_wsi.models.aggregators import ABMILX  # noqa: E402
from e2e_wsi.models.encoders import ResNetEncoder  # noqa: E402
from e2e_wsi.models.module import SlideModule  # noqa: E402
from e2e_wsi.models.tasks import ClassificationTask  # noqa: E402

PAPER = {"memory_gb": 9.0, "inference_s_per_slide": 1.7, "train_hours": 9.0, "device": "RTX 3090"}
TRAIN_BAGS_PER_EPOCH = 794  # official labels/subtyping_tcga_brca_resample.csv training rows (518 + 276)
EVAL_SLIDES_PER_EPOCH = 329  # official val2test: 95 validation + 234 test slides, evaluated every epoch
EVAL_PATCHES_PER_SLIDE = 3000  # paper B.2: ~3,000 patches per slide at 10x
EPOCHS = 75  # paper B.3 (subtyping)


def build_model(chunk: int | None, device: torch.device) -> SlideModule:
    """The subtyping model (configs/brca_subtype.yaml) with random weights (cost does not depend on them)."""
    encoder = ResNetEncoder("resnet18", weights="none", channels_last=True, checkpoint_chunk=chunk)
    aggregator = partial(ABMILX, inner_dim=256, heads=8, dropout=0.25, attn_plus=True, mil_bias=False)
    model = SlideModule(task=ClassificationTask(2), encoder=encoder, aggregator=aggregator, lr_scheduler=None)
    return model.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_gb() -> float:
    """Peak resident set size of this process so far, GB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def train_step_cost(
    patches: int, batch: int, chunk: int | None, device: torch.device, steps: int
) -> dict[str, Any]:
    """Peak memory and median seconds of a training step of ``batch`` bags of ``patches`` patches."""
    model = build_model(chunk, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=8e-5)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    images = torch.randint(0, 256, (batch, patches, 3, 224, 224), dtype=torch.uint8, device=device)
    target = torch.randint(0, 2, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    rss_before = _rss_gb()  # fresh process: the model, optimiser and input only
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            out = model(images)["outputs"]
            loss = torch.nn.functional.cross_entropy(out.float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "patches": patches,
        "batch": batch,
        "chunk": chunk,
        "step_s": statistics.median(times[1:]),
    }
    if device.type == "cuda":
        result["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        result["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 1e9
        result["model_and_input_gb"] = base / 1e9
    else:
        result["peak_rss_gb"] = _rss_gb()
        result["rss_growth_gb"] = _rss_gb() - rss_before
        result["projected_512_rss_gb"] = rss_before + result["rss_growth_gb"] * 512 / patches
    del model, opt, images
    return result


def in_fresh_process(fn, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` in a spawned process (its own peak RSS / CUDA context) and return its result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


@torch.no_grad()
def inference_cost(patches: int, device: torch.device, repeats: int, eval_chunk: int) -> dict[str, Any]:
    """Median seconds to predict one slide of ``patches`` patches (data already in memory)."""
    model = build_model(None, device)
    model.eval_chunk_size = eval_chunk
    model.eval()
    images = torch.randint(0, 256, (1, patches, 3, 224, 224), dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            model(images)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"patches": patches, "eval_chunk": eval_chunk, "slide_s": statistics.median(times[1:])}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_1min": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--reduced", action="store_true", default=None, help="reduced sizes (default on CPU)")
    p.add_argument("--patches", type=int, default=None, help="training patches per bag (512; reduced 32)")
    p.add_argument("--batch", type=int, default=1, help="training bags per step (paper Table 3: 1)")
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="checkpoint chunk of the second run (128; reduced: same share of the bag)",
    )
    p.add_argument("--infer_patches", type=int, default=None, help="patches per slide (10000; reduced 256)")
    p.add_argument("--eval_chunk", type=int, default=256, help="patches encoded at once at inference")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (5; reduced 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed inference runs (3; reduced 1)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reduced = args.reduced if args.reduced is not None else device.type != "cuda"
    patches = args.patches or (32 if reduced else 512)
    infer = args.infer_patches or (256 if reduced else 10_000)
    steps = args.steps or (2 if reduced else 5)
    repeats = args.repeats or (1 if reduced else 3)
    args.chunk = args.chunk or max(1, patches * 128 // 512)
    torch.manual_seed(0)
    info = machine()
    print(
        f"device: {device} {info.get('gpu', info['cpu'])}; reduced: {reduced}; {json.dumps(info)}", flush=True
    )

    whole = in_fresh_process(train_step_cost, patches, args.batch, None, device, steps)
    print(f"train step, whole bag in one encoder call: {json.dumps(whole)}", flush=True)
    chunked = in_fresh_process(train_step_cost, patches, args.batch, args.chunk, device, steps)
    print(f"train step, checkpoint_chunk {args.chunk}: {json.dumps(chunked)}", flush=True)
    inf = in_fresh_process(inference_cost, infer, device, repeats, args.eval_chunk)
    print(f"inference: {json.dumps(inf)}", flush=True)

    per_patch_infer = inf["slide_s"] / infer
    per_bag_train = whole["step_s"] / args.batch * (512 / patches)  # linear in patches when reduced
    epoch_s = (
        TRAIN_BAGS_PER_EPOCH * per_bag_train
        + EVAL_SLIDES_PER_EPOCH * EVAL_PATCHES_PER_SLIDE * per_patch_infer
    )
    mem_key = (
        "peak_allocated_gb"
        if device.type == "cuda"
        else ("projected_512_rss_gb" if patches != 512 else "peak_rss_gb")
    )
    rows = [
        ("training memory, 512 patches, batch 1", f"{PAPER['memory_gb']:.1f} GB (fp16)",
         f"{whole[mem_key]:.2f} GB whole bag / {chunked[mem_key]:.2f} GB chunk {args.chunk * 512 // patches}"
         + (f" ({'fp16' if device.type == 'cuda' else 'fp32 RSS'}"
            + (f", projected from {patches} patches)" if patches != 512 else ")"))),
        ("inference, 10,000-patch slide", f"{PAPER['inference_s_per_slide']:.1f} s",
         f"{per_patch_infer * 10_000:.1f} s" + (" projected" if infer != 10_000 else "")
         + f" ({inf['slide_s']:.2f} s for {infer} patches)"),
        ("one epoch (794 bags + 329 eval slides)", "-", f"{epoch_s / 3600:.2f} h projected"),
        (f"{EPOCHS} epochs", f"{PAPER['train_hours']:.0f} h", f"{EPOCHS * epoch_s / 3600:.1f} h projected"),
    ]  # fmt: skip
    print(
        f"\n{'Table 3 (R18 ABMILX + MRIS)':<42} {'paper (' + PAPER['device'] + ')':<20} this machine ({device.type})"
    )
    for name, paper, ours in rows:
        print(f"{name:<42} {paper:<20} {ours}")
    result = {"machine": info, "reduced": reduced, "train_whole": whole, "train_chunked": chunked,
              "inference": inf, "epoch_hours": epoch_s / 3600, "run_hours": EPOCHS * epoch_s / 3600,
              "paper": PAPER}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
