"""An exclusive lock on a run folder, so two trainings never write the same ``--out``.

``out/.lock`` is held with ``fcntl.flock`` for as long as the run lasts, and holds the owner's PID and host name
(JSON) for the messages. The kernel releases the lock when its process ends, however it ends, so a lock left by a
dead process (whatever its file says: a PID that is gone, a string, nothing) is simply taken over, with a message,
and taking it over is one atomic step: of two processes racing for it, exactly one gets it. A live holder makes
the second writer fail with an error naming it. The file is removed on exit; a process that locked a file which
was removed in the meantime tries again on the new one. ``.lock`` is opened with ``O_NOFOLLOW``: a link there is
an error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from .. import safe_io
from ..errors import UserError

LOCK = ".lock"


class RunLockedError(UserError):
    """Another process holds the run folder (a user error: ``kha`` reports it in one line)."""


class RunLock:
    def __init__(self, out: str | os.PathLike, log=print):
        self.path = Path(out) / LOCK
        self.log = log
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _holder(self, fd: int) -> dict:
        """What the lock file says about its writer (empty when it is empty or not kha's)."""
        try:
            holder = json.loads(os.pread(fd, 4096, 0))
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP or safe_io.is_link(self.path):
                raise safe_io.LinkError(f"{self.path} is a symbolic link; the run lock must be a plain file: "
                                        "delete the link") from None
            raise

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                pid, host = holder.get("pid", "unknown"), holder.get("host", "unknown host")
                raise RunLockedError(
                    f"{self.path.parent} is in use by process {pid} on {host} (lock file {self.path}); wait for it "
                    "to finish or use another --out") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file between our open and our lock: lock the new one
                os.close(fd)
                continue
            break
        try:
            holder = self._holder(fd)  # what a process that died holding the lock left in it
            if os.fstat(fd).st_size:
                self.log(f"taking over the lock {self.path} left by process {holder.get('pid', '(unreadable)')}, "
                         "which no longer holds it")
            me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, me, 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no one can hold this file after us
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
