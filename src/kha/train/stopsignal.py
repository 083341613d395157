"""A clean stop on SIGTERM: the signal a scheduler sends before it preempts or times out a job (Slurm, Kubernetes,
``docker stop``) and that ``torchrun`` forwards to its workers.

While :class:`StopOnSignal` is active, SIGTERM no longer kills the process: it is recorded, the training loop
finishes the step it is in (never stopping in the middle of a checkpoint save), saves a checkpoint, releases the
run lock and raises :class:`kha.errors.RunStopped`; ``--resume`` then continues bit-identically. A second SIGTERM
acts at once (the previous handler is restored by the first). Under several processes every rank stops after the
same step: the loop reduces the flag together with the loss.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

from ..errors import RunStopped

STOP_SIGNALS = (signal.SIGTERM,)


class StopOnSignal:
    """Context manager recording :data:`STOP_SIGNALS` instead of dying of them (main thread only: Python delivers
    signals there; elsewhere, or where a signal was set to be ignored, it changes nothing). Nested uses share the
    outermost one, so ``kha ablate`` and the runs it trains see the same signal."""

    _outermost: StopOnSignal | None = None

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if StopOnSignal._outermost is not None:
            return StopOnSignal._outermost
        if threading.current_thread() is threading.main_thread():
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
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts at once
        # os.write, not print: a handler that interrupts a buffered write to stderr must not write to it again
        os.write(2, f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint (send it "
                    "again to stop at once, without one)\n".encode())

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (a collective when several processes train)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum > 0
        t = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) > 0

    def error(self, when: str) -> RunStopped:
        """The error that ends a stopped run: ``stopped by SIGTERM {when}``."""
        signum = self.signum or STOP_SIGNALS[0]  # another rank's signal when this one received none
        return RunStopped(f"stopped by {signal.Signals(signum).name} {when}", signum)
