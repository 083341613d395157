"""What the plots draw, checked on their matplotlib artists (not pixels): the smoothing, the legend, the
y-range, the difference panel, the knock heatmaps' data and colour scales, the token axis."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.collections import PolyCollection

from kha.analysis import knocks as knocks_module
from kha.analysis import plots
from kha.analysis.tables import GridResults, fmt_tokens, grid_report
from kha.experiments import grid_variants, run_config, write_grid_file
from kha.train import TrainConfig
from kha.train.loop import build_model_config


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would write, kept open instead (``save_figure`` as both modules call it)."""
    kept = []

    def keep(fig, out_png):
        kept.append(fig)
        return Path(out_png)

    monkeypatch.setattr(plots, "save_figure", keep)
    monkeypatch.setattr(knocks_module, "save_figure", keep)
    yield kept
    import matplotlib.pyplot as plt

    for fig in kept:
        plt.close(fig)


def test_smoothing_follows_a_step_without_lag():
    """A constant loss then a step: the first points equal the constant exactly (no lag toward an initial 0
    or excess weight on the first value); after the step, the share of the old level left is the
    bias-corrected EMA's (beta^k - beta^t) / (1 - beta^t) (k steps after the step, t in all), so the curve is
    within 1 % of the jump 44 steps after it (0.9^44 < 0.01 < 0.9^43) and not before."""
    beta, before, after = 0.9, 5.0, 3.0
    losses = [before] * 50 + [after] * 100
    smoothed = plots._smooth(losses, beta)
    assert smoothed[:50] == [before] * 50
    for k in range(1, 101):
        t = 50 + k
        left = (beta**k - beta**t) / (1 - beta**t)
        assert smoothed[t - 1] == pytest.approx(after + left * (before - after), abs=1e-12)
    within = [abs(v - after) <= 0.01 * (before - after) for v in smoothed[50:]]
    assert within.index(True) + 1 == math.ceil(math.log(0.01) / math.log(beta)) == 44
    assert all(within[43:])


def write_run(run_dir: Path, losses: list[float], every: int = 10, spikes=(), tokens_per_step: int = 100) -> None:
    """A run's metrics: training loss each step, validation loss (the training loss + 0.1) every ``every``."""
    run_dir.mkdir(parents=True)
    records = []
    for step, loss in enumerate(losses, 1):
        r = {"step": step, "tokens": tokens_per_step * step, "loss": loss}
        if step % every == 0:
            r["val_loss"] = loss + 0.1
        if step in spikes:
            r["spike"] = True
        records.append(r)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def falling(offset: float, steps: int = 200) -> list[float]:
    """A loss falling fast from about 10 to 3 (+ offset), the shape of every run's first steps."""
    return [3.0 + offset + 7.0 * math.exp(-step / 5) for step in range(1, steps + 1)]


def signature(line):
    return (line.get_color(), line.get_linestyle(), line.get_marker(), line.get_linewidth(), line.get_alpha())


def assert_every_artist_in_legend(ax):
    """Every line drawn has a legend entry: its own label, or (another seed of a label) a labelled line drawn
    alike; every filled band is labelled; and every label is in the legend."""
    legend = ax.get_legend()
    assert legend is not None
    entries = {t.get_text() for t in legend.get_texts()}
    labelled = {signature(line): line.get_label() for line in ax.lines if not line.get_label().startswith("_")}
    for line in ax.lines:
        assert signature(line) in labelled, f"a line with no legend entry: {signature(line)}"
        assert labelled[signature(line)] in entries
    for band in (c for c in ax.collections if isinstance(c, PolyCollection)):
        assert band.get_label() in entries


def test_loss_curves_show_every_variant_and_small_differences(tmp_path, figures):
    """Three labels (two seeds each) whose losses fall from 10 to about 3, the second 0.01 and the third 0.02
    below the first: every line (raw and spike marks included) has a legend entry; later labels are drawn on
    top with thinner EMA lines (none hides another); the y-range covers the later part, in which 0.01 is at
    least 5 % of the axis (the first drop is above it); the second panel draws each label's difference to
    the first, -0.01 and -0.02 exactly (EMA and validation), at every step."""
    runs = {}
    for i, label in enumerate(("baseline", "kha-a", "kha-b")):
        runs[label] = []
        for seed in (0, 1):
            run = tmp_path / label / f"seed_{seed}"
            write_run(run, [x + 0.05 * seed for x in falling(-0.01 * i)], spikes=(120,) if i == 1 else ())
            runs[label].append(run)
    plots.plot_loss_curves(runs, tmp_path / "curves.png", title="study: baseline vs kha-a vs kha-b")
    (fig,) = figures
    ax, ax_diff = fig.axes
    for a in (ax, ax_diff):
        assert_every_artist_in_legend(a)
    entries = {t.get_text() for t in ax.get_legend().get_texts()}
    assert {"baseline (train, raw, 2 seeds)", "kha-a (loss spikes)", "kha-b (validation)"} <= entries
    ema = sorted((line for line in ax.lines if "EMA" in line.get_label()), key=lambda line: line.get_zorder())
    assert [line.get_label().split(" ")[0] for line in ema] == ["baseline", "kha-a", "kha-b"]
    widths = [line.get_linewidth() for line in ema]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3
    low, high = ax.get_ylim()
    assert 0.01 >= 0.05 * (high - low) and high < 9.0
    for label, offset in (("kha-a", -0.01), ("kha-b", -0.02)):
        for kind, steps in (("train EMA", 200), ("validation", 20)):
            (line,) = [line for line in ax_diff.lines if line.get_label() == f"{label} - baseline ({kind})"]
            assert len(line.get_xdata()) == steps
            np.testing.assert_allclose(line.get_ydata(), offset, atol=1e-9)


def test_single_run_curve(tmp_path, figures):
    """One run: one panel, the smoothed line starts at the first loss, the legend names all four kinds; a
    spike far above the y-range (loss 20 at step 155) is marked on the range's top edge, one within it at
    its loss."""
    losses = falling(0.0)
    losses[154] = 20.0
    write_run(tmp_path / "run", losses, spikes=(100, 155))
    plots.plot_loss_curves({"run": tmp_path / "run"}, tmp_path / "curves.png")
    (fig,) = figures
    (ax,) = fig.axes
    assert_every_artist_in_legend(ax)
    (ema,) = [line for line in ax.lines if "EMA" in line.get_label()]
    assert ema.get_ydata()[0] == losses[0]
    (spikes,) = [line for line in ax.lines if line.get_label() == "run (loss spikes)"]
    assert list(spikes.get_xdata()) == [100, 155]
    assert list(spikes.get_ydata()) == [losses[99], ax.get_ylim()[1]]


def fake_study(root: Path, finals: dict[str, list[float]], tokens_per_step: int) -> None:
    """A finished study grid: per variant and seed, validation losses at 4 steps ending at ``finals``."""
    base = TrainConfig(steps=4, batch_size=10, seq_len=10, progress=False)
    variants = [v for v in grid_variants("study") if v.name in finals]
    write_grid_file(root, "study", variants, [0, 1, 2], base)
    for v in variants:
        for seed, final in enumerate(finals[v.name]):
            cfg = run_config(base, v, seed, root)
            losses = [5.0 + 0.01 * seed, 4.0 + 0.02 * seed, 3.5 - 0.03 * seed, final]
            out = Path(cfg.out)
            write_run(out, [x - 0.1 for x in losses], every=1, tokens_per_step=tokens_per_step)
            (out / "train_config.json").write_text(json.dumps(cfg.to_dict()))
            (out / "model_config.json").write_text(json.dumps(asdict(build_model_config(cfg, 512))))


@pytest.mark.parametrize("tokens_per_step, unit, crossing", [(100, "", "300"), (12_800, "thousands", "38.4K"),
                                                             (2_000_000, "millions", "6M")])
def test_deltas_against_tokens_at_every_scale(tmp_path, figures, tokens_per_step, unit, crossing):
    """``deltas_vs_tokens.png``: tokens in the unit that fits (none below 1,000, K, M); the dotted line it
    draws where ΔL's interval stays below 0 (evaluation 3 here, by construction) is in the legend with the
    crossing point; every line and band has a legend entry. The report's tokens column uses the same
    units."""
    fake_study(tmp_path, {"baseline": [3.0, 3.1, 3.2], "mlp-v": [2.95, 3.04, 3.13]}, tokens_per_step)
    # mlp-v - baseline per seed: 0 at evaluations 1-2; -0.05, -0.06, -0.07 at 3 (from 3.5 - 0.03 s) and 4
    for seed in range(3):
        path = tmp_path / "runs" / "mlp-v" / f"seed_{seed}" / "metrics.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        records[2]["val_loss"] -= 0.05 + 0.01 * seed
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plots.plot_delta_curves(tmp_path)
    (fig,) = figures
    (ax,) = fig.axes
    assert_every_artist_in_legend(ax)
    assert ax.get_xlabel() == (f"tokens seen ({unit})" if unit else "tokens seen")
    (dotted,) = [line for line in ax.lines if line.get_linestyle() == ":"]
    scale = {"": 1, "thousands": 1e3, "millions": 1e6}[unit]
    assert dotted.get_xdata()[0] == pytest.approx(3 * tokens_per_step / scale)
    assert dotted.get_label() == f"KHA-MLP: below 0 from {crossing} tokens on"
    assert "dotted" not in ax.get_title()
    assert f"| **below 0 from** | {crossing} |" in grid_report(tmp_path)
    assert f"| {fmt_tokens(tokens_per_step)} |" in grid_report(tmp_path)


def test_deltas_against_tokens_scale_ignores_the_band_of_an_arm_of_two_seeds(tmp_path, figures):
    """A 2-seed arm's t band (t(1) = 12.7 sd) would set the y-range; it is drawn, but the range holds every mean
    and only the bands of arms of 3 or more seeds."""
    fake_study(tmp_path, {"baseline": [3.0, 3.1, 3.2], "mlp-v": [2.95, 3.04, 3.13], "linear-qkv": [3.0, 2.8]}, 100)
    plots.plot_delta_curves(tmp_path)
    (fig,) = figures
    (ax,) = fig.axes
    assert_every_artist_in_legend(ax)
    g = GridResults(tmp_path)
    wide, narrow = g.delta_curve("linear-qkv"), g.delta_curve("mlp-v")
    low, high = ax.get_ylim()
    assert all(low < s.mean < high for curve in (wide, narrow) for _, s in curve)
    assert all(low <= s.lo and s.hi <= high for _, s in narrow)
    assert min(s.lo for _, s in wide) < low and max(s.hi for _, s in wide) > high  # clipped: 12.7 x 0.14 = 1.8
    assert len([c for c in ax.collections if "t band" in c.get_label()]) == 2


def test_token_counts_read_in_k_m_b():
    assert [fmt_tokens(n) for n in (300, 12_800, 999_999, 1_500_000, 2_048_000_000)] == [
        "300", "12.8K", "1000K", "1.5M", "2.048B"]


def test_study_figure_title_names_the_study_once(tmp_path, figures):
    fake_study(tmp_path, {"baseline": [3.0, 3.1, 3.2], "mlp-v": [2.95, 3.04, 3.13]}, 100)
    plots.plot_grid_curves(tmp_path)
    (fig,) = figures
    assert fig.axes[0].get_title() == "study: baseline vs KHA-MLP"


def test_knock_heatmaps_show_the_movement_from_init(tmp_path, figures):
    """Each image's data is W - I (W_gate: W, its init being 0), not clipped; each row (layer) shares one
    symmetric diverging scale, the row's largest movement, and has one colourbar."""
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(8)
    knocks = {}
    for layer in (0, 1):
        scale = 0.01 * (layer + 1)  # rows with different scales
        knocks[(layer, "v", "w_up")] = eye + scale * torch.randn(8, 8, generator=g)
        knocks[(layer, "v", "w_gate")] = scale * torch.randn(8, 8, generator=g)
        knocks[(layer, "v", "w_down")] = eye + 3 * scale * torch.randn(8, 8, generator=g)
    knocks_module.plot_knock_heatmaps(knocks, tmp_path / "knocks.png")
    (fig,) = figures
    images = [ax for ax in fig.axes if ax.images]
    colorbars = [ax for ax in fig.axes if not ax.images]
    assert len(images) == 6 and len(colorbars) == 2
    for i, ax in enumerate(images):
        layer, param = divmod(i, 3)
        key = (layer, "v", ("w_up", "w_gate", "w_down")[param])
        w = knocks[key]
        expected = (w if key[2] == "w_gate" else w - eye).numpy()
        (image,) = ax.images
        np.testing.assert_array_equal(image.get_array(), expected)
        row_max = max((knocks[(layer, "v", p)] - (0 if p == "w_gate" else eye)).abs().max().item()
                      for p in ("w_up", "w_gate", "w_down"))
        assert image.norm.vmin == -image.norm.vmax == pytest.approx(-row_max)
        assert image.get_cmap().name == "RdBu_r"
