"""The learned knock matrices of a run (paper Fig. 3) and how far training moved them from their init.

- :func:`load_knocks`: ``{(layer, target, param): matrix}`` from a run's ``model.safetensors`` (keys
  ``layers.{i}.attn.knocks.{q|k|v}.{weight|w_up|w_gate|w_down}``) or from a training checkpoint folder.
- :func:`knock_stats`: per matrix, the share of its absolute mass on the diagonal
  (``sum |diag| / sum |W|``; an identity gives 1, off-diagonal 0), the mean diagonal value, and the distance
  from its init (``||W - W_0||_F``; ``W_0`` identity, zero for ``w_gate``).
- :func:`knock_stats_over_steps`: the same for every checkpoint kept in ``run/checkpoints`` plus the final
  weights (only ``keep_checkpoints`` checkpoints survive a run; raise it to follow more steps).
- :func:`plot_knock_heatmaps`: layers x matrices, each as ``W - init`` on a diverging scale per layer;
  :func:`plot_knock_movement`: off-diagonal share and distance from init per layer (and over steps).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .plots import save_figure

KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.attn\.knocks\.([qkv])\.(weight|w_up|w_gate|w_down)$")
PARAM_ORDER = {"weight": 0, "w_up": 1, "w_gate": 2, "w_down": 3}
LABELS = {"weight": "T^{}", "w_up": "W_up ({})", "w_gate": "W_gate ({})", "w_down": "W_down ({})"}


def label(target: str, param: str) -> str:
    return LABELS[param].format(target.upper())


def _sort_key(key: tuple[int, str, str]):
    layer, target, param = key
    return layer, "qkv".index(target), PARAM_ORDER[param]


def knocks_from_state(state: dict[str, torch.Tensor]) -> dict[tuple[int, str, str], torch.Tensor]:
    found = {}
    for name, tensor in state.items():
        m = KEY.search(name)
        if m:
            found[(int(m.group(1)), m.group(2), m.group(3))] = tensor.detach().float().cpu()
    return dict(sorted(found.items(), key=lambda kv: _sort_key(kv[0])))


def load_knocks(path: Path) -> dict[tuple[int, str, str], torch.Tensor]:
    """Knock matrices from ``model.safetensors`` or ``knocks.safetensors`` (a file or a run directory) or a
    training checkpoint folder."""
    path = Path(path)
    final = final_weights_file(path) if path.is_dir() else None
    if final is not None:
        path = final
    if path.is_file():
        from safetensors.torch import load_file

        return knocks_from_state(load_file(str(path)))
    return _load_checkpoint_knocks(path)


def final_weights_file(run_dir: Path) -> Path | None:
    """A run's final weights: ``model.safetensors``, else ``knocks.safetensors`` (all a committed study keeps)."""
    for name in ("model.safetensors", "knocks.safetensors"):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def _load_checkpoint_knocks(ckpt: Path) -> dict[tuple[int, str, str], torch.Tensor]:
    """The knock tensors of a training checkpoint folder (safetensors shards, no pickle)."""
    from ..train.checkpoint import read_model_state

    return knocks_from_state(read_model_state(ckpt))


def knock_init(param: str, w: torch.Tensor) -> torch.Tensor:
    """A knock matrix's init: the identity for the parameters a knock class names in ``identity_init``, else
    zero (``w_gate``)."""
    from ..knock import KNOCK_CLASSES

    identity = {name for cls in KNOCK_CLASSES.values() for name in cls.identity_init}
    return torch.eye(w.shape[0], dtype=w.dtype) if param in identity else torch.zeros_like(w)


def knock_stats(knocks: dict[tuple[int, str, str], torch.Tensor]) -> list[dict]:
    """One record per matrix: layer, target, param, diag_share, offdiag_share, diag_mean, moved."""
    rows = []
    for (layer, target, param), w in knocks.items():
        w = w.double()
        mass = w.abs().sum().item()
        diag = w.diagonal().abs().sum().item()
        share = diag / mass if mass > 0 else float("nan")
        init = knock_init(param, w)
        rows.append({"layer": layer, "target": target, "param": param, "diag_share": share,
                     "offdiag_share": 1 - share, "diag_mean": w.diagonal().mean().item(),
                     "moved": torch.linalg.matrix_norm(w - init).item()})
    return rows


def knock_stats_over_steps(run_dir: Path) -> dict[int, list[dict]]:
    """``{step: knock_stats}`` for each surviving checkpoint and the final weights (under the last step)."""
    from ..train.callbacks import read_metrics
    from ..train.checkpoint import step_dirs

    run_dir = Path(run_dir)
    out = {}
    for ckpt in step_dirs(run_dir / "checkpoints"):
        if (ckpt / "meta.json").exists():
            out[int(ckpt.name.removeprefix("step_"))] = knock_stats(load_knocks(ckpt))
    if final_weights_file(run_dir) is not None:
        records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
        out[records[-1]["step"] if records else -1] = knock_stats(load_knocks(run_dir))
    return dict(sorted(out.items()))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_knock_heatmaps(knocks: dict[tuple[int, str, str], torch.Tensor], out_png: Path, title: str = "") -> Path:
    """Rows: layers; columns: each knock matrix (T^Q, T^K, T^V, W_up, W_gate, W_down of each target).

    Each drawn as its movement from the init, ``W - init`` (``W - I``; ``W_gate`` itself), on a symmetric
    diverging scale shared by the row, one colourbar per row: drawn as ``W`` the small movements the tables
    measure would be invisible beside the identity's 1s.
    """
    plt = _plt()
    layers = sorted({k[0] for k in knocks})
    columns = sorted({k[1:] for k in knocks}, key=lambda c: ("qkv".index(c[0]), PARAM_ORDER[c[1]]))
    if not columns:
        raise ValueError("no knock matrices found (a baseline run?)")
    fig, axes = plt.subplots(len(layers), len(columns), figsize=(1.9 * len(columns) + 1.2, 1.8 * len(layers) + 0.8),
                             dpi=110, squeeze=False, layout="constrained")
    for r, layer in enumerate(layers):
        moved = [(knocks[(layer, *column)] - knock_init(column[1], knocks[(layer, *column)])).numpy()
                 for column in columns]
        lim = max(max(abs(m).max() for m in moved), 1e-8)
        for c, ((target, param), m) in enumerate(zip(columns, moved, strict=True)):
            ax = axes[r][c]
            im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label(target, param), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
        fig.colorbar(im, ax=list(axes[r]), fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    fig.suptitle(title or "knock matrices, W - init (W - I; W_gate: W)", fontsize=10)
    return save_figure(fig, out_png)


def plot_knock_movement(stats: dict[int, list[dict]] | list[dict], out_png: Path, title: str = "") -> Path:
    """Per matrix kind: off-diagonal share of |W| and ||W - W_0||_F by layer; one line per step if given."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    by_step = stats if isinstance(stats, dict) else {None: stats}
    kinds = sorted({(r["target"], r["param"]) for rows in by_step.values() for r in rows},
                   key=lambda c: ("qkv".index(c[0]), PARAM_ORDER[c[1]]))
    fig, (ax_off, ax_moved) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    steps = list(by_step)
    for i, kind in enumerate(kinds):
        for j, step in enumerate(steps):
            rows = sorted((r for r in by_step[step] if (r["target"], r["param"]) == kind), key=lambda r: r["layer"])
            xs = [r["layer"] for r in rows]
            last = j == len(steps) - 1
            lab = label(*kind) + ("" if step is None else f" step {step}") if last or len(steps) == 1 else None
            style = dict(color=f"C{i}", alpha=0.35 + 0.65 * (j + 1) / len(steps), marker="o", markersize=3,
                         linewidth=1.6 if last else 0.9)
            ax_off.plot(xs, [r["offdiag_share"] for r in rows], label=lab, **style)
            ax_moved.plot(xs, [r["moved"] for r in rows], **style)
    ax_off.set_ylabel("off-diagonal share of sum |W|")
    ax_moved.set_ylabel("||W - W_init||_F")
    for ax in (ax_off, ax_moved):
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_off.legend(fontsize=7)
    if len(steps) > 1:
        ax_moved.set_title(f"faint to solid: steps {steps[0]} .. {steps[-1]}", fontsize=8)
    fig.suptitle(title or "how far the knocks moved from their init", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_png)
