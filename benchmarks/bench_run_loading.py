"""What the config allow-list costs when a run is loaded (``e2e_wsi.runs``).

Times, in one process: building the allow-list (once per process: it walks ``e2e_wsi.models`` and
Lightning's callbacks), checking a run's ``config.yaml`` against it, and a whole ``load_run`` (config
check, jsonargparse, model construction, ``torch.load(weights_only=True)`` of the checkpoint). Compare
them as ratios within one run.

    python benchmarks/bench_run_loading.py RUN [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder of `e2e-wsi fit`")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each step (default 5)")
    args = p.parse_args(argv)

    import yaml

    from e2e_wsi.runs import RunFolder, load_run
    from e2e_wsi.runs.allowlist import allowed_paths, check_config

    start = time.perf_counter()
    paths = allowed_paths()
    build = time.perf_counter() - start
    source = RunFolder(args.run).config
    config = yaml.safe_load(source.read_text())
    check = _median_seconds(lambda: check_config(config, source), args.repeats)
    load = _median_seconds(lambda: load_run(args.run), args.repeats)
    print(f"allow-list: {len(paths)} import paths, built once in {build:.2f} s (imports included)")
    print(f"check of RUN/config.yaml: {check * 1e3:.2f} ms (median of {args.repeats})")
    print(f"load_run(RUN): {load * 1e3:.0f} ms (median of {args.repeats}); check share {check / load:.3%}")


if __name__ == "__main__":
    main()
