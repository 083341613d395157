"""GPU training throughput and MFU (model FLOPs utilisation) of a ~136M-parameter dense LM, baseline vs KHA-MLP
(v) vs KHA-Linear (qkv), or with ``--moe`` of the paper's MoE moe-a0.4b (baseline): bf16 autocast,
torch.compile, fused SDPA (flash / cuDNN / memory-efficient only: a fall-back to the math kernel is an error
unless ``--allow-math-sdpa``).

Model: 12 layers, d_model 768, GQA 16 query / 4 KV heads of 128 (the paper's head size), SwiGLU 2304,
vocabulary 32,768, tied embeddings (136.2M parameters); batch 16 x seq 2048 by default (``--batch``,
``--seq-len``; ``--quick``: batch 2 x seq 256). ``--moe``: the ``moe-a0.4b`` preset whole (12 layers x 1152,
64 experts of 768, top-4, vocabulary 157,184: 0.437B activated of 2.35B parameters; fp32 weights and AdamW
state ~38 GB, so one 80 GB GPU holds it), batch 8 x seq 2048 by default, MFU on the activated FLOPs.
MFU = ``kha.flops.model_flops_per_token`` x tokens/s / ``kha.flops.peak_flops`` (the dense bf16 peak of the
GPU), the figure ``kha train`` logs (for MoE the activated parameters count: each token's router, top-k experts
and shared layers).
GPU only: on a machine without CUDA it says so and exits (status 0) without measuring, unless
``--cpu-logic-check`` (for CI without a GPU: the same code on CPU, fp32, eager, 2 layers, batch 1 x seq 32,
one round, no SDPA restriction; with ``--moe`` the ``tiny-moe`` preset; it checks the code and measures
nothing meaningful).

    .venv/bin/python benchmarks/gpu_mfu.py [--moe] [--batch 16 --seq-len 2048 --json PATH]
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
from kha.attention import AttentionConfig
from kha.config import ModelConfig, get_preset
from kha.flops import model_flops_per_token, peak_flops
from kha.model import DecoderLM, count_parameters

CASES = ("baseline", "mlp-v", "linear-qkv")
MOE_PRESET = "moe-a0.4b"
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def model_config(knock: str, targets, seq_len: int, n_layers: int = 12) -> ModelConfig:
    attn = AttentionConfig(d_model=768, n_heads=16, n_kv_heads=4, head_dim=128, knock=knock, knock_targets=targets)
    return ModelConfig(attention=attn, n_layers=n_layers, d_ff=2304, vocab_size=32_768, max_seq_len=max(seq_len, 4096))


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=20)
    p.set_defaults(dtype="bf16", compile=True)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager instead of torch.compile")
    p.add_argument("--batch", type=int, help="default: 16 (dense), 8 (--moe)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--moe", action="store_true", help=f"the MoE preset {MOE_PRESET} (baseline only) instead")
    p.add_argument("--allow-math-sdpa", action="store_true", help="let SDPA fall back to the unfused math kernel")
    common.add_profile_argument(p)
    p.add_argument("--cpu-logic-check", action="store_true",
                   help="run the logic on CPU at a toy size (CI without a GPU; numbers meaningless)")
    args = p.parse_args()
    if args.cpu_logic_check:
        args.device, args.dtype, args.quick, args.allow_math_sdpa, args.compile = "cpu", "fp32", True, True, False
        args.repeats, args.warmup = 1, 1
    elif args.device != "cuda" or not torch.cuda.is_available():
        print(f"gpu_mfu.py measures a CUDA GPU and this run has none (--device {args.device}, torch "
              f"{torch.__version__}, CUDA available: {torch.cuda.is_available()}); nothing measured.", file=sys.stderr)
        sys.exit(0)
    env = common.setup(args)
    info = common.machine_info(env)
    common.print_banner(f"GPU training throughput and MFU, {MOE_PRESET + ' (MoE)' if args.moe else 'baseline vs KHA'}",
                        info)
    batch, seq = (1, 32) if args.cpu_logic_check else (2, 256) if env.quick else (
        args.batch or (8 if args.moe else 16), args.seq_len)
    n_layers = 2 if args.cpu_logic_check else 12
    cases_here = ("baseline",) if args.moe else CASES

    def config(knock, targets):
        if args.moe:
            cfg = get_preset("tiny-moe" if args.cpu_logic_check else MOE_PRESET, knock, targets)
            return replace(cfg, max_seq_len=max(cfg.max_seq_len, seq))
        return model_config(knock, targets, seq, n_layers)

    peak = peak_flops(env.device)
    context = nullcontext if args.allow_math_sdpa else lambda: sdpa_kernel(FUSED)

    vocab = config("none", None).vocab_size
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(env.device)
    cases, flops, params = [], {}, {}
    for key in cases_here:
        _, knock, targets = common.KNOCKS[key]
        cfg = config(knock, targets)
        torch.manual_seed(0)
        model = DecoderLM(cfg).to(env.device).train()
        compiled = env.maybe_compile(model)
        flops[key], params[key] = model_flops_per_token(cfg, seq), common.n_params(model)
        cases.append(common.training_case(key, lambda m=compiled: m(tokens[:, :-1]).logits,
                                          common.lm_loss(tokens[:, 1:]), common.adamw(model), env, context))
    peak_text = f"{peak / 1e12:.0f} TFLOP/s (dense bf16)" if peak else "unknown (MFU n/a)"
    activated = count_parameters(config("none", None))["activated"]
    print(f"- model: {common.describe(config('none', None))} ({params['baseline']:,} parameters, "
          f"{activated:,} activated per token); batch {batch} x seq {seq} = {batch * seq:,} tokens per step; "
          f"peak {peak_text}; fused SDPA "
          f"{'preferred' if args.allow_math_sdpa else 'required'}\n", flush=True)
    stats = common.summarize(common.measure(cases, env, "train"), "baseline")

    rows, results = [], []
    for key in cases_here:
        s = stats[key]
        tok_s = batch * seq / s["median_s"]
        mfu = flops[key] * tok_s / peak if peak else None
        rows.append([common.KNOCKS[key][0], f"{params[key]:,}", common.fmt_time(s), f"{tok_s:,.0f}",
                     f"{flops[key] / 1e9:.3f}", "n/a" if mfu is None else f"{100 * mfu:.1f} %", common.fmt_ratio(s),
                     common.fmt_ratio_ci(s), common.fmt_mib(s)])
        results.append({"case": key, "params": params[key], "batch": batch, "seq_len": seq, "tokens_per_s": tok_s,
                        "flops_per_token": flops[key], "peak_flops": peak, "mfu": mfu, **s})
    print(common.markdown_table(["case", "params", "step ms", "tokens/s", "GFLOP/token", "MFU",
                                 "time ratio to baseline", "its 95 % CI", "peak MiB"], rows))
    common.finish(args, info, results)
    common.profile_after_timing(args, env, info, cases, stats, results, {k: common.KNOCKS[k][0] for k in stats})


if __name__ == "__main__":
    main()
