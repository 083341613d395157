"""An exclusive lock on a run folder, so two trainings never write the same ``--out``.

``out/.lock`` holds the owner's PID and host name (JSON). It is created complete by a hard link (atomic), removed on
exit, exceptions included. A lock left by a process that no longer runs (same host, PID not alive) is
taken over, with a message; a live holder, or one on another host, makes the second writer fail with an
error naming it.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..errors import UserError

LOCK = ".lock"


class RunLockedError(UserError):
    """Another process holds the run folder (a user error: ``kha`` reports it in one line)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, out: str | os.PathLike, log=print):
        self.path = Path(out) / LOCK
        self.log = log
        self.held = False

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        tmp = self.path.with_name(f"{LOCK}.{me['pid']}.tmp")
        tmp.write_text(json.dumps(me))  # complete before it appears under the lock's name
        try:
            self._take(tmp, me)
        finally:
            tmp.unlink(missing_ok=True)

    def _take(self, tmp: Path, me: dict) -> None:
        for attempt in range(2):
            try:
                os.link(tmp, self.path)  # atomic, fails when the lock exists
            except FileExistsError:
                holder = self._holder()
                pid, host = holder.get("pid"), holder.get("host")
                stale = isinstance(pid, int) and host == me["host"] and not _alive(pid)
                if attempt == 0 and stale:
                    self.log(f"taking over the stale lock {self.path} of process {pid}, which no longer runs")
                    self.path.unlink(missing_ok=True)
                    continue
                if attempt == 0 and not self.path.exists():  # released in the meantime
                    continue
                if pid is None:  # kha writes a lock complete: this one is someone else's, or damaged
                    raise RunLockedError(
                        f"{self.path} is not a lock kha wrote (no process id in it); if no training uses "
                        f"{self.path.parent}, delete that file and start again") from None
                raise RunLockedError(
                    f"{self.path.parent} is in use by process {pid} on {host} (lock file {self.path}); wait for it "
                    "to finish or use another --out (delete the lock file only if that process is gone)") from None
            self.held = True
            return

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
