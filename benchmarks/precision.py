"""Which precision and compile setting trains fastest, shape by shape: the evidence behind ``--precision auto``.

One optimizer step exactly as ``kha train`` runs it (``DecoderLM`` with the loss inside, ``kha.train.precision``'s
autocast, gradient clipping, ``kha.train.optim.build_optimizer``'s AdamW, ``kha.train.distributed.parallelize``
for ``--compile``), for each shape in four settings: fp32 eager (the baseline of the shape), bf16 eager, fp32
compiled, bf16 compiled; where ``kha.cpu_kernels``'s attention kernel covers the shape (bf16 runs on it and on
the fused kernels), bf16 eager and compiled once more with all of them off ("torch's ops", as with
``KHA_CPU_KERNELS=0``). Ratios are tokens/s against fp32
eager of the same shape, cases interleaved round by round. The ``auto`` column says what ``--precision auto``
picks on this machine for the shape.

Shapes (batch x seq): ``tiny`` (d 128, 32/4 heads of 16; 16 x 128, as ``make demo``), ``tiny-cfg`` (the same
model at ``configs/tiny.toml``'s 8 x 128), ``study`` (d 256, 16/4 heads of 32; 16 x 256), ``small`` (the 32.5M
model of the other benchmarks, d 512, 32/4 heads of 64; 2 x 512); on request ``tiny-moe`` (16 x 128: compiled
against eager in one process, interleaved, where ``moe_compile.py`` runs two ``kha train`` processes in turn).
``--quick``: tiny only, few repeats.

    .venv/bin/python benchmarks/precision.py [--shapes tiny,study,small --no-compile --json PATH]
"""

from __future__ import annotations

import common
from kha import cpu_kernels
from kha.config import get_preset
from kha.model import DecoderLM

SHAPES = {"tiny": ("tiny", 16, 128), "tiny-cfg": ("tiny", 8, 128), "study": ("study", 16, 256),
          "small": ("small", 2, 512), "tiny-moe": ("tiny-moe", 16, 128)}  # tiny-moe: not in the default list


def model_config(name: str):
    return common.small_lm_config() if name == "small" else get_preset(name)


def with_torch_ops(step):
    """``step`` with ``kha.cpu_kernels`` switched off (torch's SDPA and ops instead)."""

    def run():
        saved, cpu_kernels._state = cpu_kernels._state, False
        try:
            step()
        finally:
            cpu_kernels._state = saved

    return run


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=6)
    p.add_argument("--shapes", default="tiny,tiny-cfg,study,small", help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--no-compile", action="store_true", help="eager cases only")
    args = p.parse_args()
    env = common.setup(args)
    info = common.machine_info(env)
    info["compile"] = not args.no_compile
    info["dtype"] = "fp32 and bf16 autocast (one case each)"
    common.print_banner("Training step as kha train runs it: fp32 vs bf16 autocast, eager vs compiled", info)
    names = ["tiny"] if env.quick else [s.strip() for s in args.shapes.split(",")]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; valid are {', '.join(SHAPES)}")
    common.static_compile_settings()
    settings = [("fp32", False), ("bf16", False)] + ([] if args.no_compile else [("fp32", True), ("bf16", True)])
    rows, results = [], []
    for name in names:
        preset, batch, seq = SHAPES[name]
        cfg = model_config(preset)
        auto, why, covered = common.auto_precision(cfg, batch, seq, env.device)
        print(f"- {name}: {common.describe(cfg)}; {common.n_params(DecoderLM(cfg)):,} parameters; batch {batch} x "
              f"seq {seq}; auto picks {auto} ({why})", flush=True)
        cases = [common.Case(f"{prec}{' compiled' if comp else ''}",
                             common.kha_train_step(cfg, batch, seq, prec, comp, env.device)) for prec, comp in settings]
        if covered:
            for comp in sorted({comp for _, comp in settings}):
                step = common.kha_train_step(cfg, batch, seq, "bf16", comp, env.device)
                cases.append(common.Case(f"bf16{' compiled' if comp else ''}, torch's ops",
                                         with_torch_ops(step)))
        stats = common.summarize(common.measure(cases, env, name), "fp32")
        for case in cases:
            s = stats[case.name]
            tok_s = batch * seq / s["median_s"]
            speedup = 1 / s["ratio"]
            rows.append([name, case.name, common.fmt_time(s), f"{tok_s:,.0f}", f"{speedup:.2f}x",
                         "yes" if case.name == auto else ""])
            results.append({"shape": name, "case": case.name, "tokens_per_step": batch * seq, "tokens_per_s": tok_s,
                            "speedup_vs_fp32_eager": speedup, "auto": case.name == auto, **s})
    print()
    print(common.markdown_table(["shape", "setting", "step ms", "tokens/s", "speed vs fp32 eager",
                                 "auto's pick (eager)"], rows))
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
