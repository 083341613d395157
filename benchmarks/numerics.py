"""Does bf16 autocast change what training reaches, and the KHA contrast? The same model, seed and batches trained
in fp32 and in bf16 (``--precision fp32`` vs ``bf16``), paired by seed: per arm the difference of final validation
loss bf16 - fp32, and for each knocked arm its contrast to the baseline (arm - baseline, paired by seed) in bf16
against the same contrast in fp32. Knocked arms run in bf16 in each ``--forms`` (``AttentionConfig.knock_form``:
``plain``, the formulas as written, as before the fused form existed; ``fused``, the default). fp32 runs use the
default (fused) form only: in fp32 both forms compute the same function to rounding (tests/test_knock_forms.py).
Not a timing: a busy machine changes only how long it takes.

Default: ``configs/tiny.toml`` (the tiny preset, 8 x 128 tokens per step) for 300 steps, seeds 0-4, baseline only,
on the Shakespeare corpus (``kha data prepare --out data/shakespeare`` first). The demo's scale with the KHA arms:

    .venv/bin/python benchmarks/numerics.py --batch-size 16 --steps 200 --lr 3e-3 --seeds 8 \\
        --arms baseline mlp-v linear-qkv --forms plain fused --out runs/numerics-kha \\
        --json docs/benchmarks/numerics-kha-cpu.json

Finished runs in ``--out`` are reused (delete them to train again after a code change), so an interrupted
invocation continues where it stopped; ``--json`` is rewritten after every run. Runs go seed by seed, every
condition of a seed before the next seed.
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import torch

import common
from kha.analysis.tables import Summary, fmt_summary, paired_delta, summarize
from kha.train import train
from kha.train.callbacks import read_metrics
from kha.train.config import load_config

ARMS = {key: common.KNOCKS[key] for key in ("baseline", "mlp-v", "linear-qkv", "linear-v", "gate-v")}


def conditions(arm: str, forms: list[str]) -> list[tuple[str, str | None]]:
    """(precision, form) of every run of ``arm``: fp32 once, bf16 once per form (the baseline has no knocks)."""
    if ARMS[arm][1] == "none":
        return [("fp32", None), ("bf16", None)]
    return [("fp32", None)] + [("bf16", form) for form in forms]


def label(precision: str, form: str | None) -> str:
    return precision if form is None else f"{precision} {form}"


def final_loss(base, out: Path, seed: int, precision: str, knock: str, targets, form: str | None) -> tuple[float, bool]:
    """Final validation loss of the run in ``out``, training it first unless it finished before."""
    metrics = out / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    reused = bool(records and records[-1]["step"] == base.steps and "val_loss" in records[-1])
    if not reused:
        overrides = None if form is None else {"attention": {"knock_form": form}}
        train(replace(base, out=str(out), seed=seed, precision=precision, knock=knock, knock_targets=targets,
                      model_overrides=overrides, overwrite=True))
        records = read_metrics(metrics)
    return records[-1]["val_loss"], reused


def summary_dict(s: Summary | None) -> dict | None:
    return None if s is None else dict(s.__dict__)


def report(losses: dict[str, dict[str, dict[int, float]]], args) -> dict:
    """Print the tables; return the summaries for the JSON."""
    out: dict = {"bf16_minus_fp32": {}, "contrast": {}}
    print("\n## bf16 - fp32, paired by seed\n")
    print("| arm | condition | fp32 final val loss | bf16 - fp32 |\n|---|---|---|---|")
    for arm, by_cond in losses.items():
        for cond, values in by_cond.items():
            if cond == "fp32":
                continue
            delta = paired_delta(values, by_cond.get("fp32", {}))
            out["bf16_minus_fp32"][f"{arm} | {cond}"] = summary_dict(delta)
            print(f"| {ARMS[arm][0]} | {cond} | {fmt_summary(summarize(by_cond.get('fp32', {}).values()), 4)} | "
                  f"{fmt_summary(delta, 4, signed=True, mark=True)} |")
    base = losses.get("baseline", {})
    knocked = [arm for arm in losses if arm != "baseline"]
    if not base or not knocked:
        return out
    print("\n## KHA contrast (arm - baseline, paired by seed): bf16 against fp32\n")
    print("| arm | precision (form) | contrast | bf16 contrast - fp32 contrast | seeds |\n|---|---|---|---|---|")
    for arm in knocked:
        fp32 = {s: v - base["fp32"][s] for s, v in losses[arm].get("fp32", {}).items() if s in base.get("fp32", {})}
        print(f"| {ARMS[arm][0]} | fp32 | {fmt_summary(summarize(fp32.values()), 4, signed=True, mark=True)} | | "
              f"{len(fp32)} |")
        out["contrast"][f"{arm} | fp32"] = {"per_seed": fp32, "summary": summary_dict(summarize(fp32.values()))}
        for cond in losses[arm]:
            if cond == "fp32":
                continue
            bf16 = {s: losses[arm][cond][s] - base["bf16"][s] for s in losses[arm][cond] if s in base.get("bf16", {})}
            gap = paired_delta(bf16, fp32)
            print(f"| {ARMS[arm][0]} | {cond} | {fmt_summary(summarize(bf16.values()), 4, signed=True, mark=True)} | "
                  f"{fmt_summary(gap, 4, signed=True, mark=True)} | {len(bf16)} |")
            out["contrast"][f"{arm} | {cond}"] = {"per_seed": bf16, "summary": summary_dict(summarize(bf16.values())),
                                                  "minus_fp32_contrast": summary_dict(gap)}
    print("\n`*`: the paired 95 % interval excludes 0. The bf16 contrast is within the noise of the fp32 one when "
          "the interval of their paired difference contains 0 and its mean is small against the fp32 contrast's sd.")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the config's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the config's)")
    p.add_argument("--preset", default=None, help="model preset (default: the config's)")
    p.add_argument("--data", default=None, help="prepared data folder (default: the config's)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="validation batches of the final evaluation (default: the config's)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=["baseline"])
    p.add_argument("--forms", nargs="+", choices=["plain", "fused"], default=["fused"],
                   help="knock forms the knocked arms run in bf16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every run; with --deterministic so that a run repeats bit for bit")
    p.add_argument("--out", type=Path, default=Path("runs/numerics"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    base = replace(load_config(args.config), steps=args.steps, eval_every=args.steps, progress=False)
    changes = {k: v for k, v in (("batch_size", args.batch_size), ("seq_len", args.seq_len), ("lr", args.lr),
                                 ("preset", args.preset), ("data", args.data),
                                 ("eval_batches", args.eval_batches)) if v is not None}
    base = replace(base, **changes)
    if args.compile:
        base = replace(base, compile=True, deterministic=True)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print("# fp32 vs bf16 autocast: final validation loss, paired by seed\n")
    mode = "compiled, deterministic" if args.compile else "eager"
    setup = (f"config {args.config} ({base.preset}, {base.batch_size} x {base.seq_len} tokens per step, LR {base.lr}, "
             f"data {base.data}, {base.eval_batches} validation batches, {mode}), "
             f"{args.steps} steps, seeds {seeds.start}-{seeds.stop - 1}, arms {', '.join(args.arms)}, "
             f"bf16 knock forms {', '.join(args.forms)}")
    print(f"- machine: {common.cpu_model()}, {torch.get_num_threads()} torch threads; python "
          f"{platform.python_version()}, torch {torch.__version__}; {setup}\n", flush=True)
    losses = {arm: {label(*c): {} for c in conditions(arm, args.forms)} for arm in args.arms}
    for seed in seeds:
        for arm in args.arms:
            _, knock, targets = ARMS[arm]
            for precision, form in conditions(arm, args.forms):
                name = "_".join(x for x in (arm, precision, form) if x)
                out = args.out / f"{name}_seed_{seed}"
                loss, reused = final_loss(base, out, seed, precision, knock, targets, form)
                losses[arm][label(precision, form)][seed] = loss
                note = f" (finished run reused from {out})" if reused else ""
                print(f"seed {seed} {arm} {label(precision, form)}: val_loss {loss:.4f}{note}", flush=True)
                if args.json:
                    write_json(args, setup, losses, None)
    summaries = report(losses, args)
    if args.json:
        write_json(args, setup, losses, summaries)
        print(f"wrote {args.json}")


def write_json(args, setup: str, losses: dict, summaries: dict | None) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": args.config, "steps": args.steps, "setup": setup, "losses": losses}
    if summaries is not None:
        payload["summaries"] = summaries
    args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
