"""``kha retrofit``, ``kha export`` and ``kha hf-convert`` (``kha.hf``); ``add_hf_parsers(subparsers)`` registers them.

It lives outside ``kha.hf`` because importing ``kha.hf`` imports transformers (seconds) to register the model
classes; here transformers is imported only when one of these commands runs (``pip install 'kha[hf-models]'``).
Errors (a missing folder, a damaged file, a missing transformers) are reported by ``kha.cli``'s error boundary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import UserError


def _other_folder(args: argparse.Namespace, command: str) -> None:
    """Writing into the ``--from`` folder would replace the model files being read: refuse it."""
    if Path(args.out).resolve() == Path(args.src).resolve():
        raise UserError(f"--out {args.out} is the --from folder: {command} would overwrite the model files it reads; "
                        "choose another --out")


def cmd_retrofit(args: argparse.Namespace) -> int:
    from .hf.stock import copy_side_files, retrofit
    from .safe_io import staged_folder

    _other_folder(args, "retrofit")
    model = retrofit(args.src, knock=args.knock, targets=args.targets)
    with staged_folder(args.out) as stage:  # moved into --out file by file, never through a link there
        model.save_pretrained(stage)
        copy_side_files(args.src, stage)
    c = model.config
    print(f"wrote {args.out}: KHA model (knock {c.knock} on {','.join(c.knock_targets) or '-'}) with the weights "
          f"of {args.src}; the knocks start as the identity, so its logits are the original's")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .hf.stock import export

    _other_folder(args, "export")
    kind = export(args.src, args.out)
    print(f"wrote {args.out}: stock {kind} checkpoint (linear knocks folded); transformers loads it without kha")
    return 0


def cmd_hf_convert(args: argparse.Namespace) -> int:
    from .hf.runs import from_training_run, hf_tokenizer, local_folder, run_tokenizer, save_training_run, to_decoder_lm
    from .safe_io import staged_folder

    _other_folder(args, "hf-convert")
    src = local_folder(args.src, "hf-convert")
    if (src / "model_config.json").exists():
        if args.tokenizer and not Path(args.tokenizer).is_file():
            raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file")
        tok = args.tokenizer or run_tokenizer(src)
        hf_tok = hf_tokenizer(tok) if tok else None  # a bad tokenizer fails before anything is written
        # generate() stops at the end of a document only when the config names the EOS token
        eos = {} if hf_tok is None else {"eos_token_id": hf_tok.eos_token_id, "pad_token_id": hf_tok.eos_token_id}
        with staged_folder(args.out) as stage:  # moved into --out file by file, never through a link there
            from_training_run(src, **eos).save_pretrained(stage)
            if hf_tok is not None:
                hf_tok.save_pretrained(stage)
        print(f"wrote {args.out}: Hugging Face KHA folder{' with tokenizer ' + str(tok) if tok else ''}")
    elif (src / "config.json").exists():
        save_training_run(to_decoder_lm(src), args.out)
        print(f"wrote {args.out}: model.safetensors + model_config.json (the `kha train` format)")
    else:
        raise FileNotFoundError(f"{src}: neither a `kha train` run (model_config.json) nor a Hugging Face "
                                "folder (config.json)")
    return 0


def add_hf_parsers(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("retrofit", help="stock Qwen3/Llama checkpoint -> KHA model with identical logits",
                              description="Turn a local transformers Qwen3 or Llama checkpoint (safetensors) into a "
                              "KHA model: same weights, knocks at their identity init, so the same logits.")
    p.add_argument("--from", dest="src", required=True, metavar="PATH", help="stock checkpoint folder")
    p.add_argument("--out", required=True, metavar="DIR", help="where the KHA folder goes")
    p.add_argument("--knock", choices=["none", "linear", "mlp", "gate"], default="mlp",
                   help="knock type (default: mlp, the paper's)")
    p.add_argument("--targets", default=None, help="knock targets, e.g. v or qkv (default: the paper's)")
    p.set_defaults(func=cmd_retrofit)

    p = subparsers.add_parser("export", help="KHA-Linear model -> stock Qwen3/Llama checkpoint (knocks folded)",
                              description="Fold the linear knocks of a saved KHA model and write a stock transformers "
                              "checkpoint: Qwen3 (with QK-norm) or Llama (without). MLP/gate knocks, MoE and "
                              "GTA/MLA/GLA models cannot be exported.")
    p.add_argument("--from", dest="src", required=True, metavar="DIR", help="KHA folder (save_pretrained)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the stock checkpoint goes")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("hf-convert", help="`kha train` run <-> Hugging Face KHA folder (direction from --from)",
                              description="A `kha train` output folder (model.safetensors + model_config.json) "
                              "becomes a Hugging Face folder, and a Hugging Face KHA folder becomes the training "
                              "format.")
    p.add_argument("--from", dest="src", required=True, metavar="DIR", help="run folder or Hugging Face folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer.json to include (default: the run's data tokenizer, when found)")
    p.set_defaults(func=cmd_hf_convert)
