"""Where a training step's time goes, and what causal attention costs against the matmuls it is made of.

Two parts, both at the 32.5M model's attention shape (batch 2 x 512, GQA 32 query / 4 KV heads of 64):

1. Kernels, forward + backward of causal GQA attention on random inputs, against SDPA in bf16 (torch's CPU
   flash attention): kha's kernels (``kha.cpu_kernels``, what ``kha train`` runs in bf16 on a CPU with
   AVX512-BF16, on the AMX tiles where it has them) and both forward alone; SDPA in fp32; kha's explicit
   reference (``impl="eager"``: scores, fp32 softmax, weighted values); SDPA's math backend; and ``matmuls
   only``, the seven batched matmuls of attention's forward and backward (scores and weighted values forward;
   scores recomputed, dV, dP, dQ, dK backward) in bf16 without softmax or masking: what attention would cost at
   plain matmul speed.
2. The step: one optimizer step exactly as ``kha train --precision bf16 --compile`` runs it (the fastest setting;
   ``common.kha_train_step``) under ``torch.profiler``; self time per category (attention forward / backward
   kernels, matmuls, kha's fused kernels, the compiled fused kernels, AdamW, the rest) as a share of the
   profiled time. Eager steps are left out: their thousands of small ops inflate under the profiler, so their
   shares would mislead.

    .venv/bin/python benchmarks/attention.py [--no-profile --json PATH]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import common
from kha import cpu_kernels
from kha.attention import eager_attention

SHAPE = {"batch": 2, "heads": 32, "kv_heads": 4, "seq": 512, "head_dim": 64}
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm")


def attention_inputs(dtype: torch.dtype, batch: int, heads: int, kv_heads: int, seq: int, head_dim: int):
    g = torch.Generator().manual_seed(0)

    def leaf(h):
        return torch.randn(batch, h, seq, head_dim, generator=g).to(dtype).requires_grad_()

    return leaf(heads), leaf(kv_heads), leaf(kv_heads), torch.randn(batch, heads, seq, head_dim, generator=g).to(dtype)


def fwd_bwd(attend, dtype: torch.dtype):
    q, k, v, grad = attention_inputs(dtype, **SHAPE)

    def run():
        torch.autograd.grad(attend(q, k, v), (q, k, v), grad)

    return run


def forward_only(attend, dtype: torch.dtype):
    q, k, v, _ = attention_inputs(dtype, **SHAPE)

    def run():
        with torch.no_grad():
            attend(q, k, v)

    return run


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_math(q, k, v):
    with sdpa_kernel(SDPBackend.MATH):
        return sdpa(q, k, v)


def matmuls_only():
    """The seven bf16 batched matmuls of attention forward + backward, the query heads of a KV head stacked
    (no K/V repeat), full (not causal) score matrices."""
    b, h, kv, t, d = (SHAPE[n] for n in ("batch", "heads", "kv_heads", "seq", "head_dim"))
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(b, kv, h // kv * t, d, generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(b, kv, t, d, generator=g).bfloat16() for _ in range(2))
    p = torch.randn(b, kv, h // kv * t, t, generator=g).bfloat16()

    def run():
        q @ k.transpose(-1, -2), p @ v  # forward: scores, weighted values
        q @ k.transpose(-1, -2), p.transpose(-1, -2) @ do, do @ v.transpose(-1, -2)  # scores, dV, dP
        p @ k, p.transpose(-1, -2) @ q  # dQ, dK

    return run


def kernel_cases() -> list[common.Case]:
    def kha_kernel(q, k, v):
        return cpu_kernels.attention(q, k, v, True)  # directly: sdpa_attention would route no_grad calls to torch

    on = {"amx": "AMX", "avx512_bf16": "AVX512-BF16"}.get(cpu_kernels.micro_kernel())
    ours = [common.Case(f"kha.cpu_kernels bf16 ({on})", fwd_bwd(kha_kernel, torch.bfloat16)),
            common.Case("kha.cpu_kernels bf16, forward only", forward_only(kha_kernel, torch.bfloat16))]
    return [common.Case("SDPA bf16", fwd_bwd(sdpa, torch.bfloat16)),
            common.Case("SDPA bf16, forward only", forward_only(sdpa, torch.bfloat16)),
            *(ours if cpu_kernels.prepare() else []),
            common.Case("SDPA fp32", fwd_bwd(sdpa, torch.float32)),
            common.Case("kha eager bf16", fwd_bwd(lambda q, k, v: eager_attention(q, k, v, None, True),
                                                  torch.bfloat16)),
            common.Case("SDPA math backend bf16", fwd_bwd(sdpa_math, torch.bfloat16)),
            common.Case("matmuls only bf16", matmuls_only())]


def causal_flops() -> float:
    """Matmul FLOPs of causal attention forward + backward (half the score matrix; backward = 2.5 x forward
    with the scores recomputed)."""
    b, h, t, d = (SHAPE[n] for n in ("batch", "heads", "seq", "head_dim"))
    forward = 2 * (2 * b * h * t * t * d) / 2
    return 3.5 * forward


def categorize(key: str) -> str:
    """A profiler event's category by its name; self times never count twice, so every event has one."""
    if "flash_attention" in key or key.startswith("kha_cpu::attention"):  # torch's kernels, kha.cpu_kernels's
        return "attention backward" if "backward" in key else "attention forward"
    if key in MATMULS:
        return "matmul"
    if key.startswith("kha_cpu::"):
        return "kha's fused kernels (QK-norm + RoPE, RMSNorm, SwiGLU gate, loss)"
    if "_fused_adamw" in key:
        return "AdamW"
    if "CompiledFxGraph" in key:
        return "compiled (fused) kernels"
    return "everything else"


def step_profile(device: torch.device, steps: int = 3) -> dict[str, float]:
    """Self CPU time per category of the 32.5M model's compiled bf16 step, seconds per step (mean of ``steps``)."""
    from torch.profiler import ProfilerActivity, profile

    step = common.kha_train_step(common.small_lm_config(), SHAPE["batch"], SHAPE["seq"], "bf16", True, device)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        category = categorize(event.key)
        totals[category] = totals.get(category, 0.0) + event.self_cpu_time_total / 1e6 / steps
    return totals


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=10)
    p.add_argument("--no-profile", action="store_true", help="kernels only")
    p.set_defaults(device="cpu")
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("attention.py measures the CPU kernels; run it with --device cpu")
    env = common.setup(args)
    info = common.machine_info(env)
    info["dtype"] = "per case"
    common.print_banner("Causal GQA attention forward + backward, and a bf16 step's time by category", info)
    print(f"- shape: {SHAPE}; causal attention forward + backward = {causal_flops() / 1e9:.2f} GFLOP of matmuls",
          flush=True)
    cases = kernel_cases()
    stats = common.summarize(common.measure(cases, env, "kernels"), "SDPA bf16")
    rows, results = [], []
    for case in cases:
        s = stats[case.name]
        flops = causal_flops() * (2 if case.name.startswith("matmuls") else 1)  # full scores there
        flops /= 3.5 if case.name.endswith("forward only") else 1  # forward = 1 / 3.5 of forward + backward
        rows.append([case.name, common.fmt_time(s), f"{flops / s['median_s'] / 1e9:,.0f}", common.fmt_ratio(s)])
        results.append({"part": "kernels", "case": case.name, "gflop_per_s": flops / s["median_s"] / 1e9, **s})
    print()
    print(common.markdown_table(["fwd + bwd", "ms", "GFLOP/s", "time ratio to SDPA bf16"], rows))
    if not args.no_profile:
        totals = step_profile(env.device)
        whole = sum(totals.values())
        rows = []
        for category, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
            rows.append([category, f"{seconds * 1e3:,.0f}", f"{100 * seconds / whole:.0f} %"])
            results.append({"part": "step", "category": category, "s_per_step": seconds, "share": seconds / whole})
        print()
        print(common.markdown_table(["32.5M step, bf16 compiled: category", "self ms / step", "share"], rows))
    print("\nGFLOP/s: causal attention's matmul FLOPs (x2 for 'matmuls only': full score matrices) / median time.")
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
