"""Extras that live outside the training loop and carry their own state (restored on resume)."""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

from .. import safe_io
from ..errors import UserError
from .checkpoint import disk_errors


class SpikeDetector:
    """Counts loss-spike *events* (DESIGN.md section 7).

    The reference is the mean (and standard deviation) of the last ``window`` admitted losses. A step is
    *high* when its loss exceeds the mean by more than ``threshold`` standard deviations (judged once
    ``window`` losses have been admitted). An event starts at a high step outside an event and lasts until
    a loss falls back to the mean or below; it counts once, however long it lasts (``spikes`` holds the
    start steps). High losses are kept out of the window (so a spike does not hide the next one) until
    ``admit_after`` consecutive high steps, then admitted: after a permanent level shift the window moves to
    the new level, the event ends, and ordinary noise around the new level is not flagged.
    ``update`` returns True on an event's first step only (the ``spike`` flag of ``metrics.jsonl``).
    """

    def __init__(self, window: int = 50, threshold: float = 4.0, admit_after: int = 10):
        self.window, self.threshold, self.admit_after = window, threshold, admit_after
        self.history: deque[float] = deque(maxlen=window)
        self.spikes: list[int] = []
        self.in_event = False
        self.high_run = 0

    def update(self, step: int, loss: float) -> bool:
        high = False
        mean = None
        if len(self.history) == self.window:
            mean = sum(self.history) / self.window
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / (self.window - 1))
            high = loss > mean + self.threshold * std
        self.high_run = self.high_run + 1 if high else 0
        start = high and not self.in_event
        if start:
            self.spikes.append(step)
            self.in_event = True
        elif self.in_event and mean is not None and loss <= mean:
            self.in_event = False
        if not high or self.high_run > self.admit_after:
            self.history.append(loss)
        return start

    def state_dict(self) -> dict:
        return {"history": list(self.history), "spikes": list(self.spikes), "in_event": self.in_event,
                "high_run": self.high_run}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.spikes = list(state["spikes"])
        self.in_event = state.get("in_event", False)
        self.high_run = state.get("high_run", 0)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimizer step, appended and flushed line by line, so a kill
    at any moment leaves a readable file (at worst a torn last line, which ``read_metrics`` skips).

    On resume, lines after the checkpoint's step (and a torn last line) are dropped first, by an atomic
    rewrite, so the file always reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if resume_step and path.exists() else []
        with disk_errors("metrics", path):
            safe_io.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        with disk_errors("metrics", self.path), safe_io.append_text(self.path) as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(record, path: Path, line: int, prev_step: int) -> dict:
    """One ``metrics.jsonl`` record as the readers use it: an object with a whole ``step`` above the previous
    line's, numbers for the measurements, a true/false ``spike``."""
    def bad(why: str) -> UserError:
        return UserError(f"{path}: line {line} {why}; the file is damaged (or not a kha metrics file)")


    if not isinstance(record, dict):
        raise bad(f"is a JSON {type(record).__name__}, not an object")
    step = record.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool)):
        raise bad("has no step" if step is None else f"has step {step!r}, not a whole number")
    if step <= prev_step:
        raise bad(f"has step {step}, not after the previous line's {prev_step}")
    for key, value in record.items():
        if key == "spike" and not isinstance(value, bool):
            raise bad(f"has spike {value!r}, not true or false")
        if key not in ("step", "spike") and not _number(value):
            raise bad(f"has {key} {value!r}, not a number")
    return record


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, each checked (a malformed line is an error naming the file and line);
    a torn last line (a write cut short by a kill) is skipped. The file may not be a link leading out of its
    folder."""
    path = safe_io.inside(path, Path(path).parent)
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); the file is damaged") from None
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the last write was cut short
                break
            raise UserError(f"{path}: line {i + 1} is not JSON ({line[:60]!r}); the file is damaged") from None
        records.append(_check_record(record, path, i + 1, records[-1]["step"] if records else -1))
    return records


def spike_event_steps(records: list[dict]) -> list[int]:
    """The step each loss-spike event of ``metrics.jsonl`` records began at: runs of consecutive ``spike`` flags
    count once (the detector flags only an event's first step; older files flagged every spiking step)."""
    return [r["step"] for prev, r in zip([{}, *records], records, strict=False)
            if r.get("spike") and not prev.get("spike")]


def count_spike_events(records: list[dict]) -> int:
    return len(spike_event_steps(records))
