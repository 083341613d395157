"""``kha ablate``: the paper's ablation grids (Tables 1, 2, 3, 5) as paired, resumable training runs.

- :class:`Variant`: one cell of a paper table -- a knock setting plus changes to the preset's model -- and
  the group whose baseline it is compared with (``kv4`` in Table 1, ``mla`` in Table 3, ...).
- :data:`GRIDS` / :func:`grid_variants`: ``table1`` (number of KV heads), ``table2`` (knock type x place),
  ``table3`` (attention variants), ``table5`` (model sizes, dense and MoE), at the tiny presets' scale;
  ``study`` and ``study2`` (docs/results.md) and ``muon`` (AdamW against Muon) on the ``study`` preset.
- :func:`run_config`: the ``TrainConfig`` of one variant and seed, in ``OUT/runs/VARIANT/seed_S``.
- :func:`run_grid`: every seed x variant as one ``kha.train.train`` call, seed by seed so that complete
  pairs come first. A finished run (``kha.analysis.tables.run_finished``: its metrics and configs decide, as a
  study is committed) is skipped, an interrupted one resumed from its last checkpoint. Paired design: within a
  seed every variant gets the same seed, hence the same base weights (knocks draw no random numbers) and the
  same batch order.
- :func:`merge_grid`: the finished runs of a grid trained elsewhere (``docs/results/grid_on_gpu.sh``'s archive)
  copied into this one, never over a run folder that is here.
- :func:`add_experiment_parsers`: ``kha ablate``, ``kha report`` (``kha.analysis.tables``) and ``kha plot``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from . import safe_io
from .config import get_preset
from .errors import RunStopped, UserError, read_json
from .train.config import TrainConfig

# the arms every group of Tables 1, 3 and 5 compares: (label, knock, targets)
BASELINE = ("baseline", "none", None)
KHA_MLP = ("KHA-MLP", "mlp", "v")
KHA_LINEAR = ("KHA-Linear", "linear", "qkv")
# fields the grid sets per run; the rest of TrainConfig comes from the command line
GRID_FIELDS = ("out", "seed", "knock", "knock_targets", "model_overrides", "resume")


@dataclass
class Variant:
    """One run setting of a grid: ``arm`` of ``group``; ``overrides`` change the preset's ModelConfig."""

    name: str
    """Directory and row name, e.g. ``kv4-mlp``."""
    group: str
    """Every arm is compared, seed by seed, with the ``baseline`` arm of its group."""
    arm: str
    knock: str = "none"
    knock_targets: str | None = None
    overrides: dict = field(default_factory=dict)
    preset: str | None = None
    """The model preset; None: the one given to ``kha ablate`` (``--preset``)."""
    info: dict = field(default_factory=dict)
    """Table columns that describe the variant (e.g. Table 3's model name)."""
    train: dict = field(default_factory=dict)
    """Training settings of this variant only (``TrainConfig`` fields, e.g. ``decay_knocks``)."""
    seeds: list[int] | None = None
    """Run only these of the grid's seeds (None: all of them)."""


def _slug(arm: str) -> str:
    return arm.removeprefix("KHA-").lower()


def _arms(group: str, arms, overrides: dict, preset: str | None = None, **info) -> list[Variant]:
    return [Variant(f"{group}-{_slug(arm)}", group, arm, knock, targets, overrides, preset, dict(info))
            for arm, knock, targets in arms]


def table1(preset: str) -> list[Variant]:
    """GQA with the preset's query heads (32) and 1..32 KV heads: baseline, KHA-MLP (v), KHA-Linear (qkv)."""
    return [v for kv in (1, 2, 4, 8, 16, 32)
            for v in _arms(f"kv{kv}", (BASELINE, KHA_MLP, KHA_LINEAR), {"attention": {"n_kv_heads": kv}},
                           kv_heads=kv)]


TABLE2_ROWS = [("none", None), ("linear", "q"), ("linear", "k"), ("linear", "v"), ("linear", "qkv"),
               ("mlp", "q"), ("mlp", "k"), ("mlp", "v"), ("mlp", "qkv"), ("gate", "v")]


def table2(preset: str) -> list[Variant]:
    """Knock type x place on the preset (GQA 32/4): exactly the paper's Table 2 rows."""
    return [Variant("baseline" if knock == "none" else f"{knock}-{targets}", "all",
                    "baseline" if knock == "none" else f"{knock}-{targets}", knock, targets)
            for knock, targets in TABLE2_ROWS]


def table3(preset: str) -> list[Variant]:
    """Attention variants at the preset's width, as the ``*-a0.8b`` presets are built from ``moe-a0.8b``.

    Head counts as in the paper (32 or 16 query heads) at the preset's head_dim; MLA's ranks scale with
    head_dim as in ``mla-a0.8b`` (latent 4 x head_dim, RoPE key head_dim / 2, query rank 8 x head_dim:
    512 / 64 / 1024 at head_dim 128). KHA-MLP everywhere except MLA, which takes KHA-Linear only.
    """
    hd = get_preset(preset).attention.head_dim
    mla = {"variant": "mla", "n_heads": 32, "n_kv_heads": 32, "kv_lora_rank": 4 * hd, "rope_head_dim": hd // 2,
           "q_lora_rank": 8 * hd}
    rows = [("mla", "MLA", mla, KHA_LINEAR),
            ("gta", "GTA", {"variant": "gta", "n_heads": 32, "n_kv_heads": 4}, KHA_MLP),
            ("mqa", "MQA", {"variant": "gqa", "n_heads": 32, "n_kv_heads": 1}, KHA_MLP),
            ("gqa8x16", "GQA", {"variant": "gqa", "n_heads": 16, "n_kv_heads": 8}, KHA_MLP),
            ("gqa4x32", "GQA", {"variant": "gqa", "n_heads": 32, "n_kv_heads": 4}, KHA_MLP),
            ("mha16", "MHA", {"variant": "gqa", "n_heads": 16, "n_kv_heads": 16}, KHA_MLP)]
    return [v for group, model, attn, kha in rows for v in _arms(group, (BASELINE, kha), {"attention": attn},
                                                                  model=model)]


# Table 5 at tiny scale. The middle sizes are the tiny presets (the paper's moe-a0.8b / dense-0.6b at 1/8
# width); widths 96/128/192 for both families. MoE (16 experts, top-4, as tiny-moe): layers 3/4/5 for the
# paper's 12/18/23, experts 64/96/128 for 768/1152/1536 (the same 2:3:4). Dense: layers 4/4/6 for
# 24/24/36, FFN 3x the width except 3.8x for the largest (the paper's 9728 / 2560). All GQA 32/4, head_dim 16.
TABLE5_SIZES = {
    "moe-s": ("MoE", "tiny-moe", 3, 96, 64),
    "moe-m": ("MoE", "tiny-moe", 4, 128, 96),
    "moe-l": ("MoE", "tiny-moe", 5, 192, 128),
    "dense-s": ("Dense", "tiny", 4, 96, 288),
    "dense-m": ("Dense", "tiny", 4, 128, 384),
    "dense-l": ("Dense", "tiny", 6, 192, 736),
}


def table5(preset: str) -> list[Variant]:
    """Three MoE and three dense sizes (``TABLE5_SIZES``; ``--preset`` is not used): GQA, KHA-MLP, KHA-Linear."""
    out = []
    for group, (kind, size_preset, layers, width, ffn) in TABLE5_SIZES.items():
        overrides = {"n_layers": layers, "attention": {"d_model": width}}
        overrides.update({"moe": {"d_expert": ffn}, "d_ff": 4 * ffn} if kind == "MoE" else {"d_ff": ffn})
        out += _arms(group, (BASELINE, KHA_MLP, KHA_LINEAR), overrides, size_preset, type=kind)
    return out


def study(preset: str) -> list[Variant]:
    """The CPU study of docs/results.md on the ``study`` preset (``--preset`` is not used): baseline GQA,
    KHA-MLP on V, KHA-Linear on Q/K/V, and KHA-MLP on V with weight decay on the knocks too (the paper decays
    every weight; kha's default does not)."""
    arms = [Variant("baseline", "study", "baseline", preset="study"),
            Variant("mlp-v", "study", "KHA-MLP", "mlp", "v", preset="study"),
            Variant("linear-qkv", "study", "KHA-Linear", "linear", "qkv", preset="study"),
            Variant("mlp-v-decay", "study", "KHA-MLP, knocks decayed", "mlp", "v", preset="study",
                    train={"decay_knocks": True})]
    return arms


def study2(preset: str) -> list[Variant]:
    """Study v2 (docs/results.md) on the ``study`` preset: baseline and KHA-MLP v on every seed; KHA-Linear q,k,v
    and KHA-MLP v with its knocks decayed toward the identity on seeds 4-8; an fp32 check of baseline and
    KHA-MLP v (its own group) on seeds 4-6. Those seeds' baselines trained on the machine the other arms train on
    (seeds 0-3 on another), so that no pair spans two machines. Seed-major order puts the complete pairs first."""
    def arm(name, group, label, knock="none", targets=None, seeds=None, **train):
        return Variant(name, group, label, knock, targets, preset="study", train=train, seeds=seeds)

    return [arm("baseline", "study", "baseline"),
            arm("mlp-v", "study", "KHA-MLP", "mlp", "v"),
            arm("linear-qkv", "study", "KHA-Linear", "linear", "qkv", seeds=[4, 5, 6, 7, 8]),
            arm("mlp-v-identity", "study", "KHA-MLP, knocks decayed toward I", "mlp", "v", seeds=[4, 5, 6, 7, 8],
                knock_decay="identity"),
            arm("fp32-baseline", "fp32", "baseline", seeds=[4, 5, 6], precision="fp32"),
            arm("fp32-mlp-v", "fp32", "KHA-MLP", "mlp", "v", seeds=[4, 5, 6], precision="fp32")]


def muon(preset: str) -> list[Variant]:
    """AdamW against Muon (``kha.train.optim``) for the baseline and KHA-MLP v on the ``study`` preset: each
    optimizer is its own group (KHA against its baseline), and Muon - AdamW is a paired contrast per arm."""
    return [Variant(f"{opt}-{name}", opt, label, knock, targets, preset="study", train={"optimizer": opt})
            for opt in ("adamw", "muon") for name, label, knock, targets in (("baseline", "baseline", "none", None),
                                                                              ("mlp-v", "KHA-MLP", "mlp", "v"))]


def docmask(preset: str) -> list[Variant]:
    """The document mask's effect on the ``study`` preset (``--preset`` is not used): baseline and KHA-MLP on V,
    each trained (and validated) without and with ``doc_mask``; the contrasts of ``kha report`` pair them by seed."""
    masked = {"doc_mask": True}
    return [Variant("baseline", "docmask", "baseline", preset="study"),
            Variant("mlp-v", "docmask", "KHA-MLP", "mlp", "v", preset="study"),
            Variant("baseline-doc", "docmask", "baseline, doc mask", preset="study", train=masked),
            Variant("mlp-v-doc", "docmask", "KHA-MLP, doc mask", "mlp", "v", preset="study", train=masked)]


GRIDS = {"table1": table1, "table2": table2, "table3": table3, "table5": table5, "study": study, "study2": study2,
         "muon": muon, "docmask": docmask}


def grid_variants(grid: str, preset: str = "tiny", only: list[str] | None = None) -> list[Variant]:
    """The variants of ``grid`` built on ``preset``; ``only`` keeps the named ones (in grid order)."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; valid grids are {', '.join(GRIDS)}")
    variants = GRIDS[grid](preset)
    if only:
        names = [v.name for v in variants]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown} in grid {grid}; valid are {', '.join(names)}")
        variants = [v for v in variants if v.name in only]
    return variants


def grid_jobs(variants: list[Variant], seeds: list[int]) -> list[tuple[Variant, int]]:
    """Every (variant, seed) to run, seed-major so that complete pairs come first; a variant with ``seeds``
    takes only those."""
    return [(v, s) for s in seeds for v in variants if v.seeds is None or s in v.seeds]


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / variant / f"seed_{seed}"


def run_config(base: TrainConfig, variant: Variant, seed: int, out: Path) -> TrainConfig:
    return replace(base, out=str(run_dir(out, variant.name, seed)), seed=seed, knock=variant.knock,
                   knock_targets=variant.knock_targets, model_overrides=variant.overrides or None,
                   preset=variant.preset or base.preset, resume=False, **variant.train)


def run_state(cfg: TrainConfig) -> tuple[str, int]:
    """``("finished", steps)``, ``("partial", last checkpoint's step)`` or ``("new", 0)``."""
    from .analysis.tables import run_finished
    from .train.callbacks import read_metrics
    from .train.checkpoint import latest_checkpoint, read_meta

    out = Path(cfg.out)
    metrics = out / "metrics.jsonl"
    # a fresh clone of committed results (no weights, no checkpoints) must find its runs finished, never train
    # them again over the record
    if metrics.exists() and run_finished(out, read_metrics(metrics), cfg.steps):
        return "finished", cfg.steps
    latest = latest_checkpoint(out / "checkpoints")
    if latest is not None:
        return "partial", read_meta(latest)["step"]
    return "new", 0


def _check_same_config(cfg: TrainConfig) -> None:
    path = Path(cfg.out) / "train_config.json"
    if not path.exists():
        return
    old, new = read_json(path), cfg.to_dict()
    defaults = TrainConfig().to_dict()  # a field newer than the run has its default there
    # "out": a grid folder moved or renamed still holds the same runs
    differ = [k for k in new if k not in ("out", "resume", "overwrite", "progress")
              and old.get(k, defaults[k]) != new[k]]
    if differ:
        diffs = ", ".join(f"{k}: {old.get(k, defaults[k])!r} -> {new[k]!r}" for k in differ)
        raise ValueError(f"{cfg.out} holds a run with another config ({diffs}); use another --out or remove it")


def _seed_list(seeds) -> list[int] | None:
    """A variant's ``seeds`` as read from a grid.json: a list, None, or (files of older versions) a count n."""
    return list(range(seeds)) if isinstance(seeds, int) else seeds


def write_grid_file(out: Path, grid: str, variants: list[Variant], seeds: list[int], base: TrainConfig) -> None:
    """``OUT/grid.json``: the grid's name, variants, seeds (all ever run here) and shared training settings.

    The variants being run are written as this code defines them; others an earlier call recorded are kept as
    recorded (fields this version does not know included), their seeds read as a list."""
    from .analysis.tables import read_grid

    path = Path(out) / "grid.json"
    records = [asdict(v) for v in variants]
    if path.exists():
        old = read_grid(out)
        if old["grid"] != grid:
            raise ValueError(f"{out} holds grid {old['grid']!r}, not {grid!r}; use another --out")
        seeds = sorted(set(old["seeds"]) | set(seeds))
        running = {v.name for v in variants}
        kept = [{**v, "seeds": _seed_list(v.get("seeds"))} for v in old["variants"] if v["name"] not in running]
        order = [v.name for v in grid_variants(grid, base.preset)]
        records = sorted(kept + records, key=lambda v: order.index(v["name"]) if v["name"] in order else len(order))
    shared = {k: v for k, v in base.to_dict().items() if k not in GRID_FIELDS}
    safe_io.make_dirs(path.parent)
    safe_io.write_text(path, json.dumps({"grid": grid, "seeds": seeds, "train": shared, "variants": records},
                                        indent=1))


def bf16_comparison_warning(configs: list[TrainConfig]) -> str | None:
    """A warning when ``--precision auto`` trains any of ``configs`` in bf16 on a CPU: comparisons of KHA arms
    in bf16 were found unreliable at small scale (docs/benchmarks.md, section h)."""
    import torch

    from .train.loop import planned_precision

    auto = [c for c in configs if c.precision == "auto"]
    cuda = torch.cuda.is_available()
    on_cpu = [c for c in auto if c.device == "cpu" or (c.device == "auto" and not cuda)]
    if not any(planned_precision(c, torch.device("cpu"))[0] == "bf16" for c in on_cpu):
        return None
    return ("warning: --precision auto trains these runs in bf16 on this CPU. Comparisons of KHA arms trained in "
            "bf16 were found unreliable at small scale (tiny preset, 3 seeds: KHA-MLP minus baseline -0.029 in "
            "fp32, +0.090 in bf16; docs/benchmarks.md, section h). For comparisons you will report, pass "
            "--precision fp32 (about 2x slower here); --precision bf16 keeps bf16 without this warning.")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``: this process runs every N-th job of the grid from job I."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard {text!r} is not I/N (e.g. 0/4: the first of 4 workers)") from None
    if not 0 <= index < count:
        raise UserError(f"--shard {text!r}: I must be in [0, N) and N at least 1 (e.g. 0/4 ... 3/4)")
    return index, count


def run_grid(grid: str, out, seeds=3, base: TrainConfig | None = None, only: list[str] | None = None,
             log=print, shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Train every seed x variant of ``grid`` under ``out`` (skip finished runs, resume interrupted ones).

    ``seeds``: a count (seeds 0..n-1) or a list. ``base``: the shared training settings. ``shard``
    ``(I, N)``: run only jobs I, I + N, I + 2N, ... of the grid's seed-major order, so that N processes (on
    one GPU, or on N machines sharing the folder) split a grid between them; each job belongs to one shard.
    Returns one ``{"variant", "seed", "state", "out"}`` per run of this shard, ``state`` being what was found
    before running it.
    A run that stops on a non-finite loss is reported and the grid goes on; a run stopped by a signal
    (``kha.train.stopsignal``) stops the grid.
    """
    from .train import train
    from .train.checkpoint import NonFiniteError
    from .train.stopsignal import StopOnSignal

    base = base or TrainConfig()
    out = Path(out)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds:
        raise UserError("no seeds: --seeds must be a positive integer (seeds 0..N-1)")
    variants = grid_variants(grid, base.preset, only)
    index, count = shard
    jobs = grid_jobs(variants, seeds)[index::count]
    configs = [run_config(base, v, s, out) for v, s in jobs]
    for cfg in configs:
        safe_io.check_no_links(cfg.out, out, doing="train")  # runs/, a variant's or a seed's folder: no link
        _check_same_config(cfg)
    if (note := bf16_comparison_warning(configs)) is not None:
        log(note)
    write_grid_file(out, grid, variants, seeds, base)
    done = []
    with StopOnSignal() as stop:  # shared with the runs' own: a signal between two runs stops the grid too
        for i, ((variant, seed), cfg) in enumerate(zip(jobs, configs, strict=True), 1):
            state, step = run_state(cfg)
            head = f"[{i}/{len(jobs)}] {grid} {variant.name} seed {seed}"
            done.append({"variant": variant.name, "seed": seed, "state": state, "out": cfg.out})
            if state == "finished":
                log(f"{head}: finished, skipped")
                continue
            if stop.signum:
                raise stop.error("between two runs; the same command continues the grid")
            log(f"{head}: resumed from step {step}" if state == "partial" else f"{head}: started")
            t0 = time.perf_counter()
            try:
                # a "new" run folder may hold metrics of a run killed before its first checkpoint: start it afresh
                record = train(replace(cfg, resume=state == "partial", overwrite=state == "new"))
            except NonFiniteError as err:
                log(f"{head}: FAILED: {err}")
                done[-1]["state"] = "failed"
                continue
            except RunStopped:
                log(f"{head}: stopped; the same command continues the grid from where it stopped")
                raise
            log(f"{head}: done in {time.perf_counter() - t0:.0f} s, val_loss "
                f"{record.get('val_loss', float('nan')):.4f}")
    return done


def merge_grid(src, out, log=print) -> dict[str, list[str]]:
    """Copy the finished runs of grid folder ``src`` into grid folder ``out`` (the same grid, trained elsewhere).

    A run is copied only where ``out`` has no folder for it: a run here, finished, interrupted or training now, is
    left as it is (a copy over a run in flight would interleave two runs' metrics). Each run is copied whole
    into a hidden folder beside its place, then renamed into place, so an interrupted merge leaves no half run.
    ``grid.json``'s seeds and variants are united. Returns the ``VARIANT/seed_S`` names ``copied``, ``kept``
    (a folder was here) and ``unfinished`` (not finished in ``src``: not copied).
    """
    import os
    import tempfile

    from .analysis.tables import read_grid, run_finished
    from .train.callbacks import read_metrics
    from .train.loop import RUN_FILES

    src, out = Path(src), Path(out)
    theirs = read_grid(src)
    if (out / "grid.json").exists():
        ours = read_grid(out)
        if ours["grid"] != theirs["grid"]:
            raise UserError(f"{src} holds grid {theirs['grid']!r} and {out} grid {ours['grid']!r}: not one grid")
        here, there = ours.get("train", {}), theirs.get("train", {})
        differ = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k))
        if differ:
            raise UserError(f"{src} and {out} ran {ours['grid']!r} with other training settings ("
                            + ", ".join(f"{k}: {here.get(k)!r} here, {there.get(k)!r} there" for k in differ)
                            + "); merge only runs of the same settings")
        known = {v["name"] for v in ours["variants"]}
        merged = {**ours, "seeds": sorted(set(ours["seeds"]) | set(theirs["seeds"])),
                  "variants": ours["variants"] + [v for v in theirs["variants"] if v["name"] not in known]}
    else:
        merged = theirs
    result = {"copied": [], "kept": [], "unfinished": []}
    for v in merged["variants"]:
        for run in sorted((src / "runs" / v["name"]).glob("seed_*")):
            name = f"{v['name']}/{run.name}"
            config, metrics = run / "train_config.json", run / "metrics.jsonl"
            cfg = read_json(safe_io.inside(config, src)) if config.is_file() else None
            records = read_metrics(safe_io.inside(metrics, src)) if metrics.is_file() else []
            steps = cfg.get("steps") if isinstance(cfg, dict) else None
            if not (isinstance(steps, int) and run_finished(run, records, steps)):
                result["unfinished"].append(name)
                continue
            dest = safe_io.check_no_links(out / "runs" / v["name"] / run.name, out)
            if dest.exists():
                result["kept"].append(name)
                continue
            stage = Path(tempfile.mkdtemp(dir=safe_io.make_dirs(dest.parent, out), prefix=f".merge-{run.name}-"))
            try:
                for file in RUN_FILES:
                    if (run / file).is_file():
                        safe_io.copy_file(run / file, src, stage / file, out)
                os.rename(stage, dest)
            except BaseException:
                safe_io.remove_tree(stage, out)
                raise
            result["copied"].append(name)
    safe_io.write_text(out / "grid.json", json.dumps(merged, indent=1), out)
    for key, names in result.items():
        log(f"{key}: {len(names)}" + (f" ({', '.join(names)})" if names else ""))
    return result


# ----------------------------------------------------------------------------------------------- CLI

def _add_train_overrides(p: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    group = p.add_argument_group("training settings shared by every run (TrainConfig fields)")
    for f in fields(TrainConfig):
        if f.name in GRID_FIELDS:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"(default: {default})")
        else:
            group.add_argument(flag, type=type(default), default=argparse.SUPPRESS,
                               metavar=type(default).__name__.upper(), help=f"(default: {default})")


def _base_config(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)} - set(GRID_FIELDS)
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_ablate(args: argparse.Namespace) -> int:
    from .analysis.tables import read_grid, write_report

    out = Path(args.out)
    if args.merge_from:
        if (found := read_grid(args.merge_from)["grid"]) != args.grid:
            raise UserError(f"{args.merge_from} holds grid {found!r}, not {args.grid!r}")
        merge_grid(args.merge_from, out)
        print(f"merged into {out}; `kha report {out}` and `kha plot {out}` count the merged runs")
        return 0
    if not args.report:
        only = [n.strip() for n in args.only.split(",")] if args.only else None
        shard = parse_shard(args.shard) if args.shard else (0, 1)
        run_grid(args.grid, out, args.seeds, _base_config(args), only, shard=shard)
        if shard[1] > 1:  # the other shards may still run: the report is written once they are all done
            print(f"shard {shard[0]}/{shard[1]} done; when every shard is, `kha ablate {args.grid} --out {out} "
                  "--report` writes the report")
            return 0
    elif not (out / "grid.json").exists():
        raise ValueError(f"{out} holds no grid (no grid.json); run `kha ablate {args.grid} --out {out}` first")
    elif (found := read_grid(out)["grid"]) != args.grid:
        raise ValueError(f"{out} holds grid {found!r}, not {args.grid!r}; report it with `kha ablate {found} --out "
                         f"{out} --report`")
    path = write_report(out)
    print(path.read_text())
    print(f"wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis.tables import write_report

    path = write_report(Path(args.dir), level=args.level, seeds=args.seeds, out=args.out)
    print(path.read_text())
    print(f"wrote {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .analysis.plots import plot_dir

    for path in plot_dir(Path(args.dir), seed=args.seed):
        print(f"wrote {path}")
    return 0


def add_experiment_parsers(sub) -> None:
    """``kha ablate``, ``kha report`` and ``kha plot``."""
    p = sub.add_parser("ablate", help="train a paper ablation grid (table1/2/3/5) x seeds, paired and resumable",
                       description="Train every variant of a paper table x seeds under OUT/runs/VARIANT/seed_S "
                       "(finished runs are skipped, interrupted ones resumed), then write OUT/report.md.")
    p.add_argument("grid", choices=list(GRIDS))
    p.add_argument("--out", required=True, help="grid directory")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    p.add_argument("--only", default=None, help="comma-separated variant names (default: the whole grid)")
    p.add_argument("--report", action="store_true", help="only write the report of what is there; train nothing")
    p.add_argument("--merge-from", default=None, metavar="DIR",
                   help="only copy the finished runs of grid folder DIR (the same grid trained elsewhere, e.g. "
                   "unpacked from grid_on_gpu.sh's archive) into OUT, never over a run folder OUT has; train nothing")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only jobs I, I+N, ... of the grid (0 <= I < N): N processes, on one GPU or on "
                   "machines sharing OUT, split a grid; each writes no report")
    _add_train_overrides(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("report", help="tables of a grid: losses, paired deltas with 95 %% CIs, spikes -> report.md")
    p.add_argument("dir", help="a directory written by kha ablate")
    p.add_argument("--level", type=float, default=0.95, help="confidence level (default: 0.95)")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="count only seeds 0..N-1, e.g. a design's planned seeds once more have run (default: all)")
    p.add_argument("--out", default=None, help="the report's file (default: DIR/report.md)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", help="loss curves, paired deltas and knock heatmaps of a grid or a run -> PNGs")
    p.add_argument("dir", help="a grid directory (kha ablate) or a run directory (kha train)")
    p.add_argument("--seed", type=int, default=None, help="seed whose knocks are drawn (default: the first)")
    p.set_defaults(func=cmd_plot)
