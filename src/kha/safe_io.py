"""Reading and writing inside a folder that someone else may have prepared (a run, a study, a data or Hugging Face
folder), so that its symbolic links cannot turn kha against its user.

- Writes never follow a link: :func:`write_bytes` / :func:`write_text` and :func:`atomic_output` (for writers that
  take a file name: safetensors, matplotlib, tokenizers) write a fresh temporary file beside the destination and
  rename it into place (a crash leaves the old or the new file, never a mix); :func:`append_text` opens with
  ``O_NOFOLLOW``; :func:`staged_folder` collects what a third-party ``save_pretrained`` writes and moves it in.
  A destination that is a link, or a link among the folders between the handed folder (``root``) and the file, is
  a :class:`LinkError` (one line naming it).
- Reads of a handed folder stay inside it: :func:`inside` refuses a path whose links lead out of ``root``.
- Deletion never acts through a link: :func:`remove_tree` refuses a linked folder instead of doing nothing.
- :func:`plain_text`: a string from a JSON file that will be written into another file: no control characters.

The folder given on the command line (``root``) is the user's choice and may itself be a link; what lies inside it
is checked. The guard is against folders handed over whole, not against a process racing kha on the same machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


class LinkError(UserError):
    """A symbolic link where kha would write, delete or read outside the folder it was given."""


def _link_error(path: Path, doing: str) -> LinkError:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return LinkError(f"{path} is a symbolic link (to {target}); kha does not {doing} through links in a folder it "
                     "may have been handed: replace the link by a real file or folder, or use another folder")


def is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def check_no_links(path: str | os.PathLike, root: str | os.PathLike | None = None, doing: str = "write") -> Path:
    """``path``, after checking that neither it nor a folder between ``root`` (default: its parent) and it is a
    symbolic link. ``root`` itself is not checked."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        raise ValueError(f"{path} is not inside {root}") from None
    current = root
    for part in parts:
        current = current / part
        if is_link(current):
            raise _link_error(current, doing)
    return path


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``path`` for reading, after checking that its links (if any) do not lead out of ``root``."""
    path, root = Path(path), Path(root)
    resolved, base = path.resolve(), root.resolve()
    if resolved != base and base not in resolved.parents:
        link = next((p for p in [path, *path.parents] if is_link(p)), path)
        raise LinkError(f"{link} leads out of {root} (to {resolved}); kha does not read through links that leave a "
                        "folder it may have been handed: replace the link by the file itself")
    return path


def make_dirs(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """``mkdir -p path``, refusing links between ``root`` (default: the first existing ancestor) and ``path``."""
    path = Path(path)
    if root is None:
        root = next(p for p in path.parents if p.exists())  # "." or "/" at worst
    check_no_links(path, root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def temp_beside(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A new empty file beside ``path`` under a random name, to write and then :func:`publish` as ``path``.

    ``O_EXCL``: never an existing file or link; the umask's permissions, as a plain ``open`` gives; the suffix is
    kept for writers that choose a format by it. ``path`` must not be a link (see :func:`check_no_links`).
    """
    path = check_no_links(path, root)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{path.suffix or '.tmp'}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
            return tmp
        except FileExistsError:
            continue


def publish(tmp: Path, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Rename the written ``tmp`` onto ``path`` (fsynced first), refusing a ``path`` that is a link."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    path = check_no_links(path, root)
    os.replace(tmp, path)  # rename(2) replaces the name itself, never a link's target
    return path


@contextmanager
def atomic_output(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` to write by name; renamed onto ``path`` when the block ends without an
    error, removed otherwise (a crash leaves the old or the new file, never a mix)."""
    tmp = temp_beside(path, root)
    try:
        yield tmp
        publish(tmp, path, root)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes, root: str | os.PathLike | None = None) -> Path:
    """Write ``path`` atomically (old or new content after a crash), never through a link."""
    with atomic_output(path, root) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, root: str | os.PathLike | None = None) -> Path:
    return write_bytes(path, text.encode("utf-8"), root)


@contextmanager
def append_text(path: str | os.PathLike, root: str | os.PathLike | None = None):
    """``path`` opened for appending text (created if missing); a link there is a :class:`LinkError`."""
    path = check_no_links(path, root)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if is_link(path):
            raise _link_error(path, "write") from err
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        yield f


def read_bytes(path: str | os.PathLike, root: str | os.PathLike) -> bytes:
    return inside(path, root).read_bytes()


def copy_file(src: str | os.PathLike, src_root: str | os.PathLike, dest: str | os.PathLike,
              dest_root: str | os.PathLike | None = None) -> Path:
    """Copy ``src`` (inside ``src_root``) to ``dest``: no link out of the source, none at the destination."""
    return write_bytes(dest, read_bytes(src, src_root), dest_root)


def remove_tree(path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
    """Delete folder ``path`` (nothing when missing); a link there is a :class:`LinkError`, a failure an error."""
    path = check_no_links(path, root, doing="delete")
    if path.exists():
        shutil.rmtree(path)


@contextmanager
def staged_folder(out: str | os.PathLike, root: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh folder inside ``out`` for a writer that fills a whole folder (``save_pretrained``); when the block
    ends, what it wrote is moved into ``out`` file by file, after checking that no destination is a link (if one
    is, nothing is moved)."""
    out = make_dirs(out, root)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staged-"))
    try:
        yield stage
        written = sorted(stage.rglob("*"))  # a folder before its files
        for src in written:
            check_no_links(out / src.relative_to(stage), out)
        for src in written:
            dest = out / src.relative_to(stage)
            if src.is_dir():
                dest.mkdir(exist_ok=True)
            else:
                os.replace(src, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def plain_text(value, what: str) -> str:
    """``value`` as a string to write into a file, refusing control characters (a newline would add lines)."""
    text = str(value)
    bad = next((c for c in text if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if bad is not None:
        raise UserError(f"{what} {text[:40]!r} holds the control character {bad!r}; names may hold none")
    return text
