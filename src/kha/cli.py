"""The ``kha`` command: ``kha flops`` (eq. 10-12 accounting), ``kha params`` (presets), ``kha demo``.

Every subcommand runs inside one error boundary, :func:`run_command`: a user error is one line on stderr and exit
code 2, ``kha --debug`` (or ``KHA_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from .attention import AttentionConfig
from .data.cli import add_data_parser
from .errors import USER_ERRORS, RunStopped, describe
from .evaluation import add_eval_parser
from .experiments import add_experiment_parsers
from .flops import attention_params, knock_params, layer_flops
from .generate import add_generate_parser
from .hf_cli import add_hf_parsers


def _fmt_g(flops: int) -> str:
    return f"{flops / 1e9:,.3f} G"


def flops_table(cfg: AttentionConfig, seq_len: int, d_ff: int | None, knocks: list[tuple[str, object]]) -> str:
    base = layer_flops(cfg, seq_len, d_ff)
    lines = [
        f"Per-layer FLOPs, paper convention (eq. 10-12): L={seq_len} d={cfg.d_model} "
        f"heads={cfg.n_heads} kv_heads={cfg.n_kv_heads} head_dim={cfg.head_dim} "
        f"d_ff={d_ff or 3 * cfg.d_model}",
        f"  attention (eq. 10)   {_fmt_g(base.attention):>14}   params {attention_params(cfg):,}",
        f"  FFN (SwiGLU)         {_fmt_g(base.ffn):>14}",
        f"  layer (eq. 11)       {_fmt_g(base.layer):>14}",
        "",
        f"  {'knock':<8} {'targets':<8} {'params':>10} {'FLOPs (eq. 12)':>16} {'% of layer':>11} "
        f"{'% of attention':>15}",
    ]
    for knock, targets in knocks:
        kcfg = replace(cfg, knock=knock, knock_targets=targets)
        f = layer_flops(kcfg, seq_len, d_ff)
        lines.append(
            f"  {knock:<8} {','.join(kcfg.knock_targets):<8} {knock_params(kcfg):>10,} {_fmt_g(f.knock):>16} "
            f"{100 * f.knock_share_of_layer:>10.3f}% {100 * f.knock_share_of_attention:>14.3f}%"
        )
    return "\n".join(lines)


def flops_attention(args: argparse.Namespace) -> tuple[AttentionConfig, int | None]:
    """The attention config and FFN width of ``kha flops``: a preset's (an MoE's FFN: its ``top_k`` activated
    experts) or 1024 wide with 32 heads, each changed by the flags given."""
    from .config import get_preset

    given = {name: getattr(args, flag) for name, flag in (("d_model", "d_model"), ("n_heads", "n_heads"),
                                                          ("n_kv_heads", "n_kv_heads"), ("head_dim", "head_dim"))
             if getattr(args, flag) is not None}
    knock = {"knock": args.knock or "none", "knock_targets": args.targets if args.knock else None}
    if args.preset is None:
        cfg = AttentionConfig(**{"d_model": 1024, "n_heads": 32, **given, **knock})
        return cfg, args.d_ff
    model = get_preset(args.preset)
    if given.keys() & {"d_model", "n_heads"} and "head_dim" not in given:
        given["head_dim"] = None  # derived again from the new width / heads
    if "n_heads" in given and "n_kv_heads" not in given:
        given["n_kv_heads"] = None
    cfg = replace(model.attention, **given, **knock)
    d_ff = model.moe.top_k * model.moe.d_expert if model.moe else model.d_ff
    return cfg, args.d_ff if args.d_ff is not None else d_ff


def cmd_flops(args: argparse.Namespace) -> int:
    if args.d_ff is not None and args.d_ff <= 0:
        raise ValueError(f"--d-ff must be a positive integer, got {args.d_ff}")
    cfg, d_ff = flops_attention(args)
    args.d_ff = d_ff
    if args.json:
        if args.targets and not args.knock:
            raise ValueError(f"--targets {args.targets} needs --knock (linear, mlp or gate) with --json")
        f = layer_flops(cfg, args.seq_len, args.d_ff)
        out = {
            "attention": f.attention, "ffn": f.ffn, "layer": f.layer, "knock": f.knock,
            "knock_share_of_layer": f.knock_share_of_layer,
            "knock_share_of_attention": f.knock_share_of_attention,
            "attention_params": attention_params(cfg), "knock_params": knock_params(cfg),
        }
        print(json.dumps(out, indent=2))
        return 0
    every = ["linear"] if cfg.n_latents else ["linear", "mlp", "gate"]  # MLA/GLA take linear knocks only
    knocks = [(k, args.targets) for k in ([args.knock] if args.knock else every)]
    print(flops_table(cfg, args.seq_len, args.d_ff, knocks))
    return 0


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n < 1e8 else f"{n / 1e9:.3f}B"


def cmd_params(args: argparse.Namespace) -> int:
    from .config import PRESETS, get_preset
    from .model import count_parameters

    if args.targets and args.knock is None:
        raise ValueError(f"--targets {args.targets} needs --knock (linear, mlp or gate)")
    names = [args.name] if args.name else list(PRESETS)
    rows = {name: count_parameters(get_preset(name, args.knock, args.targets)) for name in names}
    if args.json:
        print(json.dumps(rows[args.name] if args.name else rows, indent=2))
        return 0
    print(f"{'preset':<15} {'total':>9} {'paper':>7} {'activated':>10} {'paper':>7}  source")
    for name, counts in rows.items():
        p = PRESETS[name]
        paper_total = "" if p.paper_total is None else f"{p.paper_total}B"
        paper_act = "" if p.paper_activated is None else f"{p.paper_activated}B"
        print(f"{name:<15} {_count(counts['total']):>9} {paper_total:>7} {_count(counts['activated']):>10} "
              f"{paper_act:>7}  {p.source}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train
    from .train.checkpoint import NonFiniteError
    from .train.config import parse_train_args

    cfg = parse_train_args(args.rest)
    try:
        train(cfg)
    except NonFiniteError as err:
        print(f"kha train: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.steps is not None and args.steps <= 0:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}")
    return run_demo(out=args.out, data=args.data, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kha", description="Knocking-Heads Attention tools")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also KHA_DEBUG=1); without it a bad input is one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("flops", help="per-layer FLOPs and parameters of knocks (paper eq. 10-12)",
                       description="Per-layer FLOPs of attention, FFN and knocks for a preset's layer (`kha flops "
                       "tiny`) or the shape the flags give; flags change a preset's values.")
    p.add_argument("preset", nargs="?", default=None,
                   help="a preset's layer (see `kha params`); an MoE's FFN is its activated experts")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence L (default: 2048)")
    p.add_argument("--d-model", type=int, default=None, help="hidden size d (default: 1024, or the preset's)")
    p.add_argument("--n-heads", type=int, default=None, help="query heads n (default: 32, or the preset's)")
    p.add_argument("--n-kv-heads", type=int, default=None, help="KV heads (default: n-heads, MHA; or the preset's)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default: d-model / n-heads, or the preset's)")
    p.add_argument("--d-ff", type=int, default=None, help="FFN size (default: 3 * d-model, or the preset's)")
    p.add_argument("--knock", choices=["linear", "mlp", "gate"], default=None,
                   help="one knock type (default: show all three with the paper's targets)")
    p.add_argument("--targets", default=None, help="knock targets, e.g. qkv or v (default: paper's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("params", help="total and activated parameters of a preset (all presets if none named)")
    p.add_argument("name", nargs="?", default=None, help="preset name (see `kha params`)")
    p.add_argument("--knock", choices=["none", "linear", "mlp", "gate"], default=None, help="knock on top")
    p.add_argument("--targets", default=None, help="knock targets, e.g. qkv or v (default: paper's)")
    p.add_argument("--json", action="store_true", help="JSON: {total, activated} (a map of them for all)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("train", add_help=False, help="train a model: kha train --config FILE_OR_PRESET --out DIR")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="FLOPs, identity-at-init and folding checks, then baseline vs KHA-MLP training")
    p.add_argument("--out", default="runs/demo", help="where the two runs and the plot go (default: runs/demo)")
    p.add_argument("--data", default="data/shakespeare", help="prepared corpus dir (default: data/shakespeare)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: 200 on CPU, 2000 on GPU)")
    p.set_defaults(func=cmd_demo)
    add_data_parser(sub)
    add_experiment_parsers(sub)
    add_hf_parsers(sub)
    add_eval_parser(sub)
    add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.rest = extra  # every flag after `train` belongs to the training config
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args, debug=args.debug or os.environ.get("KHA_DEBUG", "") not in ("", "0"))


def run_command(args: argparse.Namespace, debug: bool = False) -> int:
    """The error boundary of every command: a user error (:data:`kha.errors.USER_ERRORS`) is one line on stderr
    and exit code 2, Ctrl-C one line and 130; ``debug`` (``kha --debug``, ``KHA_DEBUG=1``) re-raises instead."""
    name = args.command + (f" {args.data_command}" if getattr(args, "data_command", None) else "")
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"kha {name}: error: {describe(err)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"kha {name}: interrupted", file=sys.stderr)
        return 130
    except RunStopped as err:
        print(f"kha {name}: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
