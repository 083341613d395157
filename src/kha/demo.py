"""``kha demo``: the main job a new user runs first.

1. The paper's FLOPs figures (section 3.4).
2. Identity at init: a KHA attention layer loaded with a baseline layer's weights computes exactly the
   baseline's output (GQA, 8 query / 2 KV heads).
3. Zero-cost inference: after a few optimizer steps move a KHA-Linear layer's knocks away from the
   identity, folding them into the projections gives the baseline's parameter count and the same outputs.
4. Training: prepare the built-in Shakespeare corpus, train the tiny GQA baseline and the same model with
   KHA-MLP on V (same seed, same base weights, same batches), print both validation losses and write
   their loss curves to ``runs/demo/loss_curves.png``. A few minutes on 2 CPU cores (``--precision auto``:
   fp32 for this small model unless kha's CPU kernels run it); longer and larger on a GPU (in bf16).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch

from .attention import Attention, AttentionConfig
from .cli import flops_table
from .errors import RunStopped
from .knock import fold_knocks


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_demo(out: str = "runs/demo", data: str = "data/shakespeare", steps: int | None = None) -> int:
    start = time.perf_counter()
    check_identity_and_folding()
    train_pair(Path(out), Path(data), steps)
    print(f"\ndemo done in {time.perf_counter() - start:.0f} s")
    return 0


def check_identity_and_folding() -> None:
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


def train_pair(out: Path, data: Path, steps: int | None) -> None:
    """Baseline vs KHA-MLP (V) on the tiny preset: same seed, data order and base weights."""
    from .analysis.plots import plot_loss_curves
    from .data.prepare import prepare
    from .train import TrainConfig, train

    gpu = torch.cuda.is_available()
    print(f"\nPreparing the Shakespeare corpus in {data} ...", flush=True)
    prepare(["shakespeare"], data)
    steps = steps or (2000 if gpu else 200)
    # --precision auto (bf16 on GPUs and on CPUs where it pays, kha.train.precision): with the fused knocks, the
    # bf16 KHA-MLP contrast at this scale is within the noise of the fp32 one over 8 seeds (bf16 - fp32 contrast
    # +0.027 [-0.039, +0.092], docs/benchmarks.md section j); seeds 0-2 alone had suggested otherwise
    base = dict(preset="tiny", data=str(data), seq_len=256 if gpu else 128, batch_size=64 if gpu else 16,
                steps=steps, lr=3e-3, eval_every=max(1, steps // 4), eval_batches=10,
                ckpt_every=max(1, steps // 2), seed=0, overwrite=True,  # a demo's runs are disposable
                precision="auto")
    runs = {"baseline (GQA 32q/4kv)": TrainConfig(out=str(out / "baseline"), **base),
            "KHA-MLP on V": TrainConfig(out=str(out / "kha-mlp-v"), knock="mlp", **base)}
    results = {}
    for label, cfg in runs.items():
        print(f"\nTraining {label}: {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens", flush=True)
        try:
            results[label] = (train(cfg), cfg)
        except RunStopped as err:  # its message says "continue with --resume": not a flag of the demo
            raise RunStopped(f"stopped by {signal.Signals(err.signum).name} while training {label}; the demo does "
                             "not resume: run `kha demo` again to train both runs from the start", err.signum) from err
    print(f"\n{'model':<24} {'params':>9} {'val loss':>9} {'delta':>8}")
    base_val = None
    for label, (record, _) in results.items():
        params, val = record["params"], record["val_loss"]
        delta = "" if base_val is None else f"{val - base_val:+.4f}"
        base_val = val if base_val is None else base_val
        print(f"{label:<24} {params / 1e6:>8.2f}M {val:>9.4f} {delta:>8}")
    print("(one seed: at this scale seed-to-seed noise is ~0.03, larger than the paper's 0.01-0.025 effect)")
    png = plot_loss_curves({label: cfg.out for label, (_, cfg) in results.items()}, out / "loss_curves.png")
    print(f"loss curves: {png}")
