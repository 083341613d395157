"""Ablation grids (kha ablate), their statistics and report, and the plots.

Grid definitions against the paper's tables; a 2-variant x 2-seed mini grid that runs, is skipped when
finished and resumed when interrupted; the report's paired ΔL against a hand computation from the metrics
files; t quantiles and intervals against known values; knock statistics against direct computations.
"""

import argparse
import json
import math
import shutil
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kha.analysis.knocks import knock_stats, knocks_from_state, load_knocks
from kha.analysis.plots import _grid_runs, plot_dir
from kha.analysis.tables import (
    chi2_cdf,
    chi2_quantile,
    grid_report,
    load_grid,
    paired_delta,
    paired_sd_ratio,
    sd_upper_bound,
    seeds_for_half_width,
    signed_rank_interval,
    summarize,
    t_quantile,
    welch_difference,
    write_report,
)
from kha.config import get_preset
from kha.errors import UserError
from kha.experiments import (
    _check_same_config,
    add_experiment_parsers,
    grid_jobs,
    grid_variants,
    merge_grid,
    run_config,
    run_grid,
    write_grid_file,
)
from kha.model import DecoderLM
from kha.train import TrainConfig, train
from kha.train.callbacks import read_metrics
from kha.train.config import base_model_config, parse_train_args
from kha.train.loop import build_model_config

# ------------------------------------------------------------------------------------------ statistics


def test_t_quantiles_match_tables():
    # two-sided 95 % critical values of Student's t (any statistics table), and the 90 % one at df 5
    known = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423, 100: 1.9840}
    for df, t in known.items():
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4), df
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    assert t_quantile(0.025, 2) == pytest.approx(-4.3027, abs=1e-4)
    assert t_quantile(0.975, 10_000) == pytest.approx(1.9602, abs=1e-4)  # -> the normal's 1.95996


def test_summary_and_paired_delta_by_hand():
    s = summarize([1, 2, 3, 4, 5])
    # mean 3, sd sqrt(2.5) = 1.5811, half-width t(0.975, 4) * sd / sqrt(5) = 2.7764 * 0.70711 = 1.9632
    assert (s.n, s.mean) == (5, 3) and s.sd == pytest.approx(1.58114, abs=1e-5)
    assert (s.lo, s.hi) == pytest.approx((1.03676, 4.96324), abs=1e-4)
    base = {0: 2.00, 1: 2.10, 2: 1.95, 7: 3.0}  # seed 7 has no partner: left out
    kha = {0: 1.98, 1: 2.07, 2: 1.94}
    d = paired_delta(kha, base)
    # differences -0.02, -0.03, -0.01: mean -0.02, sd 0.01, half-width 4.3027 * 0.01 / sqrt(3) = 0.024842
    assert d.n == 3 and d.mean == pytest.approx(-0.02) and d.sd == pytest.approx(0.01)
    assert (d.lo, d.hi) == pytest.approx((-0.044842, 0.004842), abs=1e-6) and not d.excludes_zero
    one = summarize([1.5])
    assert (one.n, one.mean, one.sd, one.lo) == (1, 1.5, None, None)
    assert summarize([]) is None


# ------------------------------------------------------------------------------------------ grids


def _model(variant, preset="tiny"):
    return base_model_config(run_config(TrainConfig(preset=preset), variant, 0, Path("x")))


def test_grid_definitions_match_the_papers_tables():
    t1 = grid_variants("table1")
    assert len(t1) == 18
    for v in t1:
        cfg = _model(v)
        kv = int(v.group.removeprefix("kv"))
        assert (cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.attention.head_dim) == (32, kv, 16)
        assert (v.arm, cfg.attention.knock, cfg.attention.knock_targets) in {
            ("baseline", "none", ()), ("KHA-MLP", "mlp", ("v",)), ("KHA-Linear", "linear", ("q", "k", "v"))}
    assert sorted({int(v.group[2:]) for v in t1}) == [1, 2, 4, 8, 16, 32]

    t2 = grid_variants("table2")
    assert [v.name for v in t2] == ["baseline", "linear-q", "linear-k", "linear-v", "linear-qkv", "mlp-q", "mlp-k",
                                    "mlp-v", "mlp-qkv", "gate-v"]
    settings = [(_model(v).attention.knock, _model(v).attention.knock_targets) for v in t2]
    assert settings == [("none", ()), ("linear", ("q",)), ("linear", ("k",)), ("linear", ("v",)),
                        ("linear", ("q", "k", "v")), ("mlp", ("q",)), ("mlp", ("k",)), ("mlp", ("v",)),
                        ("mlp", ("q", "k", "v")), ("gate", ("v",))]
    assert all(_model(v).attention.n_kv_heads == 4 for v in t2)

    t3 = {v.name: _model(v).attention for v in grid_variants("table3")}
    shapes = {n: (a.variant, a.n_heads, a.n_kv_heads, a.head_dim, a.knock) for n, a in t3.items()}
    assert shapes == {
        "mla-baseline": ("mla", 32, 32, 16, "none"), "mla-linear": ("mla", 32, 32, 16, "linear"),
        "gta-baseline": ("gta", 32, 4, 16, "none"), "gta-mlp": ("gta", 32, 4, 16, "mlp"),
        "mqa-baseline": ("gqa", 32, 1, 16, "none"), "mqa-mlp": ("gqa", 32, 1, 16, "mlp"),
        "gqa8x16-baseline": ("gqa", 16, 8, 16, "none"), "gqa8x16-mlp": ("gqa", 16, 8, 16, "mlp"),
        "gqa4x32-baseline": ("gqa", 32, 4, 16, "none"), "gqa4x32-mlp": ("gqa", 32, 4, 16, "mlp"),
        "mha16-baseline": ("gqa", 16, 16, 16, "none"), "mha16-mlp": ("gqa", 16, 16, 16, "mlp")}
    mla = t3["mla-linear"]  # mla-a0.8b's 512 / 64 / 1024 at head_dim 128 -> 64 / 8 / 128 at 16
    assert (mla.kv_lora_rank, mla.rope_head_dim, mla.q_lora_rank, mla.d_model) == (64, 8, 128, 128)

    t5 = grid_variants("table5", preset="tiny")
    assert len(t5) == 18 and {v.arm for v in t5} == {"baseline", "KHA-MLP", "KHA-Linear"}
    shapes = {}
    for v in t5:
        cfg = _model(v)
        assert (cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.attention.head_dim) == (32, 4, 16)
        shapes[v.group] = (cfg.n_layers, cfg.d_model, cfg.moe.d_expert if cfg.moe else cfg.d_ff)
    assert shapes == {"moe-s": (3, 96, 64), "moe-m": (4, 128, 96), "moe-l": (5, 192, 128),
                      "dense-s": (4, 96, 288), "dense-m": (4, 128, 384), "dense-l": (6, 192, 736)}
    assert _model(t5[3]) == get_preset("tiny-moe")  # moe-m baseline is tiny-moe itself
    with pytest.raises(ValueError, match="unknown variant"):
        grid_variants("table2", only=["mlp-x"])


def test_model_overrides_in_train_config(tmp_path):
    cfg = TrainConfig(model_overrides={"attention": {"n_kv_heads": 8}, "n_layers": 2})
    model = base_model_config(cfg)
    assert (model.attention.n_kv_heads, model.n_layers, model.attention.n_heads) == (8, 2, 32)
    with pytest.raises(ValueError, match="unknown model override 'n_kv_heads'"):
        TrainConfig(model_overrides={"n_kv_heads": 8})
    with pytest.raises(ValueError, match="MLA supports knock='linear' or 'none' only"):
        TrainConfig(knock="mlp", model_overrides={"attention": {"variant": "mla"}})
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 5\nmodel_overrides = { attention = { n_kv_heads = 2 } }\n')
    parsed = parse_train_args(["--config", str(toml), "--steps", "7"])
    assert parsed.steps == 7 and base_model_config(parsed).attention.n_kv_heads == 2
    assert parse_train_args([]).model_overrides is None


# ------------------------------------------------------------------------------------------ a mini grid


class Crash(RuntimeError):
    pass


def test_mini_grid_runs_skips_resumes_and_reports(data_dir, tmp_path, monkeypatch):
    import kha.train.loop as loop

    base = TrainConfig(data=str(data_dir), seq_len=16, batch_size=2, steps=3, eval_every=3, eval_batches=2,
                       ckpt_every=1, lr=3e-3, progress=False)
    root, only = tmp_path / "grid", ["baseline", "mlp-v"]

    class CrashingLog(loop.MetricsLog):  # the last run dies at step 3, after the step-2 checkpoint
        def write(self, record):
            if record["step"] == 3 and "mlp-v/seed_1" in str(self.path):
                raise Crash("killed")
            super().write(record)

    original = loop.MetricsLog
    monkeypatch.setattr(loop, "MetricsLog", CrashingLog)
    lines = []
    with pytest.raises(Crash):
        run_grid("table2", root, 2, base, only, log=lines.append)
    assert [line.split(": ")[-1] for line in lines if "[" in line and "done" not in line] == ["started"] * 4
    assert lines[0].startswith("[1/4] table2 baseline seed 0")
    monkeypatch.setattr(loop, "MetricsLog", original)

    lines.clear()
    states = run_grid("table2", root, 2, base, only, log=lines.append)
    assert [s["state"] for s in states] == ["finished", "finished", "finished", "partial"]
    assert "[4/4] table2 mlp-v seed 1: resumed from step 2" in lines
    # the resumed run equals the same run uninterrupted (bit for bit on CPU)
    resumed = root / "runs" / "mlp-v" / "seed_1"
    reference = train(run_config(base, grid_variants("table2", only=["mlp-v"])[0], 1, tmp_path / "ref"))
    assert [r["loss"] for r in read_metrics(resumed / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(tmp_path / "ref" / "runs" / "mlp-v" / "seed_1" / "metrics.jsonl")]
    assert read_metrics(resumed / "metrics.jsonl")[-1]["val_loss"] == reference["val_loss"]

    lines.clear()
    assert [s["state"] for s in run_grid("table2", root, 2, base, only, log=lines.append)] == ["finished"] * 4
    assert all(line.endswith("finished, skipped") for line in lines)
    # a copy as a study is committed (no weights, no checkpoints): still finished, its record left as it is
    committed = tmp_path / "committed"
    shutil.copytree(root, committed, ignore=shutil.ignore_patterns("model.safetensors", "checkpoints"))
    kept = {run: (run / "metrics.jsonl").read_bytes() for run in (committed / "runs").glob("*/seed_*")}
    assert len(kept) == 4
    assert [s["state"] for s in run_grid("table2", committed, 2, base, only, log=lines.append)] == ["finished"] * 4
    assert {run: (run / "metrics.jsonl").read_bytes() for run in kept} == kept
    with pytest.raises(ValueError, match=r"another config \(steps: 3 -> 4\)"):
        run_grid("table2", root, 2, TrainConfig(**{**asdict(base), "steps": 4}), only, log=lines.append)

    # paired design: same seed -> same first loss (same base weights, same batch, knocks at identity)
    first = {(v, s): read_metrics(root / "runs" / v / f"seed_{s}" / "metrics.jsonl")[0]["loss"]
             for v in only for s in (0, 1)}
    assert first["baseline", 0] == first["mlp-v", 0] and first["baseline", 1] == first["mlp-v", 1]
    assert first["baseline", 0] != first["baseline", 1]

    # the report's paired ΔL by hand from the metrics files
    final = {(v, s): read_metrics(root / "runs" / v / f"seed_{s}" / "metrics.jsonl")[-1]["val_loss"]
             for v in only for s in (0, 1)}
    diffs = [final["mlp-v", s] - final["baseline", s] for s in (0, 1)]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = 12.7062 * sd / math.sqrt(2)  # t(0.975, df=1)
    report = write_report(root).read_text()
    cell = f"{mean:+.4f} ± {sd:.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
    assert cell in report, (cell, report)
    base_losses = [final["baseline", s] for s in (0, 1)]
    assert f"{statistics.mean(base_losses):.3f} ± {statistics.stdev(base_losses):.3f}" in report
    assert f"{final['mlp-v', 1]:.4f}" in report  # per-seed table
    assert "counted under each): cpu: 4." in report  # mlp-v seed 1 was resumed, on the same device

    # plots: curves, deltas, knock heatmaps and movement (mlp-v only; the baseline has no knocks)
    written = plot_dir(root)
    names = sorted(p.name for p in written)
    assert names == ["curves_all.png", "deltas.png", "deltas_vs_tokens.png", "mlp-v_seed_0_knock_movement.png",
                     "mlp-v_seed_0_knocks.png"]
    assert all(p.stat().st_size > 1000 for p in written)
    # on the committed copy: knock heatmaps from knocks.safetensors; without checkpoints no movement is drawn,
    # and the committed movement figure stays as it was
    movement = root / "mlp-v_seed_0_knock_movement.png"
    shutil.copy(movement, committed / movement.name)
    names = sorted(p.name for p in plot_dir(committed))
    assert names == ["curves_all.png", "deltas.png", "deltas_vs_tokens.png", "mlp-v_seed_0_knocks.png"]
    assert (committed / movement.name).read_bytes() == movement.read_bytes()

    # knock statistics from the weights file against a direct computation; the DCP checkpoint of the last
    # step holds the same knocks as model.safetensors
    run = root / "runs" / "mlp-v" / "seed_0"
    state = load_file(run / "model.safetensors")
    w = state["layers.1.attn.knocks.v.w_up"].double()
    row = next(r for r in knock_stats(load_knocks(run)) if (r["layer"], r["param"]) == (1, "w_up"))
    assert row["diag_share"] == pytest.approx((w.diagonal().abs().sum() / w.abs().sum()).item(), rel=1e-12)
    assert row["moved"] == pytest.approx(torch.linalg.matrix_norm(w - torch.eye(16, dtype=w.dtype)).item())
    assert row["moved"] > 0  # three AdamW steps moved it
    from_ckpt = load_knocks(run / "checkpoints" / "step_0000003")
    assert from_ckpt.keys() == load_knocks(run).keys()
    assert all(torch.equal(from_ckpt[k], load_knocks(run)[k]) for k in from_ckpt)
    # the report's knock table: the mean over layers and both seeds of what knock_stats gives per matrix
    rows = [r for s in (0, 1) for r in knock_stats(load_knocks(root / "runs" / "mlp-v" / f"seed_{s}"))
            if r["param"] == "w_up"]
    moved, share = (statistics.mean(r[k] for r in rows) for k in ("moved", "diag_share"))
    assert f"| mlp-v | v | w_up | {moved:.3f} | {share:.3f} | 2 |" in report


# ------------------------------------------------------------------------------------------ report layout


def _fake_grid(root: Path, grid: str, seeds=(0, 1, 2)) -> dict:
    """Runs that look finished (metrics and configs, as a committed study keeps them), losses set by a formula."""
    base = TrainConfig(steps=4, progress=False)
    variants = grid_variants(grid, base.preset)
    write_grid_file(root, grid, variants, list(seeds), base)
    losses = {}
    for i, v in enumerate(variants):
        for s in seeds:
            cfg = run_config(base, v, s, root)
            out = Path(cfg.out)
            out.mkdir(parents=True)
            (out / "train_config.json").write_text(json.dumps(cfg.to_dict()))
            (out / "model_config.json").write_text(json.dumps(asdict(build_model_config(cfg, 512))))
            loss = 3.0 + 0.01 * s + (0.0 if v.arm == "baseline" else -0.001 * (i % 3 + 1) * (s + 1))
            losses[v.name, s] = loss
            records = [{"step": k, "loss": 4.0, "spike": k == 2 and s == 0} for k in range(1, 5)]
            records[-1]["val_loss"] = loss
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return losses


def _truncate(metrics: Path, lines: int) -> None:
    """A run in flight: its metrics stop early (no model_config.json yet)."""
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:lines]))
    (metrics.parent / "model_config.json").unlink()


def test_merge_grid_copies_finished_runs_never_over_a_run_here(tmp_path, capsys):
    """A grid trained elsewhere merges in: its finished runs that this folder lacks are copied byte for byte;
    a run folder here (finished, or in flight) is left as it is; unfinished runs there are not copied;
    grid.json's seeds are united; other training settings are refused, naming the setting."""
    there, here = tmp_path / "there" / "g", tmp_path / "here" / "g"
    _fake_grid(there, "table2", seeds=(0, 1, 2))
    _fake_grid(here, "table2", seeds=(0, 1))
    shutil.rmtree(here / "runs" / "mlp-v" / "seed_1")
    _truncate(here / "runs" / "baseline" / "seed_1" / "metrics.jsonl", 2)  # training here now
    _truncate(there / "runs" / "mlp-v" / "seed_2" / "metrics.jsonl", 3)  # stopped there at its time limit
    in_flight = (here / "runs" / "baseline" / "seed_1" / "metrics.jsonl").read_bytes()
    lines = []
    result = merge_grid(there, here, log=lines.append)
    assert "mlp-v/seed_1" in result["copied"] and "baseline/seed_2" in result["copied"]
    assert "mlp-v/seed_2" not in result["copied"] and "mlp-v/seed_2" in result["unfinished"]
    assert {"baseline/seed_0", "baseline/seed_1", "mlp-v/seed_0"} <= set(result["kept"])
    assert not set(result["copied"]) & set(result["kept"])
    for name in result["copied"]:
        for file in (there / "runs" / name).iterdir():
            assert (here / "runs" / name / file.name).read_bytes() == file.read_bytes()
    assert (here / "runs" / "baseline" / "seed_1" / "metrics.jsonl").read_bytes() == in_flight
    assert not (here / "runs" / "mlp-v" / "seed_2").exists()
    assert not [p for p in here.rglob(".*")]  # no staging folder left
    assert json.loads((here / "grid.json").read_text())["seeds"] == [0, 1, 2]
    # the grid's figures, like its report, leave the run in flight out
    assert [d.name for d in _grid_runs(here)[1]["baseline"]] == ["seed_0", "seed_2"]
    assert lines[0].startswith(f"copied: {len(result['copied'])} (")
    # merging again (from the command line) copies nothing; a grid of another name is refused
    from kha.cli import main

    assert main(["ablate", "table2", "--out", str(here), "--merge-from", str(there)]) == 0
    assert "copied: 0\n" in capsys.readouterr().out
    assert main(["ablate", "table1", "--out", str(here), "--merge-from", str(there)]) == 2
    assert "holds grid 'table2', not 'table1'" in capsys.readouterr().err
    # another grid's settings are refused
    meta = json.loads((there / "grid.json").read_text())
    meta["train"]["lr"] = 1.0
    (there / "grid.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"other training settings \(lr: 0.003 here, 1.0 there\)"):
        merge_grid(there, here)


@pytest.mark.parametrize("grid,rows", [("table1", 7), ("table3", 6), ("table5", 6), ("table2", 10)])
def test_report_tables_have_the_papers_shape(tmp_path, grid, rows):
    losses = _fake_grid(tmp_path, grid)
    # an unfinished run shows in the per-seed table and drops out of the statistics
    unfinished = next(v for v in grid_variants(grid) if v.arm != "baseline")
    path = tmp_path / "runs" / unfinished.name / "seed_2" / "metrics.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    moved = tmp_path / "runs" / unfinished.name / "seed_1" / "train_config.json"  # resumed on a GPU
    moved.write_text(json.dumps({**json.loads(moved.read_text()), "trained_on": [
        {"first_step": 1, "device": "cpu"}, {"first_step": 3, "device": "NVIDIA H200"}, {"device": 7}]}))
    report = grid_report(tmp_path)
    table = report.split("### Table")[1].split("\n\n")[1].splitlines()
    assert len(table) == 2 + rows, table
    assert "(2/4 steps)" in report
    # the other fake runs record no device
    assert f"counted under each): NVIDIA H200: 1, cpu: 1, not recorded: {len(losses) - 1}." in report
    _, results = load_grid(tmp_path)
    assert results[unfinished.name][2].val_loss is None and results[unfinished.name][0].spikes == 1
    assert results[unfinished.name][0].spike_steps == [2]  # every fake run of seed 0 spikes at step 2
    assert f"| {unfinished.name} | " in report and "| 1/0/0 | seed 0: 2 |" in report
    # the unfinished variant's ΔL uses seeds 0 and 1 only
    base = next(v for v in grid_variants(grid) if v.group == unfinished.group and v.arm == "baseline")
    d = paired_delta({s: losses[unfinished.name, s] for s in (0, 1)}, {s: losses[base.name, s] for s in (0, 1)})
    assert f"{d.mean:+.4f} ± {d.sd:.4f} [{d.lo:+.4f}, {d.hi:+.4f}]" in report
    if grid == "table3":
        assert "| MLA | 16 | 32 | 32 | 64+8 |" in report and "| GTA | 16 | 4 | 32 | 64+8 |" in report
        assert "| MQA | 16 | 1 | 32 | 32 |" in report and "| MHA | 16 | 16 | 16 | 512 |" in report
    if grid == "table5":
        assert "| MoE |" in report and "| 5 | 192 | 128x4 |" in report and "| 6 | 192 | 736 |" in report


def test_welch_difference_against_hand_computed_values():
    """Welch's interval of a difference of means: equal sizes and variances give df = 2n - 2 = 4 exactly;
    unequal ones df = (5/12 + 25)^2 / ((5/12)^2 / 3 + 25^2 / 1) = 1.03, rounded down to 1. t quantiles from tables:
    t(0.975, 4) = 2.7764451, t(0.975, 1) = 12.7062047."""
    d = welch_difference([1, 2, 3], [4, 5, 6])
    assert d.mean == pytest.approx(-3) and d.sd == pytest.approx(math.sqrt(2 / 3))
    assert d.hi - d.mean == pytest.approx(2.7764451 * math.sqrt(2 / 3), rel=1e-6) and d.excludes_zero
    d = welch_difference([0, 1, 2, 3], [0, 10])
    assert d.mean == pytest.approx(-3.5)
    assert d.mean - d.lo == pytest.approx(12.7062047 * math.sqrt(5 / 12 + 25), rel=1e-6) and not d.excludes_zero
    assert welch_difference([1.0], [2.0, 3.0]) is None


def test_report_splits_by_setting_when_runs_trained_on_two(tmp_path):
    """Seeds 0-2 trained on torch's ops, 3-5 on kha's kernels (as train_config.json records them); mlp-v's seed 5
    on torch's ops against a baseline on kha's: per setting, the baseline's losses and the paired ΔL over pairs
    trained wholly on it, the later setting minus the first (Welch), and the split pair counted and left out.
    A grid of one setting has no such section."""
    _fake_grid(tmp_path / "one", "study", seeds=(0, 1))
    assert "### By setting" not in grid_report(tmp_path / "one")
    root = tmp_path / "two"
    losses = _fake_grid(root, "study", seeds=tuple(range(6)))
    for (name, seed) in losses:
        path = root / "runs" / name / f"seed_{seed}" / "train_config.json"
        kha_kernels = seed >= 3 and (name, seed) != ("mlp-v", 5)
        path.write_text(json.dumps({**json.loads(path.read_text()), "amx_attention": kha_kernels,
                                    "cpu_kernels": kha_kernels, "trained_on": [{"first_step": 1, "device": "cpu"}]}))
    torch_ops, kha = "cpu; torch's ops", "cpu; kha's AMX attention and kha's elementwise kernels"
    table = grid_report(root).split("### By setting: device, precision and kernels")[1].split("\n\n")[2].splitlines()
    base = {torch_ops: [losses["baseline", s] for s in (0, 1, 2)], kha: [losses["baseline", s] for s in (3, 4, 5)]}
    delta = {torch_ops: [losses["mlp-v", s] - losses["baseline", s] for s in (0, 1, 2)],
             kha: [losses["mlp-v", s] - losses["baseline", s] for s in (3, 4)]}
    for setting, row in ((torch_ops, table[2]), (kha, table[3])):
        cells = row.split(" | ")
        # runs: 4 arms x 3 seeds each, and mlp-v's seed 5 on torch's ops
        assert cells[0] == f"| {setting}" and cells[1] == ("13" if setting == torch_ops else "11")
        b, d = base[setting], delta[setting]
        assert cells[2].startswith(f"{statistics.mean(b):.4f} ± {statistics.stdev(b):.4f} [")
        assert cells[2].endswith(f"(n={len(b)})") and "*" not in cells[2]
        assert cells[3].startswith(f"{statistics.mean(d):+.4f} ± {statistics.stdev(d):.4f} [")
        assert cells[3].endswith(f"(n={len(d)})")
    cells = table[4].split(" | ")
    assert cells[0] == f"| difference: {kha} - {torch_ops}"
    for cell, values in ((cells[2], base), (cells[3], delta)):
        w = welch_difference(values[kha], values[torch_ops])
        assert cell.startswith(f"{w.mean:+.4f} [{w.lo:+.4f}, {w.hi:+.4f}]")
    assert len(table) == 5
    assert "Pairs whose two runs trained on different settings (left out above): 1." in grid_report(root)
    # one pair in a setting: its ΔL alone, its n said once
    for name in ("baseline", "mlp-v"):
        path = root / "runs" / name / "seed_4" / "train_config.json"
        cfg = json.loads(path.read_text())
        path.write_text(json.dumps({**cfg, "trained_on": [{"first_step": 1, "device": "gpu"}]}))
    gpu = "gpu; kha's AMX attention and kha's elementwise kernels"
    row = next(r for r in grid_report(root).splitlines() if r.startswith(f"| {gpu} |"))
    d = losses["mlp-v", 4] - losses["baseline", 4]
    assert f"| {losses['baseline', 4]:.4f} (n=1) | {d:+.4f} (n=1) |" in row


def test_shards_split_a_grid_between_processes(data_dir, tmp_path, monkeypatch, capsys):
    """Two shards in one folder train each run of the grid exactly once and together all of them (counted by a
    stand-in for train); a shard writes no report, ``--report`` afterwards does; a bad shard is a clear error."""
    import kha.train as train_module
    from kha.cli import main

    trained = []

    def fake_train(cfg):
        trained.append(Path(cfg.out).relative_to(tmp_path).as_posix())
        return {"val_loss": 1.0}

    monkeypatch.setattr(train_module, "train", fake_train)
    common = ["ablate", "table2", "--out", str(tmp_path), "--seeds", "3", "--only", "baseline,mlp-v",
              "--data", str(data_dir), "--no-progress"]
    assert main([*common, "--shard", "0/2"]) == 0
    first = list(trained)
    assert main([*common, "--shard", "1/2"]) == 0
    jobs = grid_jobs(grid_variants("table2", only=["baseline", "mlp-v"]), [0, 1, 2])
    expected = [f"runs/{v.name}/seed_{s}" for v, s in jobs]
    assert first == expected[0::2] and trained == expected[0::2] + expected[1::2]
    assert not (tmp_path / "report.md").exists() and "--report" in capsys.readouterr().out
    for bad in ("2/2", "1", "a/b", "0/0"):
        assert main([*common, "--shard", bad]) == 2
        assert f"--shard '{bad}'" in capsys.readouterr().err


def test_cli_ablate_report_and_plot(tmp_path, capsys):
    from kha.cli import build_parser, main
    from kha.experiments import _base_config

    assert "ablate" in build_parser().format_help()  # help strings format (no stray %)
    for command in ("ablate", "report", "plot"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
    args = build_parser().parse_args(["ablate", "table2", "--out", str(tmp_path), "--steps", "5", "--lr", "1e-3",
                                      "--no-progress", "--preset", "tiny-moe"])
    cfg = _base_config(args)
    assert (cfg.steps, cfg.lr, cfg.progress, cfg.preset, cfg.batch_size) == (5, 1e-3, False, "tiny-moe", 16)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", "table2", "--out", str(tmp_path), "--knock", "mlp"])  # set by the grid
    _fake_grid(tmp_path, "table2", seeds=(0, 1))
    assert main(["ablate", "table2", "--out", str(tmp_path), "--report"]) == 0
    assert (tmp_path / "report.md").read_text().startswith("# table2")
    assert main(["ablate", "table1", "--out", str(tmp_path), "--report"]) == 2  # another grid's directory
    assert main(["report", str(tmp_path)]) == 0
    assert "### Table 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ knocks


def test_knock_stats_identity_and_a_known_matrix():
    model = DecoderLM(get_preset("tiny", knock="mlp", knock_targets="qkv"))
    stats = knock_stats(knocks_from_state(model.state_dict()))
    assert len(stats) == 4 * 3 * 3  # layers x targets x (up, gate, down)
    for r in stats:
        assert r["moved"] == 0
        if r["param"] == "w_gate":  # zero: no mass to share
            assert math.isnan(r["diag_share"])
        else:
            assert (r["diag_share"], r["offdiag_share"], r["diag_mean"]) == (1, 0, 1)
    w = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    (row,) = knock_stats({(0, "v", "weight"): w})
    assert row["diag_share"] == pytest.approx(3 / 4.5) and row["offdiag_share"] == pytest.approx(1.5 / 4.5)
    assert row["diag_mean"] == 1.5 and row["moved"] == pytest.approx(1.5)  # ||[[0, -1], [0.5, 1]]||_F


# ------------------------------------------------------------------------------------------ the CPU study


def test_study_grid_is_the_issue_design():
    arms = grid_variants("study")
    assert [v.name for v in arms] == ["baseline", "mlp-v", "linear-qkv", "mlp-v-decay"]
    configs = {v.name: run_config(TrainConfig(), v, 3, Path("x")) for v in arms}
    assert [c.decay_knocks for c in configs.values()] == [False, False, False, True]
    for name, cfg in configs.items():
        attn = base_model_config(cfg).attention
        assert (cfg.preset, cfg.seed, attn.n_kv_heads, attn.head_dim) == ("study", 3, 4, 32), name
    assert base_model_config(configs["mlp-v"]).attention.knock_targets == ("v",)
    assert base_model_config(configs["linear-qkv"]).attention.knock_targets == ("q", "k", "v")


def test_docmask_grid_pairs_masked_and_unmasked_arms():
    arms = grid_variants("docmask")
    configs = {v.name: run_config(TrainConfig(), v, 2, Path("x")) for v in arms}
    assert {n: (c.knock, c.doc_mask, c.preset) for n, c in configs.items()} == {
        "baseline": ("none", False, "study"), "mlp-v": ("mlp", False, "study"),
        "baseline-doc": ("none", True, "study"), "mlp-v-doc": ("mlp", True, "study")}
    from kha.analysis.tables import CONTRASTS

    assert {(a, b) for a, b, _ in CONTRASTS["docmask"]} == {("baseline-doc", "baseline"), ("mlp-v-doc", "mlp-v"),
                                                            ("mlp-v-doc", "baseline-doc"),
                                                            (("mlp-v-doc", "baseline-doc"), ("mlp-v", "baseline"))}


def _fake_study(root: Path, curves: dict[str, dict[int, list[float]]]) -> None:
    """Finished runs (metrics and configs only, as committed) with validation losses ``curves[variant][seed]``
    at steps 1..len, 100 tokens per step."""
    base = TrainConfig(steps=4, batch_size=10, seq_len=10, progress=False)
    variants = [v for v in grid_variants("study") if v.name in curves]
    seeds = sorted({s for c in curves.values() for s in c})
    write_grid_file(root, "study", variants, seeds, base)
    for v in variants:
        for s, losses in curves[v.name].items():
            cfg = run_config(base, v, s, root)
            out = Path(cfg.out)
            out.mkdir(parents=True)
            (out / "train_config.json").write_text(json.dumps(cfg.to_dict()))
            records = [{"step": k, "tokens": 100 * k, "loss": 4.0, "val_loss": loss}
                       for k, loss in enumerate(losses, 1)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            if len(records) == cfg.steps:  # written with the final weights, as the trainer does
                (out / "model_config.json").write_text(json.dumps(asdict(build_model_config(cfg, 512))))


def test_delta_against_tokens_by_hand(tmp_path):
    from kha.analysis.plots import plot_delta_curves
    from kha.analysis.tables import GridResults, crossover

    base = {0: [5.0, 4.0, 3.5, 3.0], 1: [5.1, 4.1, 3.6, 3.1], 2: [5.2, 4.0, 3.4, 3.2], 3: [5.0, 4.2, 3.5, 3.1]}
    # mlp-v: no better at first, then clearly better; seed 3 stopped after 2 evaluations
    mlp = {0: [5.0, 4.01, 3.45, 2.95], 1: [5.12, 4.08, 3.54, 3.04], 2: [5.19, 4.03, 3.33, 3.13], 3: [5.0, 4.1]}
    _fake_study(tmp_path, {"baseline": base, "mlp-v": mlp})
    g = GridResults(tmp_path)
    curve = g.delta_curve("mlp-v")
    assert [t for t, _ in curve] == [100, 200, 300, 400]
    for (tokens, s), step in zip(curve, range(4), strict=True):
        diffs = [mlp[k][step] - base[k][step] for k in base if step < len(mlp[k])]
        assert s.n == len(diffs) and s.mean == pytest.approx(statistics.mean(diffs), abs=1e-12), tokens
        half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        assert s.hi == pytest.approx(s.mean + half, abs=1e-12)
    assert [s.n for _, s in curve] == [4, 4, 3, 3]
    # intervals: step 3 (-0.05, -0.06, -0.07) and step 4 (-0.05, -0.06, -0.07) lie below 0, step 2 does not
    assert crossover(curve) == 300
    assert g.losses("mlp-v") == {0: 2.95, 1: 3.04, 2: 3.13}  # finished: the metrics reach the last step
    report = grid_report(tmp_path)
    assert "| **below 0 from** | 300 |" in report  # 300 tokens (K, M, B as fits)
    assert plot_delta_curves(tmp_path).name == "deltas_vs_tokens.png"


def test_contrast_between_two_kha_arms_by_hand(tmp_path):
    def runs(finals):  # finished runs (4 evaluations) ending at these losses, seed by seed
        return {seed: [5.0, 4.0, 3.5, final] for seed, final in enumerate(finals)}

    _fake_study(tmp_path, {"baseline": runs([3.0, 3.1, 3.2]), "mlp-v": runs([3.02, 3.05, 3.11]),
                           "mlp-v-decay": runs([2.99, 3.06, 3.05])})
    diffs = [2.99 - 3.02, 3.06 - 3.05, 3.05 - 3.11]
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = t_quantile(0.975, 2) * sd / math.sqrt(3)
    expected = f"{mean:+.4f} ± {sd:.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"
    row = ("| weight decay on the knocks: decayed - not decayed (KHA-MLP v) | `mlp-v-decay` - `mlp-v` | "
           f"{expected} | 3 |")
    report = grid_report(tmp_path)
    assert row in report
    assert "KHA-Linear on Q, K, V" not in report  # linear-qkv is not in this grid.json: no row
    sd = statistics.stdev([3.02 - 3.0, 3.05 - 3.1, 3.11 - 3.2])  # mlp-v against the baseline
    half = t_quantile(0.975, 2) * sd / math.sqrt(3)
    bound = sd * math.sqrt(2 / 0.2107)  # the 90 % upper bound with 2 degrees of freedom (chi2_0.10(2) = 0.2107)
    needed = f"{seeds_for_half_width(sd, 0.02)} ({seeds_for_half_width(sd_upper_bound(sd, 3), 0.02)})"
    assert f"| mlp-v | 3 | {sd:.4f} | {bound:.4f} | ±{half:.4f} | {needed} |" in report


def _pitman_morgan_t(a: list[float], b: list[float], ratio: float) -> float:
    """The Pitman-Morgan statistic for an sd ratio: t of the correlation of a - ratio b and a + ratio b."""
    r = statistics.correlation([x - ratio * y for x, y in zip(a, b, strict=True)],
                               [x + ratio * y for x, y in zip(a, b, strict=True)])
    return r * math.sqrt(len(a) - 2) / math.sqrt(1 - r * r)


def test_paired_sd_ratio_interval_is_where_the_pitman_morgan_test_keeps_the_ratio():
    # independent of the closed form: at each end of the interval the test's statistic, computed from the data
    # directly, sits at the critical t value; at the sample ratio it is 0
    gen = torch.Generator().manual_seed(3)
    for n in (3, 6, 25):
        b = torch.randn(n, generator=gen, dtype=torch.float64)
        a = 0.6 * b + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
        a, b = a.tolist(), b.tolist()
        ratio, lo, hi = paired_sd_ratio(a, b)
        assert ratio == pytest.approx(statistics.stdev(a) / statistics.stdev(b), rel=1e-12)
        assert lo < ratio < hi
        critical = t_quantile(0.975, n - 2)
        assert _pitman_morgan_t(a, b, lo) == pytest.approx(critical, rel=1e-9)
        assert _pitman_morgan_t(a, b, hi) == pytest.approx(-critical, rel=1e-9)
        assert _pitman_morgan_t(a, b, ratio) == pytest.approx(0, abs=1e-9)
    assert paired_sd_ratio([1.0, 2.0], [1.0, 3.0]) is None  # fewer than 3 pairs
    assert paired_sd_ratio([1.0, 2.0, 4.0], [1.0, 1.0, 1.0]) is None  # the baseline does not vary
    with pytest.raises(ValueError, match="different lengths: 3 and 2"):
        paired_sd_ratio([1.0, 2.0, 3.0], [1.0, 2.0])


def test_paired_sd_ratio_interval_covers_the_true_ratio_as_often_as_its_level():
    # Monte Carlo: pairs of correlated normal losses (correlation 0.6, true sd ratio 0.7), 8 seeds per sample;
    # the 95 % interval should hold 0.7 in 95 % of 4,000 samples (binomial sd of the share 0.0034)
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(4_000, 8, generator=gen, dtype=torch.float64)
    a = 0.7 * (0.6 * b + 0.8 * torch.randn(4_000, 8, generator=gen, dtype=torch.float64))
    covered = 0
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        _, lo, hi = paired_sd_ratio(x, y)
        covered += lo <= 0.7 <= hi
    assert covered / 4_000 == pytest.approx(0.95, abs=0.015)


def test_report_gives_each_arms_spread_over_seeds_against_its_baseline(tmp_path):
    def runs(finals):
        return {seed: [5.0, 4.0, 3.5, final] for seed, final in enumerate(finals)}

    base, mlp = [3.0, 3.3, 3.1, 3.5], [3.0, 3.15, 3.05, 3.2]
    _fake_study(tmp_path, {"baseline": runs(base), "mlp-v": runs(mlp)})
    ratio, lo, hi = paired_sd_ratio(mlp, base)
    assert ratio == pytest.approx(statistics.stdev(mlp) / statistics.stdev(base))
    row = (f"| mlp-v | 4 | {statistics.stdev(mlp):.4f} | {statistics.stdev(base):.4f} | "
           f"{ratio:.3f} [{lo:.3f}, {hi:.3f}]{'*' if hi < 1 else ''} |")
    assert row in grid_report(tmp_path)


def _walsh(values):
    return sorted((a + b) / 2 for i, a in enumerate(values) for b in values[i:])


def test_signed_rank_interval_ends_are_the_published_critical_values():
    # Two-sided 5 % critical values of Wilcoxon's signed-rank statistic from published tables (e.g. Hollander,
    # Wolfe & Chicken, Nonparametric Statistical Methods, table A.4; the largest T with P(W <= T) <= 0.025):
    # n = 6: 0, n = 10: 8, n = 20: 52, n = 30: 137. The interval runs from the (T + 1)-th smallest Walsh average to
    # the (T + 1)-th largest; the estimate is the Walsh averages' median.
    gen = torch.Generator().manual_seed(5)
    for n, critical in ((6, 0), (10, 8), (20, 52), (30, 137)):
        values = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.05 - 0.02).tolist()
        walsh = _walsh(values)
        centre, lo, hi = signed_rank_interval(values)
        assert (lo, hi) == (walsh[critical], walsh[-1 - critical])
        assert centre == statistics.median(walsh)
    assert signed_rank_interval([0.1, -0.2, 0.3, 0.05, -0.01]) is None  # 5 values: P(W = 0) = 1/32 > 0.025
    assert signed_rank_interval([0.1, -0.2, 0.3, 0.05, -0.01], level=0.9) is not None  # 1/32 <= 0.05
    # P(W <= c) may equal (1 - level) / 2 exactly: n = 3, level 0.75, P(W = 0) = 1/8, so c = 0 (the range); the
    # Walsh averages are 0.1, 0.15, 0.2, 0.25, 0.3, 0.4
    assert signed_rank_interval([0.4, 0.1, 0.2], level=0.75) == pytest.approx((0.225, 0.1, 0.4))
    with pytest.raises(ValueError, match="level must be in"):
        signed_rank_interval([0.1] * 8, level=95)


def test_signed_rank_interval_is_where_the_exact_test_keeps_the_centre():
    # independent of the counting: scipy's exact signed-rank test of values - c rejects at 5 % just outside the
    # interval and keeps c just inside it
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(8)
    for n in (7, 12, 25):
        values = (torch.randn(n, generator=gen, dtype=torch.float64) ** 3 * 0.05).tolist()  # skewed, long-tailed
        _, lo, hi = signed_rank_interval(values)
        for end, outward in ((lo, -1), (hi, 1)):
            p_outside, p_inside = (stats.wilcoxon([v - end - step for v in values], method="exact").pvalue
                                   for step in (outward * 1e-9, -outward * 1e-9))
            assert p_outside <= 0.05 < p_inside


def test_signed_rank_interval_covers_a_symmetric_centre_as_often_as_its_exact_level():
    # Monte Carlo, 10 values from a heavy-tailed symmetric distribution (t with 2 df, centre 0.3): the interval's
    # exact coverage is 1 - 2 P(W <= 8) = 1 - 2 x 25 / 1024 = 0.9512 (published: P(W <= 8) = 0.0244 at n = 10).
    # 16,000 samples: binomial sd of the share 0.0017; one step wider (c = 7) would cover 0.9629, narrower 0.9395
    gen = torch.Generator().manual_seed(1)
    normal = torch.randn(16_000, 10, generator=gen, dtype=torch.float64)
    chi2 = torch.randn(16_000, 10, 2, generator=gen, dtype=torch.float64).pow(2).sum(-1)
    samples = 0.3 + normal / (chi2 / 2).sqrt()
    covered = sum(lo <= 0.3 <= hi for _, lo, hi in map(signed_rank_interval, samples.tolist()))
    assert covered / 16_000 == pytest.approx(1 - 2 * 25 / 1024, abs=0.006)


def test_report_gives_the_signed_rank_interval_of_each_arms_paired_delta(tmp_path):
    def runs(finals):
        return {seed: [5.0, 4.0, 3.5, final] for seed, final in enumerate(finals)}

    base = [3.0, 3.3, 3.1, 3.5, 3.2, 3.4, 3.05]
    mlp = [3.01, 3.15, 3.06, 3.2, 3.18, 3.38, 3.04]
    deltas = [m - b for m, b in zip(mlp, base, strict=True)]
    _fake_study(tmp_path, {"baseline": runs(base), "mlp-v": runs(mlp)})
    walsh = _walsh(deltas)  # n = 7: the published two-sided 5 % critical value is 2
    centre, lo, hi = statistics.median(walsh), walsh[2], walsh[-3]
    t = summarize(deltas)
    row = (f"| mlp-v | 7 | {t.mean:+.4f} ± {t.sd:.4f} [{t.lo:+.4f}, {t.hi:+.4f}]{'*' if t.hi < 0 else ''} | "
           f"{centre:+.4f} [{lo:+.4f}, {hi:+.4f}]{'*' if hi < 0 else ''} | 6 |")  # 6 of 7 below 0
    assert row in grid_report(tmp_path)
    runs5 = {"baseline": runs(base[:5]), "mlp-v": runs(mlp[:5])}
    _fake_study(tmp_path / "five", runs5)
    assert "signed-rank interval" not in grid_report(tmp_path / "five")  # 5 pairs: no 95 % interval


def test_seeds_for_a_half_width_by_hand():
    # sd 0.03, half-width 0.02: n = 11 gives 2.228 x 0.03 / sqrt(11) = 0.0202 > 0.02, n = 12: 2.201 x 0.03 /
    # sqrt(12) = 0.0191 (t quantiles from tables: t(0.975, 10) = 2.228, t(0.975, 11) = 2.201)
    assert seeds_for_half_width(0.03, 0.02) == 12
    assert seeds_for_half_width(0.0, 0.02) == 2
    assert seeds_for_half_width(1.0, 0.001, most=100) is None
    for sd, h in ((0.05, 0.01), (0.02, 0.02), (0.1, 0.03)):
        n = seeds_for_half_width(sd, h)
        assert t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= h < t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1)


def test_chi_square_quantiles_match_published_tables():
    # NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.6.7.4 (critical values of the chi-square
    # distribution), to the table's 3 decimals
    for p, df, table in ((0.10, 2, 0.211), (0.10, 5, 1.610), (0.05, 1, 0.004), (0.975, 10, 20.483),
                         (0.10, 17, 10.085), (0.90, 3, 6.251), (0.01, 40, 22.164), (0.95, 1, 3.841)):
        assert chi2_quantile(p, df) == pytest.approx(table, abs=6e-4)
        assert chi2_cdf(chi2_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    with pytest.raises(ValueError, match="df must be a positive integer"):
        chi2_quantile(0.5, 0)


def test_sd_upper_bound_covers_the_true_sd_as_often_as_its_level():
    # Monte Carlo, independent of the chi-square formulas: samples of 3 and of 6 normal values with sd 1; the
    # 90 % upper bound from each sample's sd should lie above 1 in 90 % of samples (binomial sd of the share
    # over 20,000 samples: 0.0021, so +-0.01 is about 5 sd)
    gen = torch.Generator().manual_seed(0)
    for n in (3, 6):
        samples = torch.randn(20_000, n, generator=gen, dtype=torch.float64)
        covered = sum(sd_upper_bound(float(sd), n, 0.9) >= 1.0 for sd in samples.std(dim=1))
        assert covered / 20_000 == pytest.approx(0.9, abs=0.01)


def test_crossover_needs_every_later_interval_below_zero():
    from kha.analysis.tables import Summary, crossover

    below, above = Summary(3, -0.1, 0.01, -0.12, -0.08), Summary(3, -0.1, 0.1, -0.3, 0.1)
    assert crossover([(1, below), (2, above), (3, below), (4, below)]) == 3
    assert crossover([(1, below), (2, above)]) is None
    assert crossover([(1, Summary(1, -0.1, None, None, None))]) is None


def test_final_knocks_are_saved_alone_and_read_back(data_dir, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), preset="tiny", knock="mlp", data=str(data_dir), seq_len=32, batch_size=4,
                      steps=2, eval_every=2, eval_batches=1, ckpt_every=2, progress=False))
    full, alone = load_file(out / "model.safetensors"), load_file(out / "knocks.safetensors")
    assert set(alone) == {k for k in full if ".knocks." in k} and len(alone) == 4 * 3
    assert all(torch.equal(alone[k], full[k]) for k in alone)
    expected = load_knocks(out)
    (out / "model.safetensors").unlink()
    again = load_knocks(out)
    assert again.keys() == expected.keys() and all(torch.equal(again[k], expected[k]) for k in again)


def test_study2_grid_is_the_planned_design_with_complete_pairs_first():
    arms = grid_variants("study2")
    jobs = grid_jobs(arms, list(range(18)))
    runs = {v.name: [s for w, s in jobs if w is v] for v in arms}
    assert runs == {"baseline": list(range(18)), "mlp-v": list(range(18)), "linear-qkv": [4, 5, 6, 7, 8],
                    "mlp-v-identity": [4, 5, 6, 7, 8], "fp32-baseline": [4, 5, 6], "fp32-mlp-v": [4, 5, 6]}
    order = [(v.name, s) for v, s in jobs]
    assert order[:2] == [("baseline", 0), ("mlp-v", 0)] and order[-2:] == [("baseline", 17), ("mlp-v", 17)]
    assert order[8:14] == [(n, 4) for n in runs]  # seeds 0-3: pairs only; seed 4: every arm
    # a grid run with fewer seeds takes those of a variant's seeds it has
    assert [s for v, s in grid_jobs(arms, [0, 5]) if v.name == "linear-qkv"] == [5]
    base = TrainConfig(precision="bf16")
    configs = {v.name: run_config(base, v, 2, Path("x")) for v in arms}
    assert {n: (c.knock, c.knock_targets, c.knock_decay, c.precision) for n, c in configs.items()} == {
        "baseline": ("none", None, "none", "bf16"), "mlp-v": ("mlp", "v", "none", "bf16"),
        "linear-qkv": ("linear", "qkv", "none", "bf16"), "mlp-v-identity": ("mlp", "v", "identity", "bf16"),
        "fp32-baseline": ("none", None, "none", "fp32"), "fp32-mlp-v": ("mlp", "v", "none", "fp32")}
    assert all(c.preset == "study" for c in configs.values())
    muon = {v.name: (v.group, run_config(base, v, 0, Path("x")).optimizer) for v in grid_variants("muon")}
    assert muon == {"adamw-baseline": ("adamw", "adamw"), "adamw-mlp-v": ("adamw", "adamw"),
                    "muon-baseline": ("muon", "muon"), "muon-mlp-v": ("muon", "muon")}


def test_study2_report_gives_the_precision_interaction_paired_by_seed(tmp_path):
    """(fp32 KHA-MLP - fp32 baseline) - (bf16 KHA-MLP - bf16 baseline) per seed: with _fake_grid's formula
    -0.001 (s + 1), i.e. -0.005, -0.006, -0.007 over seeds 4-6: mean -0.006, sd 0.001, half-width
    t(0.975, 2) = 4.3027 x 0.001 / sqrt(3) = 0.00248 (a t table's value)."""
    _fake_grid(tmp_path, "study2", seeds=(4, 5, 6))
    rows = [r for r in grid_report(tmp_path).splitlines() if r.startswith("| does KHA-MLP v's ΔL depend on")]
    assert rows == ["| does KHA-MLP v's ΔL depend on precision: its ΔL in fp32 - its ΔL in bf16 | "
                    "(`fp32-mlp-v` - `fp32-baseline`) - (`mlp-v` - `baseline`) | "
                    "-0.0060 ± 0.0010 [-0.0085, -0.0035]* | 3 |"]
    # a seed missing from one of the four arms leaves that seed out
    (tmp_path / "runs" / "fp32-baseline" / "seed_6" / "model_config.json").unlink()
    row = [r for r in grid_report(tmp_path).splitlines() if r.startswith("| does KHA-MLP v's ΔL depend on")][0]
    assert row.endswith("| -0.0055 ± 0.0007 [-0.0119, +0.0009] | 2 |")  # t(0.975, 1) = 12.706


def test_fp32_runs_are_a_setting_of_their_own_beside_bf16_runs_of_one_machine(tmp_path):
    """kha's CPU kernels run only in bf16, so an fp32 run records none: without its precision it would share a
    setting with bf16 runs of another machine on torch's ops. Settings no variant spans give no difference row."""
    losses = _fake_grid(tmp_path, "study2", seeds=(4, 5, 6))
    for name, seed in losses:
        path = tmp_path / "runs" / name / f"seed_{seed}" / "train_config.json"
        fp32 = name.startswith("fp32-")
        path.write_text(json.dumps({**json.loads(path.read_text()), "resolved_precision": "fp32" if fp32 else "bf16",
                                    "amx_attention": not fp32, "cpu_kernels": not fp32,
                                    "trained_on": [{"first_step": 1, "device": "cpu"}]}))
    report = grid_report(tmp_path)
    table = report.split("### By setting: device, precision and kernels")[1].split("\n\n")[2].splitlines()
    assert len(table) == 4 and not any(row.startswith("| difference") for row in table)
    bf16, fp32 = (row.split(" | ") for row in table[2:])
    assert bf16[:2] == ["| cpu; bf16, kha's AMX attention and kha's elementwise kernels", "12"]
    assert fp32[:2] == ["| cpu; fp32, torch's ops", "6"]
    delta = [losses["fp32-mlp-v", s] - losses["fp32-baseline", s] for s in (4, 5, 6)]
    assert fp32[-1].startswith(f"{statistics.mean(delta):+.4f} ± {statistics.stdev(delta):.4f} [")
    assert bf16[-1].strip(" |") == "—" and fp32[2] == "—"  # fp32-mlp-v in bf16; the bf16 baseline in fp32


def test_grid_file_records_the_running_variants_as_defined_and_reads_an_old_seed_count(tmp_path):
    """grid.json written by an older version: a variant's ``seeds`` held a count (the first n seeds)."""
    base = TrainConfig(precision="bf16")
    arms = {v.name: v for v in grid_variants("study2")}
    newer = {"name": "gone-arm", "group": "main", "arm": "X", "seeds": [2], "field_of_a_newer_version": 1}
    old = [asdict(arms["baseline"]), newer, {**asdict(arms["linear-qkv"]), "seeds": 5},
           {**asdict(arms["fp32-baseline"]), "seeds": 3}]
    (tmp_path / "grid.json").write_text(json.dumps({"grid": "study2", "seeds": [0, 1], "train": {},
                                                    "variants": old}))
    write_grid_file(tmp_path, "study2", [arms["linear-qkv"]], [4], base)
    meta = json.loads((tmp_path / "grid.json").read_text())
    recorded = {v["name"]: v["seeds"] for v in meta["variants"]}
    # running: the code's definition; not running: kept, its count read as seeds 0..n-1; the grid's order, then
    # variants the code no longer defines, kept as recorded
    assert recorded == {"baseline": None, "linear-qkv": [4, 5, 6, 7, 8], "fp32-baseline": [0, 1, 2], "gone-arm": [2]}
    assert list(recorded) == ["baseline", "linear-qkv", "fp32-baseline", "gone-arm"] and meta["seeds"] == [0, 1, 4]
    assert meta["variants"][-1] == newer


def test_a_run_saved_before_a_field_existed_continues_under_its_default(tmp_path):
    variant = grid_variants("study", only=["mlp-v"])[0]
    cfg = run_config(TrainConfig(), variant, 0, tmp_path)
    Path(cfg.out).mkdir(parents=True)
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("optimizer", "knock_optimizer", "knock_decay")}
    (Path(cfg.out) / "train_config.json").write_text(json.dumps(old))
    _check_same_config(cfg)  # the new fields at their defaults: the same run
    with pytest.raises(ValueError, match=r"another config \(optimizer: 'adamw' -> 'muon'\)"):
        _check_same_config(replace(cfg, optimizer="muon"))


def test_report_of_the_first_seeds_equals_the_report_of_a_grid_that_ran_only_those(tmp_path, capsys):
    """`kha report --seeds 3 --out FILE`: a design's planned seeds 0-2 reported alone once seeds 3-4 have run, the
    same tables as a grid that never ran seeds 3-4; report.md is left as it was."""
    _fake_grid(tmp_path / "five", "table2", seeds=(0, 1, 2, 3, 4))
    _fake_grid(tmp_path / "three", "table2", seeds=(0, 1, 2))
    parser = argparse.ArgumentParser()
    add_experiment_parsers(parser.add_subparsers())
    out = tmp_path / "reports" / "planned.md"  # a folder not made yet
    args = parser.parse_args(["report", str(tmp_path / "five"), "--seeds", "3", "--out", str(out)])
    assert args.func(args) == 0 and not (tmp_path / "five" / "report.md").exists()
    planned, alone = out.read_text().splitlines(), grid_report(tmp_path / "three").splitlines()
    assert planned[2].endswith(" Seeds 0-2 only (`--seeds 3`): later seeds' runs are left out.")
    assert planned[2].removesuffix(" Seeds 0-2 only (`--seeds 3`): later seeds' runs are left out.") == alone[2]
    assert planned[3:] == alone[3:] and "[0, 1, 2]" in alone[2]
    with pytest.raises(UserError, match="--seeds must be a positive number of seeds .* got 0"):
        write_report(tmp_path / "five", seeds=0, out=out)
