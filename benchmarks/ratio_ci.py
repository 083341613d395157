"""The paired ratio to a baseline case, and the 95 % confidence interval of its median, recomputed from the
per-round times a benchmark's JSON keeps (``times_s``): for runs written before the benchmarks printed the
interval, and to judge a target (met only when the whole interval is at or below it).

    .venv/bin/python benchmarks/ratio_ci.py docs/benchmarks/knock_forms-cpu-bf16-compiled.json [--baseline NAME]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="a benchmark's --json output")
    p.add_argument("--baseline", default="baseline", help="the case the ratios are taken to (default: baseline)")
    args = p.parse_args()
    results = json.loads(args.json.read_text())["results"]
    timings = {r["case"]: common.Timing(r["times_s"]) for r in results if "times_s" in r}
    if args.baseline not in timings:
        raise SystemExit(f"{args.json}: no case {args.baseline!r} with per-round times; cases: {sorted(timings)}")
    if len({len(t.times) for t in timings.values()}) != 1:
        raise SystemExit(f"{args.json}: the cases have different numbers of rounds, so they cannot be paired")
    stats = common.summarize(timings, args.baseline)
    rows = [[name, s["n"], common.fmt_ratio(s), common.fmt_ratio_ci(s)] for name, s in stats.items()]
    print(common.markdown_table(["case", "rounds", "ratio to baseline, median [quartiles]", "95 % CI of the median"],
                                rows))


if __name__ == "__main__":
    main()
