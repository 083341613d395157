"""A clean stop on SIGTERM: the signal a scheduler sends before it preempts or times out a job (Slurm, Kubernetes,
``docker stop``) and that ``torchrun`` forwards to its workers.

While :class:`StopOnSignal` is active, SIGTERM no longer kills the process: it is recorded, the training loop
finishes the step it is in (never stopping in the middle of a checkpoint save), saves a checkpoint, releases the
run lock and raises :class:`kha.errors.RunStopped`; ``--resume`` then continues bit-identically. A SIGTERM more
than :data:`REPEAT_GRACE_S` after the first acts at once, as if this module were not there; repeats within that
window are the same stop arriving twice (Slurm signals every process of a job, and torchrun forwards the signal to
its workers again) and are ignored. Under several processes every rank stops after the same step: the loop reduces
the flag together with the loss. torchrun kills its workers 30 s after forwarding a SIGTERM: the step in progress,
an evaluation due at its end and the checkpoint must fit in that time.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from ..errors import RunStopped
from .distributed import any_rank

STOP_SIGNALS = (signal.SIGTERM,)
REPEAT_GRACE_S = 5.0


class StopOnSignal:
    """Context manager recording :data:`STOP_SIGNALS` instead of dying of them (main thread only: Python delivers
    signals there; elsewhere, or where a signal was set to be ignored, it changes nothing). Nested uses share the
    outermost one, so ``kha ablate`` and the runs it trains see the same signal."""

    _outermost: StopOnSignal | None = None

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if StopOnSignal._outermost is not None:
            return StopOnSignal._outermost
        if threading.current_thread() is not threading.main_thread():
            return self  # no handlers here, so nothing to share
        for sig in STOP_SIGNALS:
            previous = signal.getsignal(sig)
            if previous is not signal.SIG_IGN:
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
                signal.signal(sig, self._record)
        StopOnSignal._outermost = self
        return self

    def __exit__(self, *exc) -> None:
        if StopOnSignal._outermost is not self:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        StopOnSignal._outermost = None

    def _record(self, signum, frame) -> None:
        # os.write, not print: a handler that interrupts a buffered write to stderr must not write to it again
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
            os.write(2, f"received {name}: stopping after this step with a checkpoint (send it again after "
                        f"{REPEAT_GRACE_S:g} s to stop at once, without one)\n".encode())
        elif time.monotonic() - self._first_at > REPEAT_GRACE_S:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)  # delivered again, now to what was there before

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (a collective when several processes train)."""
        return any_rank(self.signum > 0, device)

    def error(self, when: str) -> RunStopped:
        """The error that ends a stopped run: ``stopped by SIGTERM {when}``."""
        signum = self.signum or STOP_SIGNALS[0]  # another rank's signal when this one received none
        return RunStopped(f"stopped by {signal.Signals(signum).name} {when}", signum)
