"""A clean stop on SIGTERM: the signal a scheduler sends before it preempts or times out a job (Slurm, Kubernetes,
``docker stop``) and that ``torchrun`` forwards to its workers.

While :class:`StopOnSignal` is active, SIGTERM no longer kills the process: it is recorded, the training loop
finishes the step it is in (never stopping in the middle of a checkpoint save), saves a checkpoint, releases the
run lock and raises :class:`RunStopped`; ``--resume`` then continues bit-identically. A second SIGTERM acts at once
(the previous handler is restored by the first). Under several processes every rank stops after the same step:
the ranks agree on the signal once per step.
"""

from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM,)


class StopOnSignal:
    """Context manager recording :data:`STOP_SIGNALS` instead of dying of them (main thread only: Python
    delivers signals there; elsewhere it changes nothing)."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts at once
        print(f"received {signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once, without one)", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0: none); a collective when several processes train."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum
        t = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
