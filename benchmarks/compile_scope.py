"""``kha train --compile``'s two scopes (``TrainConfig.compile_scope``): the whole model in one graph against each
block compiled on its own, as the model gets deeper: how long compilation takes (the first step, on an empty
compile cache) and the step time after it.

Each measurement is its own process (``python compile_scope.py --child``) with an empty Inductor cache, so every
first step compiles from nothing; the two scopes alternate, ``--rounds`` times per depth. A step is
``common.kha_train_step``: ``kha train``'s step on a fixed batch, in the precision given.

    .venv/bin/python benchmarks/compile_scope.py [--preset tiny-moe --layers 4,12 --rounds 2 --steps 8
                                                  --precision bf16 --json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import common
from kha.config import PRESETS

SCOPES = ("model", "blocks")


def child(args) -> None:
    """One process: build, time the first step (compilation) and then ``--steps`` more; print them as JSON."""
    common.keep_freed_memory()
    cfg = replace(PRESETS[args.preset].config, n_layers=args.child_layers)
    step = common.kha_train_step(cfg, args.batch_size, args.seq_len, args.precision, True, torch.device("cpu"),
                                 compile_scope=args.child_scope)
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"first_step_s": times[0], "median_step_s": statistics.median(times[2:]),
                      "graphs": common.compiled_graphs()}))


def run(args, scope: str, layers: int) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--child-scope", scope, "--child-layers", str(layers),
               *(f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("preset", "steps", "precision",
                                                                          "batch_size", "seq_len"))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"scope": scope, "layers": layers, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument("--layers", default="4,12", help="depths to compare, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="processes per scope and depth, the scopes alternating")
    p.add_argument("--steps", type=int, default=8, help="steps timed after the first (median over all but the first)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json")
    p.add_argument("--child-scope", choices=SCOPES, help=argparse.SUPPRESS)
    p.add_argument("--child-layers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_scope:
        return child(args)
    if args.steps < 2 or args.rounds < 1:
        p.error(f"--steps {args.steps} and --rounds {args.rounds}: need steps >= 2 and rounds >= 1")
    depths = [int(n) for n in args.layers.split(",")]
    print(f"# kha train --compile: compile scope model vs blocks\n\n- torch {torch.__version__}, kha "
          f"{common.code_version(common.PACKAGE_DIR, common.ROOT / 'benchmarks')}, {common.cpu_model()}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; cpu, {args.precision}, preset "
          f"{args.preset} at {', '.join(map(str, depths))} layers, batch {args.batch_size} x seq {args.seq_len}; each "
          f"process on an empty compile cache, {args.rounds} per scope and depth, scopes alternating\n", flush=True)
    results = [run(args, scope, layers) for layers in depths for _ in range(args.rounds) for scope in SCOPES]
    print("| layers | scope | first step s (compilation), each process | median step ms, each process |\n"
          "|---|---|---|---|")
    for layers in depths:
        for scope in SCOPES:
            rs = [r for r in results if r["layers"] == layers and r["scope"] == scope]
            firsts = ", ".join(f"{r['first_step_s']:.1f}" for r in rs)
            steps = ", ".join(f"{1e3 * r['median_step_s']:.0f}" for r in rs)
            print(f"| {layers} | {scope} | {firsts} | {steps} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
