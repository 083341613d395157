"""``kha data``: ``add_data_parser(subparsers)`` registers ``kha data prepare`` and ``kha data verify``.

``kha data prepare --source shakespeare|pystdlib|PATH|hf:NAME[:CONFIG] (repeatable) --out DIR --vocab-size N
--val-fraction F --seed S`` builds (or reuses) the token shards and prints documents and tokens per split.
``kha data verify DIR`` checks every file of a prepared folder against its manifest's SHA-256.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    try:
        m = prepare(args.source or ["shakespeare"], args.out, vocab_size=args.vocab_size,
                    val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
                    tokenizer=args.tokenizer, progress=not args.quiet)
    except RuntimeError as err:  # a failed download; a missing file or dependency reaches kha's error boundary
        raise UserError(str(err)) from err
    out = Path(args.out)
    print(f"sources: {', '.join(m['config']['sources'])}")
    print(f"tokenizer: {out / m['tokenizer']['file']} ({m['tokenizer']['vocab_size']:,} ids, "
          f"EOS {m['tokenizer']['eos']} = {m['tokenizer']['eos_id']})")
    for name, s in m["splits"].items():
        print(f"{name:<5}: {s['num_documents']:>7,} documents {s['tokens']:>13,} tokens  -> {out / s['file']}")
    print(f"manifest: {out / 'manifest.json'} (dtype {m['dtype']})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .loader import verify_shards

    for path in verify_shards(args.dir):  # a mismatch raises a ValueError: one line, exit code 2
        print(f"ok: {path}")
    return 0


def add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="corpora, tokenizer and token shards")
    sub = data.add_subparsers(dest="data_command", required=True)
    p = sub.add_parser("prepare", help="split documents, train the tokenizer, write train.bin/val.bin + manifest",
                       description="Split documents into train/validation by document, train a byte-level BPE on "
                       "the training documents, and write token shards; reuses them when nothing changed.")
    p.add_argument("--source", action="append", default=None, metavar="SRC",
                   help="shakespeare (default), pystdlib, a file or folder (.txt .md .jsonl .parquet), "
                   "or hf:NAME[:CONFIG]; repeat to combine")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation (0.05)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/validation split (default: 0)")
    p.add_argument("--text-field", default="text", help="jsonl field / parquet and dataset column (text)")
    p.add_argument("--tokenizer", default=None, help="use this tokenizer.json instead of training one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)
    v = sub.add_parser("verify", help="check a prepared folder's files against its manifest's SHA-256",
                       description="Check tokenizer.json, train.bin and val.bin against the sizes and SHA-256 "
                       "recorded in manifest.json (training does this once at its start).")
    v.add_argument("dir", help="a folder written by `kha data prepare`")
    v.set_defaults(func=cmd_verify)
