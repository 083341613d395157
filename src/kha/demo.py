"""``kha demo``: the paper's FLOPs figures, then KHA's two promises checked on a CPU in seconds.

1. Identity at init: a KHA attention layer loaded with a baseline layer's weights computes exactly the
   baseline's output (GQA, 8 query / 2 KV heads).
2. Zero-cost inference: after a few optimizer steps move a KHA-Linear layer's knocks away from the
   identity, folding them into the projections gives the baseline's parameter count and the same outputs.
"""

from __future__ import annotations

import time

import torch

from .attention import Attention, AttentionConfig
from .cli import flops_table
from .knock import fold_knocks


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_demo() -> int:
    start = time.perf_counter()
    print(flops_table(AttentionConfig(d_model=1024, n_heads=32), 2048, None,
                      [("linear", None), ("mlp", None), ("gate", None)]))
    print("  paper (section 3.4): 0.55 % of the layer, 1.17 % of MHA\n")

    torch.manual_seed(0)
    shape = dict(d_model=256, n_heads=8, n_kv_heads=2, head_dim=32)
    base = Attention(AttentionConfig(**shape))
    x = torch.randn(4, 64, 256)
    with torch.no_grad():
        y_base = base(x)
    print("Identity at init, GQA 8 query / 2 KV heads, head_dim 32 (max |KHA - baseline|):")
    for knock, targets in (("linear", "qkv"), ("mlp", "v"), ("mlp", "qkv"), ("gate", "v")):
        kha = Attention(AttentionConfig(**shape, knock=knock, knock_targets=targets))
        kha.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            diff = (kha(x) - y_base).abs().max().item()
        print(f"  {knock:<6} on {targets:<4} +{_n_params(kha) - _n_params(base):>5} params   {diff:.2e}")

    kha = Attention(AttentionConfig(**shape, knock="linear", knock_targets="qkv"))
    kha.load_state_dict(base.state_dict(), strict=False)
    opt = torch.optim.AdamW(kha.knocks.parameters(), lr=1e-2)
    target = torch.randn_like(y_base)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.mse_loss(kha(x), target).backward()
        opt.step()
    moved = max((k.weight - torch.eye(32)).abs().max().item() for k in kha.knocks.values())
    with torch.no_grad():
        y_unfolded = kha(x)
        before = _n_params(kha)
        fold_knocks(kha)
        diff = (kha(x) - y_unfolded).abs().max().item()
    print("\nFolding KHA-Linear (q, k, v) after 20 AdamW steps on the knocks only:")
    print(f"  knocks moved from identity by up to {moved:.3f}")
    print(f"  params {before:,} -> {_n_params(kha):,} (baseline {_n_params(base):,})")
    print(f"  max |folded - unfolded| = {diff:.2e}")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0
