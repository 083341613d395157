"""Correctness on a GPU of the paths that only run there: each check compares a CUDA result against an independent
reference on the same device and prints one table row (check, measured error, tolerance, pass/fail). Exit status 1
when any check fails. The CPU test suite pins the same logic on CPU; this covers what CPUs never execute:

- ``flex_attention`` under the document mask (kha's CUDA path) against the explicit-mask eager attention, loss
  and every gradient, fp32 and bf16 autocast, with and without KHA-MLP;
- ``torch._grouped_mm`` experts against the per-expert loop (bf16 against fp32);
- an MoE model under ``torch.compile(fullgraph=True)``: compiled against eager, then 10 training steps with the
  routing changing and recompilation made an error;
- the fused knock forms against the plain ones (fp32), and their deviation from the identity under bf16 autocast.

Tolerances: fp32 paths that reorder sums (TF32 off) 1e-4 relative; bf16 paths 3e-2 relative (bf16 spacing near 1
is 2^-7, several roundings deep). ``--device cpu`` runs the same checks on CPU where they can run (no grouped_mm,
no flex backward): a check of the script, not of the GPU.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback
from dataclasses import replace

import torch

from kha.attention import AttentionConfig, DocumentMask, document_ids
from kha.config import ModelConfig, MoEConfig
from kha.knock import make_knocks
from kha.model import DecoderLM, run_experts_grouped, run_experts_loop, takes_grouped_mm
from kha.variants import build_attention

FP32, BF16 = 1e-4, 3e-2
EOS = 0
ROWS: list[dict] = []


def record(check: str, error: float, tolerance: float, note: str = "") -> None:
    ROWS.append(dict(check=check, error=error, tolerance=tolerance, passed=bool(error <= tolerance), note=note))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def loss_and_grads(model, ids, dtype, **kwargs):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = model(ids[:, :-1], targets=ids[:, 1:], **kwargs).loss
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()
                                             if p.grad is not None])


def check_doc_mask(device: torch.device) -> None:
    """Packed windows of 257 tokens with documents of 1 to 125 tokens (and one of 192); the fast path against
    impl='eager'."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (2, 257), generator=g)
    ids[0, [0, 5, 6, 130, 255]] = EOS
    ids[1, [64]] = EOS
    ids = ids.to(device)
    doc_ids = document_ids(ids[:, :-1], EOS)
    if device.type == "cuda":
        assert DocumentMask.build(doc_ids).block_mask is not None, "no flex block mask on CUDA"
    for knock in ("none", "mlp"):
        attn = AttentionConfig(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, knock=knock)
        torch.manual_seed(0)
        model = DecoderLM(ModelConfig(attention=attn, n_layers=2, d_ff=256, vocab_size=97)).to(device)
        with torch.no_grad():  # knocks off the identity: at their init KHA-MLP is the baseline's function
            for name, p in model.named_parameters():
                if ".knocks." in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g).to(device))
        for dtype, tol in (("fp32", FP32), ("bf16", BF16)):
            fast = loss_and_grads(model, ids, dtype, doc_ids=doc_ids)
            ref = loss_and_grads(model, ids, dtype, doc_ids=doc_ids, impl="eager")
            record(f"doc mask, flex vs explicit ({knock}, {dtype}): loss", relative(fast[0], ref[0]), tol)
            record(f"doc mask, flex vs explicit ({knock}, {dtype}): grads", relative(fast[1], ref[1]), tol)


def check_grouped_experts(device: torch.device) -> None:
    counts = [5, 0, 17, 1, 9, 0, 32, 4]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), 64, generator=g).to(device)
    weights = [(0.3 * torch.randn(8, *s, generator=g)).to(device) for s in ((64, 32), (64, 32), (32, 64))]
    upstream = torch.randn(sum(counts), 64, generator=g).to(device)
    params = [t.clone().requires_grad_() for t in (x, *weights)]
    ref = run_experts_loop(params[0], counts, *params[1:])
    ref_grads = torch.autograd.grad(ref, params, upstream)
    if not takes_grouped_mm(device, torch.bfloat16, 64, 32):
        record("grouped_mm experts vs loop (bf16)", float("nan"), BF16, "skipped: no grouped_mm here")
        return
    params_bf16 = [t.to(torch.bfloat16).requires_grad_() for t in (x, *weights)]
    out = run_experts_grouped(params_bf16[0], torch.tensor(counts, device=device), *params_bf16[1:])
    grads = torch.autograd.grad(out, params_bf16, upstream.to(torch.bfloat16))
    record("grouped_mm experts vs loop (bf16): output", relative(out, ref), BF16)
    worst = max(relative(a, b) for a, b in zip(grads, ref_grads, strict=True))
    record("grouped_mm experts vs loop (bf16): grads", worst, BF16)


def check_moe_compile(device: torch.device) -> None:
    attn = AttentionConfig(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, knock="mlp")
    cfg = ModelConfig(attention=attn, n_layers=2, d_ff=128, vocab_size=97,
                      moe=MoEConfig(n_experts=8, top_k=2, d_expert=32))
    torch.manual_seed(0)
    model = DecoderLM(cfg).to(device).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (4, 65), generator=g).to(device)
    eager = loss_and_grads(model, ids, "bf16")
    torch._dynamo.reset()
    compiled_model = torch.compile(model, fullgraph=True)
    compiled = loss_and_grads(compiled_model, ids, "bf16")
    record("MoE fullgraph compile vs eager (bf16): loss", relative(compiled[0], eager[0]), BF16)
    record("MoE fullgraph compile vs eager (bf16): grads", relative(compiled[1], eager[1]), 5e-2,
           "tolerance 5e-2: bf16, and a near-tie in routing may flip")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loads = set()
    torch._dynamo.config.error_on_recompile = True
    try:
        for _ in range(10):
            loss, _ = loss_and_grads(compiled_model, torch.randint(0, 97, (4, 65), generator=g).to(device), "bf16")
            optimizer.step()
            loads.add(tuple(model.layers[0].ffn.router.tokens_per_expert.tolist()))
            model.update_moe_biases()
        recompiled = 0.0
    except Exception as e:  # error_on_recompile raises a dynamo error naming the guard that failed
        recompiled, note = 1.0, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    finally:
        torch._dynamo.config.error_on_recompile = False
    record("MoE compiled: 10 steps, changing routing, no recompile", recompiled, 0.0,
           f"{len(loads)} distinct loads" if not recompiled else note)


def check_knock_forms(device: torch.device) -> None:
    for knock, targets in (("linear", "qkv"), ("mlp", "v")):
        cfg = AttentionConfig(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, knock=knock, knock_targets=targets)
        torch.manual_seed(0)
        fused = build_attention(cfg).to(device)
        with torch.no_grad():
            for p in fused.parameters():
                p.add_(0.05 * torch.randn_like(p))
        plain = build_attention(replace(cfg, knock_form="plain")).to(device)
        plain.load_state_dict(fused.state_dict())
        x = torch.randn(4, 64, 128, device=device)
        outs = []
        for module in (fused, plain):
            xi = x.clone().requires_grad_()
            y = module(xi)
            outs.append((y.detach(), torch.autograd.grad(y.square().sum(), [xi, *module.parameters()])))
        record(f"knock {knock} {targets}: fused vs plain (fp32): output", relative(outs[0][0], outs[1][0]), FP32)
        record(f"knock {knock} {targets}: fused vs plain (fp32): grads",
               max(relative(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True)), FP32)
        module = make_knocks(knock, ("v",), 64)["v"].to(device)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.002 * torch.eye(p.shape[0], device=device) + 5e-4 * torch.randn_like(p))
            xk = torch.randn(256, 4, 64, device=device).to(torch.bfloat16)
            exact = copy.deepcopy(module).double()(xk.double()) - xk.double()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                got = module.residual(xk).double() - xk.double()
        slope = ((got * exact).sum() / (exact * exact).sum()).item()
        record(f"knock {knock}: deviation slope under bf16 autocast (fused)", abs(slope - 1), 0.05,
               f"slope {slope:.3f}")


CHECKS = (check_doc_mask, check_grouped_experts, check_moe_compile, check_knock_forms)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the rows here as JSON")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
          file=sys.stderr)
    for check in CHECKS:
        if device.type == "cpu" and check is check_doc_mask:
            record("doc mask, flex vs explicit", float("nan"), FP32, "skipped on CPU: flex has no CPU backward")
            continue
        try:
            check(device)
        except Exception as e:
            traceback.print_exc()
            record(check.__name__, float("inf"), 0.0, f"raised {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    print("| check | error | tolerance | result | note |\n|---|---|---|---|---|")
    for r in ROWS:
        result = "skipped" if r["error"] != r["error"] else ("pass" if r["passed"] else "**FAIL**")
        print(f"| {r['check']} | {r['error']:.2e} | {r['tolerance']:.0e} | {result} | {r['note']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), torch=torch.__version__, rows=ROWS), f, indent=1)
    return 1 if any(not r["passed"] and r["error"] == r["error"] for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
