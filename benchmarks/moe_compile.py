"""``kha train --compile`` on an MoE preset against the same run eager: how often it recompiles while the routing
changes, and its step time.

Runs ``kha train --config PRESET`` twice as subprocesses (compiled with ``TORCH_LOGS=recompiles``, then eager; the
same seed, data, precision and steps), counts the recompilations logged, and compares the median step time of
the steps after the first ``--skip`` (compilation and warm-up). On a shared machine the two runs see different
loads: read the ratio as rough, and rerun on a quiet machine.

    .venv/bin/python benchmarks/moe_compile.py --data DIR [--preset tiny-moe --steps 100 --precision bf16
                                                         --device cpu --json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run(args, out: Path, compile: bool) -> dict:
    cmd = [sys.executable, "-m", "kha.cli", "train", "--config", args.preset, "--data", args.data, "--out", str(out),
           "--steps", str(args.steps), "--precision", args.precision, "--device", args.device,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-every", str(args.steps),
           "--eval-batches", "1", "--ckpt-every", str(args.steps), "--no-progress", *(["--compile"] if compile else [])]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if compile:
        env["TORCH_LOGS"] = "recompiles"
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [args.batch_size * args.seq_len / r["tokens_per_s"] for r in records[min(args.skip, len(records) - 1):]]
    recompiles = len(re.findall(r"Recompiling function", proc.stderr))
    return {"compile": compile, "wall_s": time.perf_counter() - start, "median_step_s": statistics.median(step_s),
            "first_step_s": args.batch_size * args.seq_len / records[0]["tokens_per_s"], "recompiles": recompiles,
            "final_loss": records[-1]["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a prepared data folder (kha data prepare)")
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=int, default=10, help="steps left out of the median (compilation, warm-up)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--json")
    args = p.parse_args()
    print(f"# kha train --config {args.preset} --compile vs eager\n\n- torch {torch.__version__}, {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.2f}; {args.device}, {args.precision}, batch {args.batch_size} x "
          f"seq {args.seq_len}, {args.steps} steps (median over steps {args.skip + 1}-{args.steps})\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(args, Path(tmp) / name, name == "compiled") for name in ("compiled", "eager")]
    compiled, eager = results
    print("| run | recompiles | first step s | median step ms | wall s | final loss |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {'compiled' if r['compile'] else 'eager'} | {r['recompiles'] if r['compile'] else '-'} | "
              f"{r['first_step_s']:.1f} | {1e3 * r['median_step_s']:.1f} | {r['wall_s']:.0f} | {r['final_loss']:.4f} |")
    print(f"\ncompiled step / eager step: {compiled['median_step_s'] / eager['median_step_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
