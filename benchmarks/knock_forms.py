"""What the knocks cost in each form: one training step of the whole model, as ``kha train`` runs it, of the
baseline, KHA-MLP (v) and KHA-Linear (q, k, v), each knock in the plain form (the formulas as written, the
reference) and in the fused form (``AttentionConfig.knock_form``: KHA-Linear folded into its projection from 1x
its input width in rows, else ``y + y (T - I)``; W - I residual forms for the MLP; on kha's CPU kernels where
they apply, as ``kha train`` runs it), plus variants of the fused form: through torch's ops (the form the kernels
replaced) and KHA-Linear folded at any batch or at none (so that the fold and the residual form meet in one run);
with the FLOPs overhead ``kha.flops`` predicts beside the measured one.

Shape: the 32.5M CPU model (``common.small_lm_config``: 6 layers, d 512, GQA 32 query / 4 KV heads of 64, SwiGLU
1536, vocabulary 8192), batch 2 x seq 512; ``--quick``: the ``tiny`` preset, batch 2 x seq 64. Every case is
timed in one interleaved group and its ratio taken to the baseline's step of the same round.

    .venv/bin/python benchmarks/knock_forms.py --dtype bf16 [--compile --repeats 20 --json PATH]
    .venv/bin/python benchmarks/knock_forms.py --dtype bf16 --compile --cases mlp-v-fused,linear-qkv-fused
"""

from __future__ import annotations

from dataclasses import replace

import common
from kha import knock as kha_knock
from kha.config import get_preset
from kha.flops import model_flops_per_token


def fold_from(rows_per_input: float):
    """``prepare`` for ``kha_train_step``: every KHA-Linear knock of the model folds from this many rows per input
    feature (0: always, inf: never), so that the folded and the residual fused form are timed in one run."""
    def prepare(model) -> None:
        for module in model.modules():
            if isinstance(module, kha_knock.LinearKnock):
                module.fold_rows_per_input = rows_per_input
    return prepare


def torch_ops(model) -> None:
    """``prepare`` for ``kha_train_step``: every knock's fused form through torch's ops, not kha's CPU kernels (the
    form they replaced)."""
    for module in model.modules():
        if isinstance(module, kha_knock.Knock):
            module.kernels = False


# (id for --cases, knocks, form, how this case's form differs from the library's, its prepare for kha_train_step)
CASES = [("baseline", "baseline", None, None, None),
         ("mlp-v-plain", "mlp-v", "plain", None, None),
         ("mlp-v-fused", "mlp-v", "fused", None, None),
         ("mlp-v-ops", "mlp-v", "fused", "torch's ops", torch_ops),
         ("linear-qkv-plain", "linear-qkv", "plain", None, None),
         ("linear-qkv-fused", "linear-qkv", "fused", None, None),
         ("linear-qkv-ops", "linear-qkv", "fused", "torch's ops", torch_ops),
         ("linear-qkv-fold-any", "linear-qkv", "fused", "folded at any batch", fold_from(0)),
         ("linear-qkv-fold-never", "linear-qkv", "fused", "never folded", fold_from(float("inf")))]


def chosen_cases(arg: str | None) -> list[tuple]:
    """The cases ``--cases`` names (comma-separated ids), the baseline always first; all of them for None."""
    if arg is None:
        return CASES
    ids = [c[0] for c in CASES]
    wanted = [n.strip() for n in arg.split(",") if n.strip()]
    bad = [n for n in wanted if n not in ids]
    if bad or not wanted:
        raise ValueError(f"--cases: unknown case(s) {bad or arg!r}; valid are {', '.join(ids[1:])}")
    return [c for c in CASES if c[0] == "baseline" or c[0] in wanted]


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=12)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (512; --quick: 64)")
    p.add_argument("--fold-rows-per-input", type=float, default=None,
                   help="KHA-Linear's fused form folds from this many rows per projection input feature "
                        f"(default: kha.knock.FOLD_ROWS_PER_INPUT = {kha_knock.FOLD_ROWS_PER_INPUT}); 0 always folds")
    common.add_profile_argument(p)
    p.add_argument("--cases", default=None, help="time only these cases, comma-separated (the baseline is always "
                                                  f"timed); default all: {', '.join(c[0] for c in CASES[1:])}")
    args = p.parse_args()
    try:
        cases_run = chosen_cases(args.cases)
    except ValueError as e:
        p.error(str(e))
    if args.fold_rows_per_input is not None:
        if args.fold_rows_per_input < 0:
            p.error(f"--fold-rows-per-input must be >= 0, got {args.fold_rows_per_input}")
        kha_knock.FOLD_ROWS_PER_INPUT = args.fold_rows_per_input
    env = common.setup(args)
    info = common.machine_info(env)
    common.print_banner("Training step of the whole model: knock forms against the baseline", info)
    base_cfg = get_preset("tiny") if env.quick else common.small_lm_config()
    seq = args.seq_len or (64 if env.quick else 512)
    flags = f"--precision {args.dtype}{' --compile' if env.compile else ''}"
    print(f"- model: {common.describe(base_cfg)}; batch {args.batch} x seq {seq}; the step of `kha train {flags}` "
          f"(loss inside, clipping, AdamW); KHA-Linear fused folds from {kha_knock.FOLD_ROWS_PER_INPUT:g} rows per "
          "input feature\n", flush=True)
    precision = "bf16" if args.dtype == "bf16" else "fp32"
    base_flops = model_flops_per_token(base_cfg, seq)
    cases, meta = [], {}
    for _, key, form, differs, prepare in cases_run:
        label, knock, targets = common.KNOCKS[key]
        cfg = base_cfg.with_knock(knock, targets)
        if form is not None:
            cfg = replace(cfg, attention=replace(cfg.attention, knock_form=form))
        shown = form if differs is None else f"{form}, {differs}"
        name = key if form is None else f"{key} {shown}"
        step = common.kha_train_step(cfg, args.batch, seq, precision, env.compile, env.device, prepare=prepare)
        cases.append(common.Case(name, step))
        meta[name] = {"label": label, "form": shown, "predicted_flops_overhead": model_flops_per_token(cfg, seq)
                      / base_flops - 1}
    stats = common.summarize(common.measure(cases, env, "knock forms"), "baseline")
    rows, results = [], []
    for case in cases:
        s, m = stats[case.name], meta[case.name]
        rows.append([m["label"], m["form"] or "", common.fmt_time(s), common.fmt_ratio(s), common.fmt_ratio_ci(s),
                     common.fmt_pct(s["ratio"] - 1), common.fmt_pct(m["predicted_flops_overhead"])])
        results.append({"case": case.name, **m, "batch": args.batch, "seq_len": seq, **s})
    print(common.markdown_table(["model", "knock form", "step ms", "ratio to baseline", "95 % CI of the ratio",
                                 "measured overhead",
                                 "predicted FLOPs overhead"], rows))
    print("\nPredicted: model FLOPs per token with the knocks over the baseline's (kha.flops.model_flops_per_token, "
          "eq. 12 for the knocks). The fused KHA-Linear form folds T into the projection (fewer FLOPs, plus a fold "
          f"per step that does not grow with the batch) only where the rows are at least "
          f"{kha_knock.FOLD_ROWS_PER_INPUT:g}x the projection's input width; below that it runs the residual form.")
    common.finish(args, info, results)
    labels = {name: f"{m['label']} {m['form'] or ''}".strip() for name, m in meta.items()}
    common.profile_after_timing(args, env, info, cases, stats, results, labels)


if __name__ == "__main__":
    main()
