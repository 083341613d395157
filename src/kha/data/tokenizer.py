"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``), trained locally; no download at run time.

- ``train_tokenizer(texts, vocab_size, path)``: train on an iterable of texts and save ``tokenizer.json``.
- ``load_tokenizer(path)``: load one for encoding documents.
- ``EOS``: ``<|endoftext|>``, id 0, the only special token; it separates documents in the token shards.

Byte-level BPE round-trips any UTF-8 text exactly (no normalizer). Text that happens to contain the
characters ``<|endoftext|>`` is encoded as ordinary text (``encode_special_tokens``), so only the pipeline
inserts EOS ids. That setting is not saved in ``tokenizer.json``: load through ``load_tokenizer``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .. import safe_io
from ..errors import UserError

EOS = "<|endoftext|>"


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike | None = None,
                    length: int | None = None, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` ids (EOS and the 256 bytes included); save it to ``path``.

    The vocabulary is smaller when the texts run out of pairs to merge. ``path`` is written atomically.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size {vocab_size} is below 257 (256 bytes + {EOS})")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer, length=length)
    assert tok.token_to_id(EOS) == 0
    if path is not None:
        with safe_io.atomic_output(path) as tmp:
            try:
                tok.save(str(tmp))
            except Exception as err:  # tokenizers raises a bare Exception (e.g. on a full disk)
                raise UserError(f"{path}: could not write the tokenizer ({err})") from err
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        if not Path(path).is_file():
            raise FileNotFoundError(2, "no such file", str(path)) from err
        raise UserError(f"{path}: not a Hugging Face tokenizers tokenizer.json ({err})") from err
    if tok.token_to_id(EOS) is None:
        raise ValueError(f"{path}: the tokenizer has no {EOS} token")
    tok.encode_special_tokens = True
    return tok
