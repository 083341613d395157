"""Plots: loss curves with spikes (paper Fig. 1/2), paired deltas of a grid, and ``kha plot DIR``.

- :func:`plot_loss_curves`: training loss (bias-corrected EMA, raw faint), validation loss and detected
  spikes of several runs on one figure, with a panel of differences to the first label (the baseline); a
  label may carry several runs (seeds), drawn in one colour.
- :func:`plot_delta_curves`: paired ΔL against tokens seen (in K, M or B as fits) with its t band.
- :func:`plot_grid_curves`: one such figure per group of an ablation grid (baseline vs its KHA arms; a
  group with more than four arms is split by knock type, each part with the baseline).
- :func:`plot_deltas`: every arm's paired ΔL against its baseline with its confidence interval.
- :func:`plot_dir`: everything for a grid directory (``kha ablate``) or a run directory (``kha train``),
  including the knock heatmaps and knock movement of ``kha.analysis.knocks``.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import safe_io
from ..train.callbacks import read_metrics


def _smooth(values: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average: at step t the mean of the values so far weighted by
    ``beta ** age`` (Adam's correction of a zero-started EMA), kept as a running weighted mean, so that the
    curve starts at the first value, equals a constant exactly, and gives the first value no excess weight."""
    out, mean, weight = [], 0.0, 0.0
    for value in values:
        weight = beta * weight + 1.0  # the sum of the weights so far
        mean += (value - mean) / weight
        out.append(mean)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: Path) -> Path:
    """Write ``fig`` to ``out_png`` (its folders made without following links) and close it."""
    plt = _plt()
    out_png = Path(out_png)
    safe_io.make_dirs(out_png.parent)
    with safe_io.atomic_output(out_png) as tmp:  # a link at out_png is refused, never written through
        fig.savefig(tmp)
    plt.close(fig)
    return out_png


LATER_PART = 0.2  # loss-curve y-ranges cover the steps after this fraction of the run (not the first drop)


def _read_curve(run_dir: Path, smooth: float) -> dict:
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    losses = [r["loss"] for r in records]
    return {"steps": [r["step"] for r in records], "raw": losses, "ema": _smooth(losses, smooth),
            "val": [(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
            "spikes": [(r["step"], r["loss"]) for r in records if r.get("spike")]}


def _mean_by_step(series: list[list[tuple[int, float]]]) -> dict[int, float]:
    """The mean over runs at each step every run has."""
    common = set.intersection(*(set(dict(s)) for s in series)) if series else set()
    return {step: sum(dict(s)[step] for s in series) / len(series) for step in sorted(common)}


def _limit_to_later_part(ax, series: list[list[tuple[int, float]]]) -> None:
    """y-range of the points after the first LATER_PART of the steps (padded 5 %), so that the first drop of
    the loss does not flatten the differences that matter."""
    steps = [step for s in series for step, _ in s]
    if not steps:
        return
    start = min(steps) + LATER_PART * (max(steps) - min(steps))
    later = [v for s in series for step, v in s if step >= start and math.isfinite(v)]
    if not later:
        return
    low, high = min(later), max(later)
    pad = 0.05 * (high - low) or 0.01 * max(abs(high), 1e-3)
    ax.set_ylim(low - pad, high + pad)


def plot_loss_curves(runs: dict[str, Path | list[Path]], out_png: Path, smooth: float = 0.9, title: str = "") -> Path:
    """Training loss (bias-corrected EMA; raw, faint), validation loss (dots) and loss-spike events (x at their
    first step) per run; with several labels a second panel draws each one's difference to the first label's
    (the baseline): EMA and validation loss, averaged over its runs at the steps all of them have.

    A label mapped to a list of run directories (e.g. one per seed) draws each in the label's colour. Later
    labels are drawn on top with thinner lines, so none hides another; the y-ranges cover the steps after the
    first fifth of the run (a spike above that range is marked on its top edge).
    """
    plt = _plt()
    curves = {label: [_read_curve(d, smooth) for d in ([dirs] if isinstance(dirs, (str, Path)) else list(dirs))]
              for label, dirs in runs.items()}
    base = next(iter(curves), None)
    if len(curves) > 1:
        fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True, height_ratios=(3, 2))
    else:
        (fig, ax), ax_diff = plt.subplots(figsize=(8, 4.5), dpi=120), None
    shown, diffs, spikes = [], [], []
    for i, (label, label_curves) in enumerate(curves.items()):
        n, color, order = len(label_curves), f"C{i}", 2 + i
        width = max(0.8, 2.4 - 0.5 * i)  # later labels on top, thinner
        seeds = f", {n} seeds" if n > 1 else ""
        for j, c in enumerate(label_curves):
            first = j == 0
            ax.plot(c["steps"], c["raw"], color=color, alpha=0.2 / n ** 0.5, linewidth=0.6, zorder=1,
                    label=f"{label} (train, raw{seeds})" if first else None)
            ax.plot(c["steps"], c["ema"], color=color, linewidth=width, zorder=order,
                    label=f"{label} (train, EMA {smooth:g}{seeds})" if first else None)
            if c["val"]:
                ax.plot(*zip(*c["val"], strict=True), "o--", color=color, markersize=4, linewidth=1, zorder=order,
                        label=f"{label} (validation)" if first else None)
            if c["spikes"]:
                spikes.append((c["spikes"], color, order, f"{label} (loss spikes)" if first else None))
            shown += [list(zip(c["steps"], c["ema"], strict=True)), c["val"]]
        if ax_diff is not None and label != base:
            for kind, style in (("ema", "-"), ("val", "o--")):
                ours, theirs = (_mean_by_step([list(zip(c["steps"], c["ema"], strict=True)) if kind == "ema"
                                               else c["val"] for c in curves[name]]) for name in (label, base))
                common = [s for s in ours if s in theirs]
                if common:
                    diff = [(s, ours[s] - theirs[s]) for s in common]
                    ax_diff.plot(*zip(*diff, strict=True), style, color=color, linewidth=width if kind == "ema" else 1,
                                 markersize=4, zorder=order,
                                 label=f"{label} - {base} ({'train EMA' if kind == 'ema' else 'validation'})")
                    diffs.append(diff)
    _limit_to_later_part(ax, shown)
    top = ax.get_ylim()[1]
    for points, color, order, spike_label in spikes:  # a spike above the range marked on its top edge
        ax.plot([step for step, _ in points], [min(loss, top) for _, loss in points], "x", color=color,
                markersize=8, markeredgewidth=2, zorder=order + 10, label=spike_label)
    ax.set_ylabel("cross-entropy loss")
    if title:
        ax.set_title(title, fontsize=10)
    if ax_diff is not None:
        ax_diff.axhline(0, color="C0", linewidth=0.8, label=f"{base} (0)")
        _limit_to_later_part(ax_diff, diffs)
        ax_diff.set_ylabel(f"difference to {base}")
    for a in (ax, ax_diff):
        if a is not None:
            a.grid(alpha=0.3)
            a.legend(fontsize=7, ncol=2 if len(curves) > 2 else 1)
    (ax_diff or ax).set_xlabel("optimizer step")
    fig.tight_layout()
    return save_figure(fig, out_png)


def _grid_runs(root: Path) -> tuple[dict, dict[str, list[Path]]]:
    """The grid's metadata and its finished runs by variant: a run in flight is left out of the figures as it is
    of the report (the mean curves and their differences would otherwise stop at its last step)."""
    from .tables import load_run, read_grid

    meta = read_grid(root)
    runs = {}
    for v in meta["variants"]:
        dirs = sorted(p.parent for p in (Path(root) / "runs" / v["name"]).glob("seed_*/metrics.jsonl"))
        dirs = [d for d in dirs if load_run(d).val_loss is not None]
        if dirs:
            runs[v["name"]] = dirs
    return meta, runs


def plot_grid_curves(root: Path, smooth: float = 0.9) -> list[Path]:
    """``curves_GROUP[_KNOCK].png`` for each group of the grid in ``root``: baseline vs its KHA arms."""
    meta, runs = _grid_runs(root)
    groups: dict[str, list[dict]] = {}
    for v in meta["variants"]:
        if v["name"] in runs:
            groups.setdefault(v["group"], []).append(v)
    written = []
    for group, variants in groups.items():
        base = [v for v in variants if v["arm"] == "baseline"]
        others = [v for v in variants if v["arm"] != "baseline"]
        parts = {"": others} if len(others) <= 4 else {}
        for v in others if not parts else []:
            parts.setdefault(v["knock"], []).append(v)
        for part, arms in parts.items():
            chosen = base + arms
            name = f"curves_{group}{'_' + part if part else ''}.png"
            heading = " ".join(dict.fromkeys(x for x in (meta["grid"], group, part) if x))  # no "study study"
            title = f"{heading}: " + " vs ".join(v["arm"] for v in chosen)
            written.append(plot_loss_curves({v["arm"]: runs[v["name"]] for v in chosen}, Path(root) / name, smooth,
                                            title))
    return written


def plot_deltas(root: Path, out_png: Path | None = None, level: float = 0.95) -> Path | None:
    """Paired ΔL (variant - its baseline, per seed) with its t interval for every non-baseline arm."""
    from .tables import GridResults

    g = GridResults(root, level)
    meta = g.meta
    rows = [(f"{v['group']} {v['arm']}" if len(g.groups) > 1 else v["arm"], g.delta_summary(v["name"]))
            for v in g.variants if v["arm"] != "baseline"]
    rows = [(name, s) for name, s in rows if s is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.4), dpi=120)
    for y, (_, s) in enumerate(rows):
        color = "C2" if s.excludes_zero and s.mean < 0 else "C3" if s.excludes_zero else "C7"
        if s.lo is not None:
            ax.plot([s.lo, s.hi], [y, y], color=color, linewidth=2)
        ax.plot([s.mean], [y], "o", color=color)
        ax.text(1.01, y, f"n={s.n}", transform=ax.get_yaxis_transform(), va="center", fontsize=7)
    ax.axvline(0, color="k", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"ΔL = loss - baseline loss, paired by seed (mean, {100 * level:g} % t interval)")
    ax.set_title(f"{meta['grid']}: final validation loss against the baseline", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save_figure(fig, out_png or Path(root) / "deltas.png")


BAND_SCALE_SEEDS = 3  # arms with fewer seeds do not set plot_delta_curves' y-range with their band


def plot_delta_curves(root: Path, out_png: Path | None = None, level: float = 0.95) -> Path | None:
    """Paired ΔL against tokens seen, mean and t band per non-baseline arm: from how many tokens KHA helps."""
    from .tables import GridResults, crossover, fmt_tokens, token_unit

    g = GridResults(root, level)
    curves = {v["arm"] if len(g.groups) == 1 else f"{v['group']} {v['arm']}": g.delta_curve(v["name"])
              for v in g.variants if v["arm"] != "baseline"}
    curves = {k: c for k, c in curves.items() if c}
    if not curves:
        return None
    scale, _, word = token_unit(max(t for curve in curves.values() for t, _ in curve))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    ax.axhline(0, color="k", linewidth=0.8, label="no difference")
    for i, (label, curve) in enumerate(curves.items()):
        tokens = [t / scale for t, _ in curve]
        n = max(s.n for _, s in curve)
        ax.plot(tokens, [s.mean for _, s in curve], "o-", color=f"C{i}", markersize=3, label=f"{label} (n={n})")
        band = [(t, s.lo, s.hi) for t, (_, s) in zip(tokens, curve, strict=True) if s.lo is not None]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=f"C{i}",
                            alpha=0.15, linewidth=0, label=f"{label}: {100 * level:g} % t band")
        cross = crossover(curve)
        if cross is not None:
            ax.axvline(cross / scale, color=f"C{i}", linestyle=":", linewidth=1,
                       label=f"{label}: below 0 from {fmt_tokens(cross)} tokens on")
    # the y-range holds every mean and the bands of arms with BAND_SCALE_SEEDS seeds or more: a 2-seed t band
    # (t(1) = 12.7) would set the scale and flatten every other arm; it is drawn, clipped
    shown = [s.mean for curve in curves.values() for _, s in curve]
    shown += [x for curve in curves.values() if max(s.n for _, s in curve) >= BAND_SCALE_SEEDS
              for _, s in curve if s.lo is not None for x in (s.lo, s.hi)]
    low, high = min(shown), max(shown)
    pad = 0.05 * (high - low) or 0.01
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"tokens seen ({word})" if word else "tokens seen")
    ax.set_ylabel("ΔL = val loss - baseline's (paired by seed)")
    ax.set_title(f"{g.meta['grid']}: paired ΔL against tokens, mean and {100 * level:g} % t band", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_png or Path(root) / "deltas_vs_tokens.png")


def plot_run_knocks(run_dir: Path, out_dir: Path, name: str = "") -> list[Path]:
    """``[NAME_]knocks.png`` (heatmaps) and, where checkpoints survive, ``[NAME_]knock_movement.png`` of one run;
    none without knocks."""
    from .knocks import (
        final_weights_file,
        knock_stats_over_steps,
        load_knocks,
        plot_knock_heatmaps,
        plot_knock_movement,
    )

    run_dir = Path(run_dir)
    if final_weights_file(run_dir) is None:
        return []
    knocks = load_knocks(run_dir)
    if not knocks:
        return []
    title = name or (f"{run_dir.parent.name}/{run_dir.name}" if run_dir.name.startswith("seed_") else run_dir.name)
    prefix = f"{name}_" if name else ""
    written = [plot_knock_heatmaps(knocks, Path(out_dir) / f"{prefix}knocks.png",
                                   f"{title}: knock matrices, W - init")]
    # movement needs checkpoints besides the final weights: a committed run has none, and its figure stays as drawn
    if len(stats := knock_stats_over_steps(run_dir)) > 1:
        written.append(plot_knock_movement(stats, Path(out_dir) / f"{prefix}knock_movement.png",
                                           f"{title}: how far the knocks moved from their init"))
    return written


def plot_dir(path: Path, seed: int | None = None) -> list[Path]:
    """All plots of a grid directory (curves, deltas, knocks of one seed per variant) or of one run."""
    path = Path(path)
    if (path / "grid.json").exists():
        written = plot_grid_curves(path)
        written += [p for p in (plot_deltas(path), plot_delta_curves(path)) if p]
        _, runs = _grid_runs(path)
        for name, dirs in runs.items():
            chosen = [d for d in dirs if seed is None or d.name == f"seed_{seed}"][:1]
            for d in chosen:
                written += plot_run_knocks(d, path, name=f"{name}_{d.name}")
        return written
    if (path / "metrics.jsonl").exists():
        return [plot_loss_curves({path.name: path}, path / "loss_curves.png"), *plot_run_knocks(path, path)]
    raise ValueError(f"{path} is neither a grid directory (grid.json) nor a run directory (metrics.jsonl)")
