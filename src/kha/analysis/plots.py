"""Loss curves of several runs on one figure (paper Fig. 1/2 style), loss spikes marked."""

from __future__ import annotations

from pathlib import Path

from ..train.callbacks import read_metrics


def _smooth(values: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * acc + (1 - alpha) * v
        out.append(acc)
    return out


def plot_loss_curves(runs: dict[str, Path], out_png: Path, smooth: float = 0.9) -> Path:
    """Training loss (EMA-smoothed, raw in light), validation loss (dots) and spikes (x) per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for i, (label, run_dir) in enumerate(runs.items()):
        records = read_metrics(Path(run_dir) / "metrics.jsonl")
        color = f"C{i}"
        steps = [r["step"] for r in records]
        losses = [r["loss"] for r in records]
        ax.plot(steps, losses, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(steps, _smooth(losses, smooth), color=color, linewidth=1.6, label=f"{label} (train, EMA)")
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax.plot(*zip(*val, strict=True), "o--", color=color, markersize=4, linewidth=1,
                    label=f"{label} (validation)")
        spikes = [(r["step"], r["loss"]) for r in records if r.get("spike")]
        if spikes:
            ax.plot(*zip(*spikes, strict=True), "x", color=color, markersize=8, label=f"{label} spikes")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
