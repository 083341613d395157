"""What KHA costs in training: one step (forward + backward + AdamW) of one attention layer and of one decoder
block, baseline vs KHA-Linear (qkv), KHA-Linear (v), KHA-MLP (v) and the gate (v), with the FLOPs overhead
``kha.flops.layer_flops`` predicts for the same shape beside the measured one.

Shapes: "paper" = d_model 1024, GQA 32 query / 4 KV heads of 128, seq 2048 x batch 4 on GPU (seq 1024 x
batch 1 on CPU; --quick: d_model 256, seq 64 x batch 1); "tiny" = the ``tiny`` preset's attention (d 128,
32/4 heads of 16), seq 128 x batch 16 (--quick: seq 32 x batch 2).
Blocks use a SwiGLU FFN of 3 x d_model, as the paper's eq. 11. The loss is the mean square of the output,
and the input requires a gradient, as a layer inside a network does.

    .venv/bin/python benchmarks/train_step.py [--device cuda --dtype bf16 --compile --json PATH]
"""

from __future__ import annotations

from dataclasses import replace

import torch

import common
from kha.attention import AttentionConfig
from kha.config import ModelConfig, get_preset
from kha.flops import knock_params, layer_flops
from kha.model import Block
from kha.variants import build_attention

SCOPES = ("attention", "block")


def shapes(args, env: common.Env) -> dict[str, tuple[AttentionConfig, int, int]]:
    """name -> (attention config without knock, batch, seq_len)."""
    d_model = args.d_model or (256 if env.quick else 1024)
    paper = AttentionConfig(d_model=d_model, n_heads=32, n_kv_heads=4, head_dim=128)
    tiny = get_preset("tiny").attention
    if env.quick:
        paper_bt, tiny_bt = (1, 64), (2, 32)
    else:
        paper_bt = (args.batch or (4 if env.cuda else 1), args.seq_len or (2048 if env.cuda else 1024))
        tiny_bt = (16, 128)
    table = {"paper": (paper, *paper_bt), "tiny": (tiny, *tiny_bt)}
    return {name: table[name] for name in args.shapes}


def build(scope: str, attn: AttentionConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    if scope == "attention":
        return build_attention(attn)
    return Block(ModelConfig(attention=attn, n_layers=1, d_ff=3 * attn.d_model))


def train_case(name: str, module: torch.nn.Module, x_shape: tuple[int, ...], env: common.Env) -> common.Case:
    module = module.to(env.device).train()
    compiled = env.maybe_compile(module)
    x = torch.randn(x_shape, device=env.device, requires_grad=True)

    def forward():
        x.grad = None
        return compiled(x)

    return common.training_case(name, forward, lambda y: y.float().square().mean(), common.adamw(module), env)


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0], repeats=10)
    p.add_argument("--shapes", nargs="+", choices=("paper", "tiny"), default=["paper", "tiny"])
    p.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument("--cases", nargs="+", choices=list(common.KNOCKS), default=list(common.KNOCKS),
                   help="knock settings to compare (the baseline is always included)")
    p.add_argument("--d-model", type=int, default=None, help="d_model of the paper-like shape (1024; --quick: 256)")
    p.add_argument("--batch", type=int, default=None, help="batch of the paper-like shape")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of the paper-like shape")
    args = p.parse_args()
    env = common.setup(args)
    info = common.machine_info(env)
    common.print_banner("Training step: one attention layer / one decoder block, baseline vs knocks", info)
    keys = ["baseline"] + [k for k in args.cases if k != "baseline"]

    results = []
    for shape_name, (attn, batch, seq) in shapes(args, env).items():
        print(f"## {shape_name}: d_model {attn.d_model}, {attn.n_heads} query / {attn.n_kv_heads} KV heads of "
              f"{attn.head_dim}, batch {batch} x seq {seq}; blocks with SwiGLU d_ff {3 * attn.d_model}\n")
        rows = []
        for scope in args.scopes:
            cases, flops = [], {}
            for key in keys:
                label, knock, targets = common.KNOCKS[key]
                cfg = replace(attn, knock=knock, knock_targets=targets)
                module = build(scope, cfg)
                case = train_case(key, module, (batch, seq, attn.d_model), env)
                case.meta = {"label": label, "params": common.n_params(module), "knock_params": knock_params(cfg)}
                lf = layer_flops(cfg, seq, d_ff=3 * attn.d_model)
                flops[key] = lf.knock / (lf.attention if scope == "attention" else lf.layer)
                cases.append(case)
            stats = common.summarize(common.measure(cases, env, f"{shape_name}/{scope}"), "baseline")
            for case in cases:
                s = stats[case.name]
                rows.append([scope, case.meta["label"], f"{case.meta['knock_params']:,}", common.fmt_time(s),
                             common.fmt_ratio(s), common.fmt_pct(s["ratio"] - 1), common.fmt_pct(flops[case.name]),
                             common.fmt_mib(s)])
                results.append({"shape": shape_name, "scope": scope, "case": case.name, **case.meta,
                                "batch": batch, "seq_len": seq, "attention": vars(attn),
                                "predicted_flops_overhead": flops[case.name], **s})
        print(common.markdown_table(["scope", "case", "knock params", "step ms", "ratio to baseline",
                                     "measured overhead", "predicted FLOPs overhead", "peak MiB"], rows))
        print()
    print("Predicted FLOPs overhead: knock FLOPs / baseline FLOPs of the attention layer (eq. 10) or of the "
          "layer with its FFN (eq. 11), from kha.flops.layer_flops; it leaves out norms, RoPE, softmax, "
          "element-wise work and the optimizer step, which the measured time includes.")
    common.finish(args, info, results)


if __name__ == "__main__":
    main()
