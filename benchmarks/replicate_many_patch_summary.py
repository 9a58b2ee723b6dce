"""Tables, paired differences and per-epoch curves of the many-patch replication (issue 23).

Reads ``OUT/runs/<arm>_s<seed>/result.json`` (``replicate_many_patch.py``) and writes
``OUT/summary.json`` (per arm and seed, the final numbers; per arm the per-epoch means), ``OUT/summary.md``
(the tables), ``OUT/mechanism.csv`` (one row per arm, seed and epoch) and ``OUT/curves.png``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from replicate_many_patch import ARMS, E2E_ARMS
from replicate_mil import seed_bootstrap

# (a, b): paired difference a - b over seeds. ABMIL is the paper's weak baseline; the last two compare
# paradigms on the same split.
COMPARISONS = [
    ("abmilx", "abmil"),
    ("mhla", "abmil"),
    ("abmilx", "mhla"),
    ("transmil", "abmil"),
    ("meanpool", "abmil"),
    ("abmilx", "ts_init"),
    ("abmilx", "ts_e2e"),
]
# Per-epoch measures: (where, key) in a mechanism.jsonl row, and how the table/plot names them.
CURVES = {
    "loss": (("train", "loss"), "train loss"),
    "grad_lesion": (("train", "grad_share_lesion"), "encoder gradient norm from lesion patches"),
    "grad_distractor": (("train", "grad_share_distractor"), "encoder gradient norm from distractors"),
    "share_lesion": (("train", "share_lesion"), "lesion share of sampled patches (chance)"),
    "share_distractor": (("train", "share_distractor"), "distractor share of sampled patches"),
    "train_att_lesion": (("train", "att_on_lesion"), "attention mass on lesion (training bags)"),
    "train_top90": (("train", "top90"), "top-90% patch share (training bags, head-averaged)"),
    "top90": (("probe", "top90_head"), "top-90% patch share per head (probe slides)"),
    "att_lesion": (("probe", "att_on_lesion"), "attention mass on lesion (probe slides)"),
    "att_distractor": (("probe", "att_on_distractor"), "attention mass on distractors (probe slides)"),
    "auroc": (("probe", "auroc"), "slide AUROC (probe slides)"),
}


def _load(out: Path, arms: list[str], seeds: list[int]) -> dict[str, dict[int, dict]]:
    runs: dict[str, dict[int, dict]] = {}
    for arm in arms:
        for seed in seeds:
            path = out / "runs" / f"{arm}_s{seed}" / "result.json"
            if path.is_file():
                result = json.loads(path.read_text())
                where = path.parent / "where.json"  # from ``--where``, when it was run
                result["where"] = json.loads(where.read_text()) if where.is_file() else None
                result.update(run_measures(result))
                runs.setdefault(arm, {})[seed] = result
    return runs


def enrichment_curve(result: dict) -> list[float]:
    """Per epoch, the lesion patches' share of the encoder's gradient norm over their share of the sampled
    patches (1 = what uniform weighting gives); empty for a two-stage run."""
    return [
        row["train"]["grad_share_lesion"] / row["train"]["share_lesion"]
        for row in result.get("epochs", [])
        if row.get("train", {}).get("share_lesion")
    ]


def run_measures(result: dict) -> dict[str, float | None]:
    """One E2E run's mechanism as scalars that can be paired across arms of a seed.

    ``grad_enrichment``: :func:`enrichment_curve` averaged over epochs (< 1 = lesions starved).
    ``log_grad_enrichment``: its natural log, for paired differences (a ratio of geometric means).
    ``att_enrichment``: attention mass on lesion patches over their share of the patches, final probe on
    every 10x patch of the test slides. ``final_train_loss``: the last epoch's mean training loss.
    Two-stage runs have no per-epoch rows and get ``None``.
    """
    ratios = enrichment_curve(result)
    final = result.get("final_probe") or {}
    share = final.get("share_lesion")
    epochs = result.get("epochs") or []
    grad = float(np.mean(ratios)) if ratios else None
    return {
        "grad_enrichment": grad,
        # ratios compare on a log scale: one run at 10x must not outweigh several at 0.3x
        "log_grad_enrichment": float(np.log(grad)) if grad else None,
        "att_enrichment": final["att_on_lesion"] / share if share and "att_on_lesion" in final else None,
        "final_train_loss": float(epochs[-1]["train"]["loss"]) if epochs else None,
    }


def _value(row: dict, where: str, key: str) -> float | None:
    part = row.get(where) or {}
    value = part.get(key)
    return None if value is None else float(value)


def epoch_curves(results: dict[int, dict]) -> dict[str, list[list[float | None]]]:
    """Per measure, [seed][epoch] values of one arm (``None`` where not measured)."""
    curves: dict[str, list[list[float | None]]] = {}
    for name, ((where, key), _) in CURVES.items():
        curves[name] = [[_value(row, where, key) for row in r.get("epochs", [])] for r in results.values()]
    return curves


def _mean_curve(per_seed: list[list[float | None]]) -> list[float | None]:
    length = max((len(c) for c in per_seed), default=0)
    out = []
    for e in range(length):
        vals = [c[e] for c in per_seed if e < len(c) and c[e] is not None]
        out.append(float(np.mean(vals)) if vals else None)
    return out


def _final(r: dict, key: str) -> float | None:
    value = r.get("final_probe", {}).get(key)
    return None if value is None else float(value)


def arm_table(arm: str, results: dict[int, dict]) -> dict:
    """One arm's final numbers over seeds and its mean per-epoch curves."""
    seeds = sorted(results)
    auc = np.array([results[s]["auroc"] if results[s]["auroc"] is not None else np.nan for s in seeds], float)
    row = {
        "name": ARMS[arm],
        "seeds": seeds,
        "auroc_per_seed": [round(float(a), 4) for a in auc],
        "auroc_mean": float(np.nanmean(auc)) if len(auc) else None,
        "auroc_sd": float(np.nanstd(auc, ddof=1)) if len(auc) > 1 else 0.0,
        "nll_per_seed": [round(float(results[s]["nll"]), 4) for s in seeds],
        "minutes_per_run": float(np.mean([results[s]["seconds"] for s in seeds]) / 60),
    }
    if arm in E2E_ARMS:
        for key in ("loc_auroc", "top90_head", "top90_merged", "att_on_lesion", "share_lesion",
                    "att_on_distractor", "share_distractor"):  # fmt: skip
            vals = [v for v in (_final(results[s], key) for s in seeds) if v is not None]
            row[key] = float(np.mean(vals)) if vals else None
        enrich = [
            results[s]["grad_enrichment"] for s in seeds if results[s].get("grad_enrichment") is not None
        ]
        row["grad_enrichment_median"] = float(np.median(enrich)) if enrich else None
        row["starved_seeds"] = sum(e < 1.0 for e in enrich)  # lesions got less than their share, on average
        row["alpha"] = [(results[s]["alpha_init"], results[s]["alpha_final"]) for s in seeds]
        row["where"] = _where(results)
        row["curves"] = {k: _mean_curve(v) for k, v in epoch_curves(results).items()}
    return row


def _where(results: dict[int, dict]) -> dict[str, list[float]] | None:
    """Means over seeds of ``where.json`` (attention mass and patch share per region), if measured."""
    found = [r["where"] for r in results.values() if r.get("where")]
    if not found:
        return None
    return {k: [float(np.mean([w[k][i] for w in found])) for i in (0, 1)] for k in found[0]}


def init_check(runs: dict[str, dict[int, dict]]) -> dict[int, dict[str, bool]]:
    """Per seed: do all E2E arms share the trunk digest, and MHLA/ABMILX the aggregator digest?"""
    seeds = sorted({s for arm in E2E_ARMS if arm in runs for s in runs[arm]})
    check = {}
    for s in seeds:
        trunk = {runs[a][s]["init_digests"]["trunk"] for a in E2E_ARMS if a in runs and s in runs[a]}
        pair = {
            runs[a][s]["init_digests"]["abmilx"] for a in ("mhla", "abmilx") if a in runs and s in runs[a]
        }
        check[s] = {
            "arms": sum(1 for a in E2E_ARMS if a in runs and s in runs[a]),
            "trunk_identical": len(trunk) == 1 and None not in trunk,
            "abmilx_pair_identical": len(pair) == 1 and None not in pair,
        }
    return check


def paired(runs: dict[str, dict[int, dict]], a: str, b: str, key: str) -> dict | None:
    """Mean of (a - b) over the seeds both have, with a percentile bootstrap CI over seeds."""
    if a not in runs or b not in runs:
        return None
    seeds = sorted(set(runs[a]) & set(runs[b]))
    diffs = [
        runs[a][s][key] - runs[b][s][key]
        for s in seeds
        if runs[a][s].get(key) is not None and runs[b][s].get(key) is not None
    ]
    if not diffs:
        return None
    return {**seed_bootstrap(np.array(diffs)), "seeds": seeds}


# Paired per seed: the outcome (test AUROC, NLL, localisation) and the mechanism (run_measures).
DIFF_KEYS = {
    "auroc": "Δ test AUROC",
    "nll": "Δ test NLL",
    "loc_auroc": "Δ loc AUROC",
    "grad_enrichment": "Δ lesion gradient enrichment",
    "log_grad_enrichment": "Δ ln lesion gradient enrichment",
    "att_enrichment": "Δ lesion attention enrichment",
}


def summarise(out: Path, arms: list[str], seeds: list[int]) -> dict:
    """Write summary.{json,md}, mechanism.csv and curves.png of the finished runs; print the tables."""
    runs = _load(out, arms, seeds)
    table = {arm: arm_table(arm, res) for arm, res in runs.items()}
    diffs = {f"{a}-{b}": {k: paired(runs, a, b, k) for k in DIFF_KEYS} for a, b in COMPARISONS}
    summary = {"arms": table, "paired_differences": diffs, "init_check": init_check(runs)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _write_csv(out / "mechanism.csv", runs)
    text = "\n".join(
        [*_outcome_lines(table), "", *_diff_lines(diffs), "", *_per_seed_lines(runs), "", *link_lines(runs), "",
         *_mechanism_lines(table), "", *_init_lines(summary["init_check"], table)]
    )  # fmt: skip
    (out / "summary.md").write_text(text + "\n")
    print(text, flush=True)
    if any(arm in E2E_ARMS for arm in table):
        plot_curves(table, out / "curves.png", runs)
    return summary


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _outcome_lines(table: dict) -> list[str]:
    lines = [
        "| arm | seeds | test AUROC mean ± sd | per seed | test NLL per seed | loc AUROC | top-90% share "
        "per head / merged | attention on lesion (chance) | on distractors (chance) | lesion gradient "
        "enrichment, median | seeds with lesions starved (< 1) | min/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table.values():
        lines.append(
            f"| {t['name']} | {len(t['seeds'])} | {_fmt(t['auroc_mean'])} ± {_fmt(t['auroc_sd'])} "
            f"| {', '.join(_fmt(a) for a in t['auroc_per_seed'])} | {', '.join(_fmt(v) for v in t['nll_per_seed'])} "
            f"| {_fmt(t.get('loc_auroc'))} | {_pct(t.get('top90_head'))} / {_pct(t.get('top90_merged'))} "
            f"| {_pct(t.get('att_on_lesion'))} ({_pct(t.get('share_lesion'))}) "
            f"| {_pct(t.get('att_on_distractor'))} ({_pct(t.get('share_distractor'))}) "
            f"| {_fmt(t.get('grad_enrichment_median'), '.2f')} "
            f"| {t['starved_seeds'] if 'starved_seeds' in t else 'n/a'} "
            f"| {t['minutes_per_run']:.1f} |"
        )
    return lines


def _diff_lines(diffs: dict) -> list[str]:
    lines = [
        "| paired difference (over seeds) | "
        + " | ".join(f"{v} [95% CI]" for v in DIFF_KEYS.values())
        + " | seeds |",
        "|---|" + "---|" * (len(DIFF_KEYS) + 1),
    ]
    for name, d in diffs.items():
        a, b = name.split("-")
        cells = []
        for key in DIFF_KEYS:
            v = d[key]
            cells.append(
                "n/a" if v is None else f"{v['point']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
            )
        seeds = next((len(v["seeds"]) for v in d.values() if v is not None), 0)
        lines.append(f"| {ARMS[a]} − {ARMS[b]} | {' | '.join(cells)} | {seeds} |")
    return lines


def _per_seed_lines(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Per E2E arm and seed: the outcome next to the mechanism, so consistency across seeds shows."""
    seeds = sorted({s for a in E2E_ARMS if a in runs for s in runs[a]})
    lines = [
        "Per seed (E2E arms): test AUROC / lesion gradient enrichment (epoch mean) / lesion attention "
        "enrichment (final, all test patches) / final train loss:",
        "",
        "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    keys = ("auroc", "grad_enrichment", "att_enrichment", "final_train_loss")
    for arm in (a for a in E2E_ARMS if a in runs):
        cells = [
            " / ".join(_fmt(runs[arm][s][k], ".2f") for k in keys) if s in runs[arm] else "–" for s in seeds
        ]
        lines.append(f"| {ARMS[arm]} | " + " | ".join(cells) + " |")
    return lines


def link_lines(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Does the mechanism predict the outcome? Every E2E run split by whether lesions were starved."""
    from scipy.stats import spearmanr

    rows = [
        (arm, r["grad_enrichment"], r["auroc"])
        for arm in E2E_ARMS
        for r in runs.get(arm, {}).values()
        if r.get("grad_enrichment") is not None and r.get("auroc") is not None
    ]
    if len(rows) < 3:
        return []
    lines = [
        "Mechanism against outcome, every E2E run (lesion gradient enrichment = the lesion patches' share of "
        "the encoder's gradient norm over their share of the sampled patches, epoch mean):",
        "",
        "| lesion gradient enrichment | runs | test AUROC mean | test AUROC ≥ 0.9 | arms (runs) |",
        "|---|---|---|---|---|",
    ]
    for label, keep in (("< 1 (starved)", lambda e: e < 1.0), ("≥ 1", lambda e: e >= 1.0)):
        group = [(a, e, u) for a, e, u in rows if keep(e)]
        if not group:
            continue
        arms = ", ".join(f"{ARMS[a]} ({sum(1 for g in group if g[0] == a)})" for a in E2E_ARMS
                         if any(g[0] == a for g in group))  # fmt: skip
        good = sum(1 for g in group if g[2] >= 0.9)
        lines.append(
            f"| {label} | {len(group)} | {np.mean([g[2] for g in group]):.3f} | {good} of {len(group)} | {arms} |"
        )
    rho, p = spearmanr([e for _, e, _ in rows], [u for _, _, u in rows])
    lines += ["", f"Spearman correlation of lesion gradient enrichment with test AUROC over {len(rows)} runs: "
              f"{rho:+.2f} (p = {p:.1e})."]  # fmt: skip
    return lines


def _mechanism_lines(table: dict) -> list[str]:
    keys = [
        "grad_lesion",
        "share_lesion",
        "grad_distractor",
        "top90",
        "att_lesion",
        "att_distractor",
        "auroc",
    ]
    lines = [
        "Per-epoch means over seeds (first / middle / last epoch measured):",
        "",
        "| arm | " + " | ".join(CURVES[k][1] for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for t in table.values():
        if "curves" not in t:
            continue
        cells = []
        for k in keys:
            c = [v for v in t["curves"][k] if v is not None]  # the probe runs every 2nd epoch only
            picks = [c[0], c[len(c) // 2], c[-1]] if c else []
            cells.append(" / ".join(_fmt(v, ".2f") for v in picks))
        lines.append(f"| {t['name']} | " + " | ".join(cells) + " |")
    return lines


def _init_lines(check: dict, table: dict) -> list[str]:
    where = {t["name"]: (t.get("where"), len(t["seeds"])) for t in table.values() if t.get("where")}
    if where:
        regions = next(iter(where.values()))[0]
        head = " | ".join(f"{k} (share)" for k in regions)
        lines = ["Final attention mass by region, first 4 test slides (`--where`):", "",
                 f"| arm | {head} |", "|---|" + "---|" * len(regions)]  # fmt: skip
        for name, (w, _) in where.items():
            lines.append(
                f"| {name} | " + " | ".join(f"{_pct(v[0])} ({_pct(v[1])})" for v in w.values()) + " |"
            )
        lines.append("")
    else:
        lines = []
    lines += ["| seed | E2E arms | encoder + head init identical (SHA-256) | MHLA / ABMILX aggregator init identical |",
              "|---|---|---|---|"]  # fmt: skip
    for seed, c in check.items():
        pair = "yes" if c["abmilx_pair_identical"] else "NO"
        lines.append(f"| {seed} | {c['arms']} | {'yes' if c['trunk_identical'] else 'NO'} | {pair} |")
    alpha = table.get("abmilx", {}).get("alpha", [])
    if alpha:
        moves = ", ".join(f"{a:+.3f} -> {b:+.3f}" for a, b in alpha if a is not None and b is not None)
        lines += ["", f"ABMILX alpha, start -> end per seed: {moves}"]
    return lines


def _write_csv(path: Path, runs: dict[str, dict[int, dict]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["arm", "seed", "epoch", *CURVES])
        for arm, res in runs.items():
            for seed, r in sorted(res.items()):
                for row in r.get("epochs", []):
                    values = [_value(row, w, k) for (w, k), _ in CURVES.values()]
                    writer.writerow(
                        [arm, seed, row["epoch"], *("" if v is None else f"{v:.5f}" for v in values)]
                    )


def plot_curves(table: dict, path: Path, runs: dict[str, dict[int, dict]] | None = None) -> None:
    """Per-epoch means over seeds, one line per E2E arm (2 x 4 panels), and per seed (a third row).

    The third row shows, per attention arm and seed, the lesion gradient enrichment per epoch, coloured by
    the run's outcome: means over seeds mix runs that found the lesions with runs that did not.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["loss", "grad_lesion", "grad_distractor", "train_att_lesion",
              "top90", "att_lesion", "att_distractor", "auroc"]  # fmt: skip
    chance = {
        "grad_lesion": "share_lesion",
        "grad_distractor": "share_distractor",
        "train_att_lesion": "share_lesion",
    }
    per_seed = [a for a in ("abmil", "mhla", "abmilx", "transmil") if runs and a in runs]
    rows = 3 if per_seed else 2
    fig, axes = plt.subplots(rows, 4, figsize=(18, 3.75 * rows))
    for ax, key in zip(axes[:2].ravel(), panels, strict=True):
        for t in table.values():
            if "curves" not in t:
                continue
            c = t["curves"][key]
            x = [i + 1 for i, v in enumerate(c) if v is not None]
            ax.plot(x, [v for v in c if v is not None], marker="o", ms=3, label=t["name"])
        if key in chance:  # the share of sampled patches in the region: what uniform weighting gives
            base = next((t["curves"][chance[key]] for t in table.values() if "curves" in t), [])
            xs = [i + 1 for i, v in enumerate(base) if v is not None]
            ax.plot(xs, [v for v in base if v is not None], "k--", lw=1, label="share of sampled patches")
        ax.set_title(CURVES[key][1], fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[0, 1].legend(fontsize=8)
    for ax, arm in zip(axes[2] if per_seed else [], per_seed, strict=False):
        _plot_enrichment(ax, arm, runs[arm])
    fig.suptitle("Many-patch regime: per-epoch mechanism, mean over seeds", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_enrichment(ax, arm: str, results: dict[int, dict]) -> None:
    """One line per seed: lesion gradient share / lesion share of the sampled patches, per epoch."""
    for seed, r in sorted(results.items()):
        ratio = enrichment_curve(r)
        good = r.get("auroc") is not None and r["auroc"] >= 0.9
        ax.plot(range(1, len(ratio) + 1), ratio, color="tab:green" if good else "tab:red", lw=1.2)
        if ratio:
            ax.annotate(f"s{seed}", (len(ratio), ratio[-1]), fontsize=7)
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_title(f"{ARMS[arm]}: lesion gradient enrichment per seed\n(green: test AUROC ≥ 0.9, red: < 0.9)",
                 fontsize=9)  # fmt: skip
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
