"""What an MoE step costs: an MoE model against the dense model with the same activated parameters, and the ways
of running the experts (``kha.model.EXPERT_FORMS``): ``auto`` (what ``kha train`` runs), ``torch._grouped_mm``
over 16-byte-aligned groups, the padded batched matmul over blocks of one expert each (both with device-side
offsets: no host sync, shapes independent of the routing), and the per-expert Python loop (the reference the
tests compare against; it reads the counts on the host). On CPU the padded form runs a second time with its row
gathers as indexing (``x[index]``, whose backward is ``index_put_`` with accumulation: the form before
``kha.model.gather_rows``). With ``--compile`` (``kha train --compile``) the loop
is left out (its graph breaks and recompiles as the routing changes), and so is ``_grouped_mm`` outside bf16
(torch's shape function for it accepts bf16 only).

Each step is ``kha train``'s (loss inside, clipping, AdamW) in the precision ``--precision auto`` picks for the
shape, or in each of ``--precisions fp32,bf16``.
Shapes: ``tiny`` (the ``tiny-moe`` preset, 16 experts of 96, top-4, against ``tiny``: 2.23M activated
parameters both, plus the router's own; batch 16 x 128) and ``study`` (d 256, 16 experts of 192, top-4, against
the ``study`` preset with SwiGLU 768 = 4 x 192; batch 16 x 256). Ratios: step time against the dense model's in
the same run.

    .venv/bin/python benchmarks/moe.py [--shapes tiny,study --precisions auto|fp32,bf16 --compile --json PATH]
"""

from __future__ import annotations

from dataclasses import replace

import torch

import common
import kha.model
from kha.config import MoEConfig, get_preset
from kha.model import count_parameters

FORMS = ("auto", "grouped", "padded", "loop")


def shapes() -> dict:
    study = get_preset("study")
    study_moe = replace(study, moe=MoEConfig(n_experts=16, top_k=4, d_expert=study.d_ff // 4))
    return {"tiny": (get_preset("tiny"), get_preset("tiny-moe"), 16, 128), "study": (study, study_moe, 16, 256)}


def with_form(form: str):
    """A ``prepare`` for ``common.kha_train_step``: every MoE layer of the model runs its experts as ``form``."""

    def prepare(model):
        for module in model.modules():
            if isinstance(module, kha.model.MoE):
                module.form = form

    return prepare


def _indexing(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[index]


def with_indexing(step):
    """``step`` with ``kha.model.gather_rows`` as indexing, for each call (a compiled model keeps one graph for
    each, chosen by dynamo's guard on the global)."""

    def run():
        kept, kha.model.gather_rows = kha.model.gather_rows, _indexing
        try:
            step()
        finally:
            kha.model.gather_rows = kept

    return run


def forms(precision: str, compile: bool, device) -> list[str]:
    """The expert forms that run (and compile) here in ``precision``."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    grouped = kha.model.grouped_mm_works(device, dtype) and (dtype == torch.bfloat16 or not compile)
    return [f for f in FORMS if (f != "grouped" or grouped) and (f != "loop" or not compile)]


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=6)
    p.add_argument("--shapes", default="tiny,study")
    p.add_argument("--precisions", default="auto", help="auto (what kha train picks per shape) or a list: fp32,bf16")
    args = p.parse_args()
    env = common.setup(args)
    if env.compile:
        common.static_compile_settings()
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
        auto, _, _ = common.auto_precision(dense, batch, seq, env.device)
        precisions = [auto] if args.precisions == "auto" else [p.strip() for p in args.precisions.split(",")]
        print(f"- {name}: dense {common.describe(dense)}; MoE {moe.moe.n_experts} experts of {moe.moe.d_expert}, "
              f"top-{moe.moe.top_k}; activated {dense_n['activated']:,} (MoE: + {router:,} router weights), MoE "
              f"total {moe_n['total']:,}; {'compiled' if env.compile else 'eager'}; batch {batch} x seq {seq}; "
              f"auto precision: {auto}", flush=True)
        for precision in precisions:
            cases = [common.Case("dense", common.kha_train_step(dense, batch, seq, precision, env.compile,
                                                                env.device))]
            cases += [common.Case(f"MoE, {form}", common.kha_train_step(moe, batch, seq, precision, env.compile,
                                                                         env.device, prepare=with_form(form)))
                      for form in forms(precision, env.compile, env.device)]
            if env.device.type == "cpu":
                cases.append(common.Case("MoE, padded, indexing", with_indexing(common.kha_train_step(
                    moe, batch, seq, precision, env.compile, env.device, prepare=with_form("padded")))))
            stats = common.summarize(common.measure(cases, env, f"{name} {precision}"), "dense")
            for case in cases:
                s = stats[case.name]
                rows.append([name, precision, case.name, common.fmt_time(s), f"{batch * seq / s['median_s']:,.0f}",
                             common.fmt_ratio(s)])
                results.append({"shape": name, "case": case.name, "precision": precision, "compile": env.compile,
                                "tokens_per_s": batch * seq / s["median_s"], **s})
    print()
    print(common.markdown_table(["shape", "precision", "model", "step ms", "tokens/s", "time ratio to dense"], rows))
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
