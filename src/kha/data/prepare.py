"""Turn document sources into token shards: ``prepare(sources, out_dir)``.

- Splits train/validation **by document**, deterministically: a document goes to validation when a hash of
  ``(seed, doc_id)`` falls below ``val_fraction`` (at least one document on each side).
- Trains the byte-level BPE on the training documents only (or uses a given ``tokenizer.json``).
- Writes ``train.bin`` / ``val.bin``: flat arrays of token ids (uint16 when the vocabulary has at most 65,536
  ids, else uint32; read them with ``np.memmap``), every document followed by the EOS id.
- Writes ``manifest.json`` last: configuration, corpus fingerprint, documents per split, token counts,
  SHA-256 of every file, dtype, tokenizer. Every file is written under a temporary name and renamed when
  complete, and a rebuild deletes the old manifest first, so a crash never leaves a manifest describing
  files that are not all there.
- Re-running with the same arguments on the same texts reuses everything (manifest, fingerprint and
  checksums match); any other argument, or an edited text, rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import safe_io
from ..errors import UserError, naming, read_json
from .sources import Document, resolve, sha256_file
from .tokenizer import EOS, load_tokenizer, train_tokenizer

FORMAT = "kha-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
BATCH_CHARS = 1 << 20  # characters per encode_batch call


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared folder, with a clear error when there is none."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        what = "no such folder" if not Path(data_dir).is_dir() else f"no {MANIFEST} in it"
        raise FileNotFoundError(f"{data_dir}: {what}; build the token shards first with "
                                f"`kha data prepare --source ... --out {data_dir}`")
    manifest = read_json(safe_io.inside(path, data_dir))
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: not a manifest (a JSON object); run `kha data prepare` again")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')}, "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}; run `kha data prepare` again")
    try:  # the fields readers use: an edited manifest fails here, not mid-run
        np.dtype(manifest["dtype"])
        [manifest["tokenizer"][k] for k in ("file", "sha256", "vocab_size")]
        [int(s["tokens"]) + len(s["file"] + s["sha256"]) for s in manifest["splits"].values()]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: a damaged manifest ({type(err).__name__}: {err}); run `kha data prepare` "
                        "again") from err
    return manifest


def split_unit(doc_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``(seed, doc_id)``; below ``val_fraction`` means validation."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(doc_ids: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The ids that go to validation: those whose ``split_unit`` is below ``val_fraction``.

    If none is, the one with the smallest value goes; if all are, the one with the largest stays in training.
    """
    if len(doc_ids) < 2:
        raise ValueError(f"{len(doc_ids)} document(s): a train/validation split needs at least 2")
    units = {d: split_unit(d, seed) for d in doc_ids}
    val = {d for d, u in units.items() if u < val_fraction}
    if not val:
        val = {min(units, key=units.get)}
    if len(val) == len(units):
        val.discard(max(units, key=units.get))
    return val


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class _ShardWriter:
    """Appends token arrays to ``<name>.tmp``, hashing as it goes; ``commit()`` renames it into place."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.tokens = path, dtype, 0
        self.tmp = safe_io.temp_beside(path)  # a fresh file, renamed in place of ``path`` (never a link)
        self.file, self.digest = open(self.tmp, "wb"), hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype).tobytes()
        with naming(self.path):
            self.file.write(data)
        self.digest.update(data)
        self.tokens += len(ids)

    def commit(self) -> str:
        with naming(self.path):
            self.file.close()
            safe_io.publish(self.tmp, self.path)
        return self.digest.hexdigest()

    def discard(self) -> None:
        try:
            self.file.close()  # flushes what is buffered: on a full disk that fails again
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def _reusable(old: dict | None, out: Path, config: dict, fingerprint: str) -> bool:
    if not old or old.get("format_version") != FORMAT_VERSION or old.get("config") != config:
        return False
    if old.get("corpus_sha256") != fingerprint:
        return False
    files = [(out / TOKENIZER, old["tokenizer"]["sha256"])]
    files += [(out / s["file"], s["sha256"]) for s in old["splits"].values()]
    return all(path.exists() and sha256_file(safe_io.inside(path, out)) == sha for path, sha in files)


def prepare(sources: Sequence[str | os.PathLike], out_dir: str | os.PathLike, vocab_size: int = 8192,
            val_fraction: float = 0.05, seed: int = 0, text_field: str = "text",
            tokenizer: str | os.PathLike | None = None, verbose: bool = True, progress: bool | None = None) -> dict:
    """Build (or reuse) ``tokenizer.json``, ``train.bin``, ``val.bin`` and ``manifest.json`` in ``out_dir``.

    ``sources``: ``--source`` strings (see ``sources.resolve``), read in order. ``tokenizer``: an existing
    ``tokenizer.json`` to use instead of training one (``vocab_size`` is then ignored). ``verbose``: say what
    was reused; ``progress``: progress bars (default: ``verbose``). Returns the manifest.
    """
    progress = verbose if progress is None else progress
    specs = [os.fspath(s) for s in sources]
    if not specs:
        raise ValueError("no sources given")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    safe_io.make_dirs(out)
    config = {"sources": specs, "vocab_size": None if tokenizer else vocab_size, "val_fraction": val_fraction,
              "seed": seed, "text_field": text_field,
              "tokenizer_sha256": sha256_file(tokenizer) if tokenizer else None}
    readers = [resolve(spec, text_field) for spec in specs]

    def documents(desc: str | None = None, total: int | None = None) -> Iterator[Document]:
        docs = (doc for read in readers for doc in read())
        return tqdm(docs, desc=desc, unit=" docs", total=total, disable=not progress) if desc else docs

    # Pass 1: document ids and a fingerprint of every text.
    ids: list[str] = []
    text_digests: dict[str, bytes] = {}
    corpus = hashlib.sha256()
    has_text = False
    for doc_id, text in documents("reading"):
        if doc_id in text_digests:
            raise ValueError(f"document id {doc_id!r} appears twice: is a source given twice?")
        ids.append(doc_id)
        has_text = has_text or bool(text)
        text_digests[doc_id] = _text_digest(text)
        corpus.update(doc_id.encode() + b"\0" + text_digests[doc_id])
    fingerprint = corpus.hexdigest()
    if ids and not has_text:
        raise UserError(f"no text found in {', '.join(specs)}: all {len(ids)} document(s) are empty"
                        + (f" (is --text-field {text_field!r} the field that holds the text?)"
                           if any(Path(s).suffix in (".jsonl", ".parquet") or Path(s).is_dir() for s in specs) else ""))

    manifest_path = out / MANIFEST
    try:
        old = json.loads(safe_io.inside(manifest_path, out).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        old = None
    if _reusable(old, out, config, fingerprint):
        if verbose:
            print(f"reused the token shards in {out} (same arguments and texts as {manifest_path})")
        return old
    manifest_path.unlink(missing_ok=True)

    val = split_documents(ids, val_fraction, seed)
    train_ids = [d for d in ids if d not in val]

    # The tokenizer: given, reused (same vocabulary size and training texts), or trained on training docs.
    tok_path = out / TOKENIZER
    wrote_tokenizer = not tokenizer or Path(tokenizer).resolve() != tok_path.resolve()
    tok_key = hashlib.sha256(json.dumps({"vocab_size": vocab_size, "eos": EOS}).encode()
                             + b"".join(d.encode() + b"\0" + text_digests[d] for d in train_ids)).hexdigest()
    if tokenizer:
        load_tokenizer(tokenizer)  # a bad file fails under the name it was given, before it is copied
        if Path(tokenizer).resolve() != tok_path.resolve():
            safe_io.write_bytes(tok_path, Path(tokenizer).read_bytes())
        tok, tok_key = load_tokenizer(tok_path), None
    elif (old and old.get("tokenizer", {}).get("key") == tok_key and tok_path.exists()
          and sha256_file(tok_path) == old["tokenizer"]["sha256"]):
        tok = load_tokenizer(tok_path)
        if verbose:
            print(f"reused {tok_path} (same vocabulary size and training documents)")
    else:
        train_texts = (text for doc_id, text in documents() if doc_id not in val)
        tok = train_tokenizer(train_texts, vocab_size, tok_path, length=len(train_ids), show_progress=progress)
    n_vocab = tok.get_vocab_size()
    eos_id = tok.token_to_id(EOS)
    dtype = np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)

    # Pass 2 (3 when the tokenizer was trained): encode in batches, append to the split's shard.
    writers = {s: _ShardWriter(out / f, dtype) for s, f in SPLIT_FILES.items()}
    check = hashlib.sha256()
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        encodings = tok.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (split, _), enc in zip(batch, encodings, strict=True):
            writers[split].write(np.array([*enc.ids, eos_id], dtype=np.int64))
        batch.clear()

    try:
        chars = 0
        for doc_id, text in documents("tokenizing", total=len(ids)):
            check.update(doc_id.encode() + b"\0" + _text_digest(text))
            batch.append(("val" if doc_id in val else "train", text))
            chars += len(text)
            if chars >= BATCH_CHARS:
                flush()
                chars = 0
        flush()
        if check.hexdigest() != fingerprint:
            raise RuntimeError("the sources gave different documents on a second reading; are they changing?")
        digests = {s: w.commit() for s, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.discard()
        if wrote_tokenizer:  # without a manifest the folder is never reused: a tokenizer.json would only mislead
            tok_path.unlink(missing_ok=True)
        raise

    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config,
        "corpus_sha256": fingerprint,
        "dtype": dtype.name,
        "tokenizer": {"file": TOKENIZER, "sha256": sha256_file(tok_path), "vocab_size": n_vocab,
                      "eos": EOS, "eos_id": eos_id, "key": tok_key},
        "splits": {
            s: {"file": SPLIT_FILES[s], "sha256": digests[s], "tokens": writers[s].tokens,
                "num_documents": len(doc_list), "documents": doc_list}
            for s, doc_list in (("train", train_ids), ("val", [d for d in ids if d in val]))
        },
    }
    safe_io.write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return manifest

