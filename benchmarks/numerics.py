"""Does bf16 autocast change what training reaches? The same model, seed and batches trained in fp32 and in bf16
(``--precision fp32`` vs ``bf16``), paired by seed: the difference of final validation loss against the
seed-to-seed spread of the fp32 runs. Not a timing: a busy machine changes only how long it takes.

Default: ``configs/tiny.toml`` (the tiny preset, 8 x 128 tokens per step) for 300 steps, seeds 0-4, on the
Shakespeare corpus (``kha data prepare --out data/shakespeare`` first).

    .venv/bin/python benchmarks/numerics.py [--config configs/tiny.toml --steps 300 --seeds 5 --out runs/numerics
                                             --json docs/benchmarks/numerics-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import torch

import common
from kha.analysis.tables import fmt_summary, paired_delta, summarize
from kha.train import train
from kha.train.callbacks import read_metrics
from kha.train.config import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("runs/numerics"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    base = replace(load_config(args.config), steps=args.steps, eval_every=args.steps, progress=False)
    print("# fp32 vs bf16 autocast: final validation loss, paired by seed\n")
    print(f"- machine: {common.cpu_model()}, {torch.get_num_threads()} torch threads; python "
          f"{platform.python_version()}, torch {torch.__version__}; config {args.config} ({base.preset}, "
          f"{base.batch_size} x {base.seq_len} tokens per step), {args.steps} steps, seeds 0-{args.seeds - 1}\n",
          flush=True)
    losses: dict[str, dict[int, float]] = {"fp32": {}, "bf16": {}}
    for seed in range(args.seeds):
        for precision in losses:
            out = args.out / f"{precision}_seed_{seed}"
            metrics = out / "metrics.jsonl"
            records = read_metrics(metrics) if metrics.exists() else []
            reused = bool(records and records[-1]["step"] == args.steps and "val_loss" in records[-1])
            if not reused:
                train(replace(base, out=str(out), seed=seed, precision=precision, overwrite=True))
                records = read_metrics(metrics)
            losses[precision][seed] = records[-1]["val_loss"]
            note = f" (finished run reused from {out}: delete it to train again after a code change)" if reused else ""
            print(f"seed {seed} {precision}: val_loss {losses[precision][seed]:.4f}{note}", flush=True)
    delta = paired_delta(losses["bf16"], losses["fp32"])
    spread = summarize(losses["fp32"].values())
    print("\n| quantity | value |\n|---|---|")
    print(f"| fp32 final val loss, mean ± sd [95 % CI] | {fmt_summary(spread, 4)} |")
    print(f"| bf16 final val loss | {fmt_summary(summarize(losses['bf16'].values()), 4)} |")
    print(f"| bf16 - fp32, paired by seed | {fmt_summary(delta, 4, signed=True, mark=True)} |")
    print(f"| seed-to-seed sd of fp32 | {spread.sd:.4f} |")
    inside = "contains 0" if not delta.excludes_zero else "excludes 0"
    worse = sum(losses["bf16"][s] > losses["fp32"][s] for s in losses["fp32"])
    print(f"\nThe paired difference's 95 % interval {inside}; its mean ({delta.mean:+.4f}) is "
          f"{abs(delta.mean) / spread.sd:.2f} seed-to-seed sd of fp32 ({spread.sd:.4f}); bf16 ended higher in "
          f"{worse} of {len(losses['fp32'])} seeds.")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "steps": args.steps, "losses": losses,
                                         "paired_delta": delta.__dict__, "fp32_sd": spread.sd}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
