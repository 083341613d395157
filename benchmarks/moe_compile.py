"""``kha train --compile`` on an MoE preset against the same run eager: how often it recompiles while the routing
changes, and its step time.

Runs ``kha train --config PRESET`` twice as subprocesses (compiled with ``TORCH_LOGS=recompiles``, and eager; the
same seed, data, precision and steps), counts the recompilations logged, and compares the median step time of
the steps after the first ``--skip`` of each process (compilation and warm-up). One after the other (the
default) the two runs see the machine at different times; ``--slices N`` runs them in turns, N slices each
(``kha train --stop-after``, then ``--resume``: the same runs bit for bit), so that drift hits both alike.
``--returned-memory`` adds the two runs with ``--no-keep-freed-memory`` (the allocator's default: freed memory
goes back to the system), in the same turns, and compares each mode with and without it.

    .venv/bin/python benchmarks/moe_compile.py --data DIR [--preset tiny-moe --steps 100 --precision bf16
                                                         --device cpu --slices 4 --skip 5 --returned-memory
                                                         --json PATH]
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

from kha.runfiles import code_version

ROOT = Path(__file__).resolve().parent.parent


def call(args, out: Path, compile: bool, keep: bool, stop_after: int, resume: bool) -> tuple[str, float]:
    """One ``kha train`` process of the run in ``out`` (up to ``stop_after``, 0: to the end; ``keep``: freed
    memory kept in the process, kha train's default): its stderr and wall time."""
    cmd = [sys.executable, "-m", "kha.cli", "train", "--config", args.preset, "--data", args.data, "--out", str(out),
           "--steps", str(args.steps), "--precision", args.precision, "--device", args.device,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--eval-every", str(args.steps),
           "--eval-batches", "1", "--ckpt-every", str(args.steps), "--stop-after", str(stop_after), "--no-progress",
           *(["--compile", "--compile-scope", args.compile_scope] if compile else []),
           *([] if keep else ["--no-keep-freed-memory"]),
           *(["--resume"] if resume else [])]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if compile:
        env["TORCH_LOGS"] = "recompiles"
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stderr, time.perf_counter() - start


def summary(args, out: Path, compile: bool, stderrs: list[str], wall_s: float, starts: list[int]) -> dict:
    """The run's recompilations, first step, and median step time over its steps but the first ``args.skip`` of
    each process (``starts``: the step each began after)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warm = {start + i for start in starts for i in range(1, args.skip + 1)}
    timed = {r["step"]: args.batch_size * args.seq_len / r["tokens_per_s"] for r in records if r["step"] not in warm}
    ends = [*starts[1:], args.steps]
    per_slice = [statistics.median([t for step, t in timed.items() if a < step <= b])
                 for a, b in zip(starts, ends, strict=True)]
    return {"compile": compile, "wall_s": wall_s, "median_step_s": statistics.median(timed.values()),
            "steps_timed": len(timed), "slice_median_step_s": per_slice,
            "first_step_s": args.batch_size * args.seq_len / records[0]["tokens_per_s"],
            "recompiles": sum(len(re.findall(r"Recompiling function", e)) for e in stderrs),
            "final_loss": records[-1]["loss"]}


def label(compile: bool, keep: bool) -> str:
    return ("compiled" if compile else "eager") + ("" if keep else ", memory returned")


def compare(results: dict, run: tuple, baseline: tuple, what: str) -> None:
    """Print the ratio of two runs' median steps, and per slice (the runs ran in turns)."""
    a, b = results[run], results[baseline]
    ratios = [x / y for x, y in zip(a["slice_median_step_s"], b["slice_median_step_s"], strict=True)]
    print(f"{what}: {a['median_step_s'] / b['median_step_s']:.2f}"
          + (f" (per slice: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a prepared data folder (kha data prepare)")
    p.add_argument("--preset", default="tiny-moe")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=int, default=10, help="steps of each process left out of the median (compilation, "
                                                         "warm-up)")
    p.add_argument("--slices", type=int, default=1, help="run the two in turns, this many slices each (kha train "
                                                         "--stop-after, then --resume), so that both see the machine "
                                                         "alike; 1: one after the other")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--compile-scope", default="model", choices=("model", "blocks"),
                   help="kha train --compile-scope of the compiled run")
    p.add_argument("--returned-memory", action="store_true", help="also run both with --no-keep-freed-memory, in the "
                                                                      "same turns")
    p.add_argument("--json")
    args = p.parse_args()
    if not 1 <= args.slices <= args.steps or args.skip < 0 or args.skip >= args.steps // args.slices:
        p.error(f"--slices {args.slices} and --skip {args.skip} leave no step to time in a slice of {args.steps} "
                "steps: need 1 <= slices <= steps and 0 <= skip < steps / slices")
    print(f"# kha train --config {args.preset} --compile (scope {args.compile_scope}) vs eager\n\n- torch "
          f"{torch.__version__}, kha {code_version()}, {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.2f}; {args.device}, {args.precision}, batch {args.batch_size} x "
          f"seq {args.seq_len}, {args.steps} steps in {args.slices} slice(s) each, run in turns (median over each "
          f"process's steps after its first {args.skip})\n", flush=True)
    ends = sorted({round(args.steps * (i + 1) / args.slices) for i in range(args.slices)})
    starts = [0, *ends[:-1]]
    keeps = (True, False) if args.returned_memory else (True,)
    runs = [(compile, keep) for keep in keeps for compile in (True, False)]  # (compile, keep_freed_memory)
    stderrs, walls = {run: [] for run in runs}, dict.fromkeys(runs, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {run: Path(tmp) / label(*run) for run in runs}
        for i, end in enumerate(ends):  # the runs in turns, a slice each
            for run in runs:
                stderr, wall = call(args, outs[run], *run, end if end < args.steps else 0, resume=i > 0)
                stderrs[run].append(stderr)
                walls[run] += wall
        results = {run: {"run": label(*run), "keep_freed_memory": run[1],
                         **summary(args, outs[run], run[0], stderrs[run], walls[run], starts)} for run in runs}
    print("| run | recompiles | first step s | median step ms | wall s | final loss |\n|---|---|---|---|---|---|")
    for (compile, _), r in results.items():
        print(f"| {r['run']} | {r['recompiles'] if compile else '-'} | {r['first_step_s']:.1f} | "
              f"{1e3 * r['median_step_s']:.1f} | {r['wall_s']:.0f} | {r['final_loss']:.4f} |")
    print()
    compare(results, (True, True), (False, True), "compiled step / eager step")
    if args.returned_memory:
        for compile in (True, False):
            compare(results, (compile, True), (compile, False), f"{label(compile, True)}: memory kept / returned")
    results = list(results.values())
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
