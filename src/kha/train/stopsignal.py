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

The stop is bounded. Python runs signal handlers in the main thread only, between bytecodes, so a main thread stuck
in one long call (a first compilation, a collective another rank never joins) would neither answer nor die of a
second signal. A watcher thread therefore reads every signal's number from ``signal.set_wakeup_fd`` (written by
the C-level handler, whatever the main thread does): if the run has not stopped :data:`STOP_BOUND_S` after the
first SIGTERM, it says so once, naming the ways to stop at once; a second SIGTERM (after the grace) or a Ctrl-C
that the main thread has not acted on within :data:`ANSWER_S` ends the process from the watcher (``os._exit``).
Stopping at once loses what was trained since the last checkpoint; the checkpoints themselves are complete (each
is written to a temporary folder and renamed), and the stale run lock is taken over by the next run.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import torch

from ..errors import RunStopped
from .distributed import any_rank

STOP_SIGNALS = (signal.SIGTERM,)
REPEAT_GRACE_S = 5.0
STOP_BOUND_S = 30.0  # a stop still running this long after the first SIGTERM is reported (once)
ANSWER_S = 2.0  # how long the main thread has to act on a second signal before the watcher ends the process


class StopOnSignal:
    """Context manager recording :data:`STOP_SIGNALS` instead of dying of them (main thread only: Python delivers
    signals there; elsewhere, or where a signal was set to be ignored, it changes nothing). Nested uses share the
    outermost one, so ``kha ablate`` and the runs it trains see the same signal."""

    _outermost: StopOnSignal | None = None

    def __init__(self):
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._answered = threading.Event()  # the main thread acted on a repeated SIGTERM
        self._watcher: _Watcher | None = None

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
        if self._previous:
            self._watcher = _Watcher.start(self)
        StopOnSignal._outermost = self
        return self

    def __exit__(self, *exc) -> None:
        if StopOnSignal._outermost is not self:
            return
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
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
            self._answered.set()
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)  # delivered again, now to what was there before

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank received a stop signal (a collective when several processes train)."""
        return any_rank(self.signum > 0, device)

    def error(self, when: str) -> RunStopped:
        """The error that ends a stopped run: ``stopped by SIGTERM {when}``."""
        signum = self.signum or STOP_SIGNALS[0]  # another rank's signal when this one received none
        return RunStopped(f"stopped by {signal.Signals(signum).name} {when}", signum)


class _Watcher:
    """The thread behind the bounded stop (module docstring): it owns the wakeup fd while the stop is active."""

    def __init__(self, stop: StopOnSignal, reader: socket.socket, writer: socket.socket, previous_fd: int):
        self.stop_, self.reader, self.writer, self.previous_fd = stop, reader, writer, previous_fd
        self.thread = threading.Thread(target=self._run, name="kha-stop-watcher", daemon=True)
        self.exiting = threading.Event()  # the stop's __exit__ has begun: the main thread is not stuck

    @classmethod
    def start(cls, stop: StopOnSignal) -> _Watcher | None:
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        try:
            previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        except ValueError:
            previous_fd = None
        if previous_fd != -1:  # someone else's wakeup fd (an event loop): leave it theirs, no watcher
            if previous_fd is not None:
                signal.set_wakeup_fd(previous_fd)
            reader.close()
            writer.close()
            return None
        watcher = cls(stop, reader, writer, previous_fd)
        watcher.thread.start()
        return watcher

    def stop(self) -> None:
        self.exiting.set()
        signal.set_wakeup_fd(self.previous_fd)
        self.writer.send(b"\0")  # 0 is no signal: the thread's cue to end
        self.thread.join()
        self.reader.close()
        self.writer.close()

    def _run(self) -> None:
        first_at, first, reported, pid = None, "SIGTERM", False, os.getpid()
        while True:
            deadline = None if first_at is None or reported else first_at + STOP_BOUND_S
            self.reader.settimeout(None if deadline is None else max(0.0, deadline - time.monotonic()))
            try:
                data = self.reader.recv(64)
            except TimeoutError:
                reported = True
                os.write(2, f"still stopping {STOP_BOUND_S:g} s after {first}"
                            ": the step in progress has not finished (a compilation, or a collective waiting for "
                            f"another process?). To stop at once: send SIGTERM again (kill -TERM {pid}) or press "
                            f"Ctrl-C, or kill -9 {pid}; what was trained since the last checkpoint is lost, the "
                            "checkpoints are kept\n".encode())
                continue
            for signum in data:
                if signum == 0:
                    return
                if signum in STOP_SIGNALS and first_at is None:
                    first_at, first = time.monotonic(), signal.Signals(signum).name
                elif signum in STOP_SIGNALS and time.monotonic() - first_at > REPEAT_GRACE_S:
                    self._unless_answered(signum, self.stop_._answered.wait)
                elif signum == signal.SIGINT and first_at is not None:
                    self._unless_answered(signum, self.exiting.wait)

    def _unless_answered(self, signum: int, answered) -> None:
        """End the process unless the main thread acts on ``signum`` within :data:`ANSWER_S` (``answered(timeout)``
        true: for a repeated SIGTERM its handler ran, for a Ctrl-C the stop's ``__exit__`` began)."""
        if answered(ANSWER_S):
            return
        os.write(2, f"{signal.Signals(signum).name} again: stopping at once (the main thread did not answer); what "
                    "was trained since the last checkpoint is lost\n".encode())
        os._exit(128 + signum)
