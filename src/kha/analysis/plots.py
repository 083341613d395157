"""Plots: loss curves with spikes (paper Fig. 1/2), paired deltas of a grid, and ``kha plot DIR``.

- :func:`plot_loss_curves`: training loss (EMA and raw), validation loss and detected spikes of several
  runs on one figure; a label may carry several runs (seeds), drawn in one colour.
- :func:`plot_grid_curves`: one such figure per group of an ablation grid (baseline vs its KHA arms; a
  group with more than four arms is split by knock type, each part with the baseline).
- :func:`plot_deltas`: every arm's paired ΔL against its baseline with its confidence interval.
- :func:`plot_dir`: everything for a grid directory (``kha ablate``) or a run directory (``kha train``),
  including the knock heatmaps and knock movement of ``kha.analysis.knocks``.
"""

from __future__ import annotations

from pathlib import Path

from .. import safe_io
from ..train.callbacks import read_metrics


def _smooth(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: Path) -> Path:
    plt = _plt()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with safe_io.atomic_output(out_png) as tmp:  # a link at out_png is refused, never written through
        fig.savefig(tmp)
    plt.close(fig)
    return out_png


def plot_loss_curves(runs: dict[str, Path | list[Path]], out_png: Path, smooth: float = 0.9, title: str = "") -> Path:
    """Training loss (EMA-smoothed, raw in light), validation loss (dots) and loss-spike events (x at their first
    step) per run.

    A label mapped to a list of run directories (e.g. one per seed) draws each in the label's colour.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (label, dirs) in enumerate(runs.items()):
        dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
        color, n = f"C{i}", len(dirs)
        for j, run_dir in enumerate(dirs):
            first = j == 0
            records = read_metrics(Path(run_dir) / "metrics.jsonl")
            steps = [r["step"] for r in records]
            losses = [r["loss"] for r in records]
            ax.plot(steps, losses, color=color, alpha=0.2 / n ** 0.5, linewidth=0.8)
            ax.plot(steps, _smooth(losses, smooth), color=color, linewidth=1.6 if n == 1 else 1.1,
                    label=f"{label} (train, EMA{f', {n} seeds' if n > 1 else ''})" if first else None)
            val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            if val:
                ax.plot(*zip(*val, strict=True), "o--", color=color, markersize=4, linewidth=1,
                        label=f"{label} (validation)" if first else None)
            spikes = [(r["step"], r["loss"]) for r in records if r.get("spike")]
            if spikes:
                ax.plot(*zip(*spikes, strict=True), "x", color=color, markersize=8, markeredgewidth=2,
                        label=f"{label} spikes" if first else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out_png)


def _grid_runs(root: Path) -> tuple[dict, dict[str, list[Path]]]:
    from .tables import read_grid

    meta = read_grid(root)
    runs = {}
    for v in meta["variants"]:
        dirs = sorted(p.parent for p in (Path(root) / "runs" / v["name"]).glob("seed_*/metrics.jsonl"))
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
            title = f"{meta['grid']} {group}{' ' + part if part else ''}: " + " vs ".join(v["arm"] for v in chosen)
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
    return _save(fig, out_png or Path(root) / "deltas.png")


def plot_delta_curves(root: Path, out_png: Path | None = None, level: float = 0.95) -> Path | None:
    """Paired ΔL against tokens seen, mean and t band per non-baseline arm: from how many tokens KHA helps."""
    from .tables import GridResults, crossover

    g = GridResults(root, level)
    curves = {v["arm"] if len(g.groups) == 1 else f"{v['group']} {v['arm']}": g.delta_curve(v["name"])
              for v in g.variants if v["arm"] != "baseline"}
    curves = {k: c for k, c in curves.items() if c}
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for i, (label, curve) in enumerate(curves.items()):
        tokens = [t / 1e6 for t, _ in curve]
        n = max(s.n for _, s in curve)
        ax.plot(tokens, [s.mean for _, s in curve], "o-", color=f"C{i}", markersize=3, label=f"{label} (n={n})")
        band = [(t, s.lo, s.hi) for t, (_, s) in zip(tokens, curve, strict=True) if s.lo is not None]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=f"C{i}",
                            alpha=0.15, linewidth=0)
        cross = crossover(curve)
        if cross is not None:
            ax.axvline(cross / 1e6, color=f"C{i}", linestyle=":", linewidth=1)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("ΔL = val loss - baseline's (paired by seed)")
    ax.set_title(f"{g.meta['grid']}: paired ΔL against tokens, mean and {100 * level:g} % t band; "
                 "dotted: below 0 from here on", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_png or Path(root) / "deltas_vs_tokens.png")


def plot_run_knocks(run_dir: Path, out_dir: Path, name: str = "") -> list[Path]:
    """``[NAME_]knocks.png`` (heatmaps) and ``[NAME_]knock_movement.png`` of one run; none without knocks."""
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
    return [plot_knock_heatmaps(knocks, Path(out_dir) / f"{prefix}knocks.png",
                                f"{title}: knock matrices (clipped to [0, 1]; W_gate unclipped)"),
            plot_knock_movement(knock_stats_over_steps(run_dir), Path(out_dir) / f"{prefix}knock_movement.png",
                                f"{title}: how far the knocks moved from their init")]


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
