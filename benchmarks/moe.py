"""What an MoE step costs: an MoE model against the dense model with the same activated parameters, and the three
ways of running the experts (``kha.model``): ``torch._grouped_mm`` (the default where it works), the padded
batched matmul (the fallback), and the per-expert Python loop (the reference the tests compare against).

Each step is ``kha train``'s (loss inside, clipping, AdamW) in the precision ``--precision auto`` picks for the
shape. Shapes: ``tiny`` (the ``tiny-moe`` preset, 16 experts of 96, top-4, against ``tiny``: 2.23M activated
parameters both, plus the router's own; batch 16 x 128) and ``study`` (d 256, 16 experts of 192, top-4, against
the ``study`` preset with SwiGLU 768 = 4 x 192; batch 16 x 256). Ratios: step time against the dense model's in
the same run.

    .venv/bin/python benchmarks/moe.py [--shapes tiny,study --json PATH]
"""

from __future__ import annotations

from dataclasses import replace

import common
import kha.model
from kha.config import MoEConfig, get_preset
from kha.model import count_parameters

EXPERTS = {"grouped": kha.model.run_experts_grouped, "padded": kha.model.run_experts_padded,
           "loop": kha.model.run_experts_loop}


def shapes() -> dict:
    study = get_preset("study")
    study_moe = replace(study, moe=MoEConfig(n_experts=16, top_k=4, d_expert=study.d_ff // 4))
    return {"tiny": (get_preset("tiny"), get_preset("tiny-moe"), 16, 128), "study": (study, study_moe, 16, 256)}


def with_experts(step, form):
    """``step`` with ``kha.model.run_experts`` replaced by ``form`` while it runs."""

    def run():
        kept = kha.model.run_experts
        kha.model.run_experts = form
        try:
            step()
        finally:
            kha.model.run_experts = kept

    return run


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=6)
    p.add_argument("--shapes", default="tiny,study")
    args = p.parse_args()
    env = common.setup(args)
    info = common.machine_info(env)
    common.print_banner("MoE step vs the dense model of equal activated parameters; expert implementations", info)
    table = shapes()
    names = ["tiny"] if env.quick else [s.strip() for s in args.shapes.split(",")]
    rows, results = [], []
    for name in names:
        dense, moe, batch, seq = table[name]
        dense_n, moe_n = count_parameters(dense), count_parameters(moe)
        router = moe.n_layers * moe.moe.n_experts * moe.d_model
        assert moe_n["activated"] == dense_n["activated"] + router, (dense_n, moe_n)  # the router's own weights
        precision, _, _ = common.auto_precision(dense, batch, seq, env.device)
        print(f"- {name}: dense {common.describe(dense)}; MoE {moe.moe.n_experts} experts of {moe.moe.d_expert}, "
              f"top-{moe.moe.top_k}; activated {dense_n['activated']:,} (MoE: + {router:,} router weights), MoE "
              f"total {moe_n['total']:,}; {precision}; batch {batch} x seq {seq}", flush=True)
        cases = [common.Case("dense", common.kha_train_step(dense, batch, seq, precision, env.compile, env.device))]
        moe_step = common.kha_train_step(moe, batch, seq, precision, env.compile, env.device)
        cases += [common.Case(f"MoE, {form}", with_experts(moe_step, fn)) for form, fn in EXPERTS.items()]
        stats = common.summarize(common.measure(cases, env, name), "dense")
        for case in cases:
            s = stats[case.name]
            rows.append([name, case.name, common.fmt_time(s), f"{batch * seq / s['median_s']:,.0f}",
                         common.fmt_ratio(s)])
            results.append({"shape": name, "case": case.name, "precision": precision,
                            "tokens_per_s": batch * seq / s["median_s"], **s})
    print()
    print(common.markdown_table(["shape", "model", "step ms", "tokens/s", "time ratio to dense"], rows))
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
