"""User errors: what a command line reports as one line (exit code 2) instead of a traceback.

- :class:`UserError`: a bad input, a missing or damaged file; a ``ValueError``, so callers catching that still do.
- :data:`USER_ERRORS`: what the ``kha`` command's error boundary (``kha.cli.run_command``) turns into one line.
- :class:`RunStopped`: training stopped cleanly on a signal (``kha.train.stopsignal``); exit code 128 + signal.
- :func:`describe`: that line's text (an ``OSError`` as ``PATH: reason``).
- :func:`read_json`: ``json.loads`` of a file whose syntax errors name the file, line and column.
- :func:`naming`: a context in which an ``OSError`` without a file name (a write on a full disk) gets one.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path


class UserError(ValueError):
    """A problem with what the user gave (a value, a file, a folder), stated so they can fix it."""


class RunStopped(Exception):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is the shell's ``128 + signal``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# OSError: missing files and folders, permissions, a full disk; ImportError: a missing optional dependency.
USER_ERRORS = (ValueError, OSError, ImportError)


def describe(err: BaseException) -> str:
    """One line for ``err``: its message, or ``PATH: reason`` for an ``OSError`` that names a file."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror[0].lower()}{err.strerror[1:]}"
    text = str(err) or type(err).__name__
    return " ".join(text.split()) if "\n" in text else text


def read_json(path: str | os.PathLike):
    """The JSON value in ``path``; malformed JSON is a :class:`UserError` naming the file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err


@contextmanager
def naming(path: str | os.PathLike):
    """An ``OSError`` that names no file (``write`` or ``flush`` on a full disk: ``ENOSPC``) is re-raised naming
    ``path``, the file being written, so that :func:`describe` says which."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), os.fspath(path)) from err
