"""Extras that live outside the training loop and carry their own state (restored on resume)."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path


class SpikeDetector:
    """Counts loss spikes.

    Definition: step ``s`` is a spike when ``loss_s > mean + threshold * std``, where mean and std are
    taken over the previous ``window`` non-spike losses (so a spike does not mask the next one), and only
    once ``window`` losses have been seen. Spikes are marked in ``metrics.jsonl`` (``"spike": true``).
    """

    def __init__(self, window: int = 50, threshold: float = 4.0):
        self.window, self.threshold = window, threshold
        self.history: deque[float] = deque(maxlen=window)
        self.spikes: list[int] = []

    def update(self, step: int, loss: float) -> bool:
        spike = False
        if len(self.history) == self.window:
            mean = sum(self.history) / self.window
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (self.window - 1))
            spike = loss > mean + self.threshold * std
        if spike:
            self.spikes.append(step)
        else:
            self.history.append(loss)
        return spike

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spikes": list(self.spikes)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.spikes = list(state["spikes"])


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimizer step. On resume, lines after the checkpoint's
    step are dropped first, so the file always reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]
