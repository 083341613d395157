"""Batches of token windows from a prepared folder, with a resumable position: ``TokenBatches``.

- A split's shard (``train.bin`` / ``val.bin``, memory-mapped) is cut into non-overlapping windows of
  ``seq_len + 1`` tokens; the tail shorter than a window is not used.
- ``next_batch()``: epoch ``e`` visits the windows in a permutation drawn from ``(seed, e)``. Global step ``s``
  of an epoch takes windows ``[s*G, (s+1)*G)`` of that order, ``G = batch_size * world_size``, and rank ``r``
  gets rows ``[r*batch_size, (r+1)*batch_size)`` of them: 2 ranks x B see exactly what 1 rank x 2B sees. An
  epoch has ``num_windows // G`` steps (the remainder waits for a later epoch's permutation).
- ``val_batches(max_batches)``: the windows in order, cut the same way across ranks; identical on every call.
- ``state_dict()`` / ``load_state_dict()``: the position (epoch, step), so a resumed run gets exactly the
  batches the uninterrupted run would have had.
- ``verify_shards(data_dir)``: every file against the manifest's SHA-256 (training does it once at its start;
  ``kha data verify DIR`` on demand). ``TokenBatches`` itself checks only the sizes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .. import safe_io
from .prepare import read_manifest
from .sources import sha256_file
from .tokenizer import load_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]


def verify_shards(data_dir: str | os.PathLike) -> list[Path]:
    """Check the tokenizer and every split's shard against the manifest (size and SHA-256); returns the files.

    A mismatch is a ValueError naming the file (and saying when it is all zeros, as after a crash that
    allocated the file but never wrote it).
    """
    manifest = read_manifest(data_dir)
    dtype = np.dtype(manifest["dtype"])
    files = [(manifest["tokenizer"]["file"], manifest["tokenizer"]["sha256"], None)]
    files += [(s["file"], s["sha256"], s["tokens"] * dtype.itemsize) for s in manifest["splits"].values()]
    checked = []
    for name, want, size in files:
        path = safe_io.inside(Path(data_dir) / name, data_dir)  # a name or link leading out of the folder: refused
        if not path.is_file():
            raise ValueError(f"{path} is missing; rebuild the folder with `kha data prepare`")
        if size is not None and path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size:,} bytes, its manifest says {size:,}; rebuild the "
                             "folder with `kha data prepare`")
        if sha256_file(path) != want:
            zeros = size is not None and size > 0 and not np.memmap(path, dtype=np.uint8, mode="r").any()
            what = "is all zeros" if zeros else "does not match the SHA-256 in its manifest (damaged or changed)"
            raise ValueError(f"{path} {what}; rebuild the folder with `kha data prepare`")
        checked.append(path)
    n_vocab = load_tokenizer(checked[0]).get_vocab_size()  # an edited vocab_size would index past the embedding
    if n_vocab != manifest["tokenizer"]["vocab_size"]:
        raise ValueError(f"{Path(data_dir) / 'manifest.json'} says vocab_size {manifest['tokenizer']['vocab_size']}, "
                         f"its tokenizer has {n_vocab} ids; rebuild the folder with `kha data prepare`")
    return checked


# how a user sets what a resumed position must match (the global batch is --batch-size x processes)
RESUME_NAMES = {"seed": "--seed", "seq_len": "--seq-len", "data_sha256": "data (--data) of SHA-256",
                "global_batch": "--batch-size x processes (the global batch)", "split": "split"}


class TokenBatches:
    """``(inputs, targets)`` int64 tensors of shape ``(batch_size, seq_len)``, targets shifted by one token."""

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        manifest = read_manifest(data_dir)
        if split not in manifest["splits"]:
            raise ValueError(f"no split {split!r} in {data_dir} (splits: {', '.join(manifest['splits'])})")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        info = manifest["splits"][split]
        path = safe_io.inside(Path(data_dir) / info["file"], data_dir)
        dtype = np.dtype(manifest["dtype"])
        if not path.exists() or path.stat().st_size != info["tokens"] * dtype.itemsize:
            raise ValueError(f"{path} is missing or not the size its manifest says; run `kha data prepare` again")
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.data_sha256 = info["sha256"]
        self.window = seq_len + 1
        self.num_windows = len(self.tokens) // self.window
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = self.num_windows // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the {split} split has {len(self.tokens):,} tokens: {self.num_windows} window(s) of seq_len + 1 = "
                f"{self.window} tokens, fewer than one global batch of {self.global_batch} "
                f"(batch_size {batch_size} x world_size {world_size}); use a shorter seq_len or a smaller batch"
            )
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of an epoch, in the order it visits them."""
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng((self.seed, epoch)).permutation(self.num_windows))
        return self._order[1]

    def _rows(self, windows: np.ndarray) -> Batch:
        index = windows[:, None] * self.window + np.arange(self.window)
        rows = torch.from_numpy(self.tokens[index].astype(np.int64))
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _mine(self, global_windows: np.ndarray) -> np.ndarray:
        return global_windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next_batch(self) -> Batch:
        G = self.global_batch
        windows = self._mine(self.order(self.epoch)[self.step * G:(self.step + 1) * G])
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return self._rows(windows)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def val_batches(self, max_batches: int | None = None) -> Iterator[Batch]:
        """Sequential windows, ``max_batches`` of them at most (all complete global batches when None)."""
        n = self.steps_per_epoch if max_batches is None else min(max_batches, self.steps_per_epoch)
        for k in range(n):
            yield self._rows(self._mine(np.arange(k * self.global_batch, (k + 1) * self.global_batch)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.global_batch, "split": self.split, "data_sha256": self.data_sha256}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position; the data, seed, seq_len and global batch must be the same."""
        for key in ("seed", "seq_len", "global_batch", "split", "data_sha256"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the run was started with {RESUME_NAMES.get(key, key)} "
                                 f"{state[key]!r}, this call has {getattr(self, key)!r}; resume with the run's "
                                 f"settings{self._batch_hint(state[key]) if key == 'global_batch' else ''}, or "
                                 "start a new run in another --out")
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"saved step {state['step']} is outside an epoch of {self.steps_per_epoch} steps")
        self.epoch, self.step = state["epoch"], state["step"]

    def _batch_hint(self, global_batch: int) -> str:
        """What keeps the run's global batch with this call's number of processes."""
        if global_batch % self.world_size:
            return f" (a global batch of {global_batch} does not split over {self.world_size} processes)"
        return f" (with {self.world_size} process(es): --batch-size {global_batch // self.world_size})"
