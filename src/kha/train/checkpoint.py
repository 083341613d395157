"""Sharded, atomic training checkpoints through ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a folder ``checkpoints/step_NNNNNNN`` holding the DCP shards of the model, the optimizer
and every process's RNG states, plus ``meta.json`` (step, data position, callbacks' state: plain JSON,
never pickle). It is written under a temporary name and renamed only once complete, and ``latest`` is
replaced atomically after that, so a crash while saving never damages the last good checkpoint.
Works unchanged for one process and for FSDP2 across many.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import Runtime, barrier


@contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load that it assumes one process, which is what we want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_state(runtime: Runtime) -> dict[str, torch.Tensor]:
    state = {f"rng/cpu/rank{runtime.rank}": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state[f"rng/cuda/rank{runtime.rank}"] = torch.cuda.get_rng_state(runtime.device)
    return state


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, model, optimizer, meta: dict, runtime: Runtime, keep: int) -> Path:
    """Save after optimizer step ``step`` (the number of steps done); returns the checkpoint folder."""
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _quiet_single_process():
        dcp.save({"model": model_sd, "optim": optim_sd, **_rng_state(runtime)}, checkpoint_id=str(tmp),
                 no_dist=not dist.is_initialized())
    barrier()
    if runtime.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", final.name)
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def load_checkpoint(path: Path, model, optimizer, runtime: Runtime) -> dict:
    """Restore model, optimizer and this process's RNG states in place; return ``meta.json``."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    rng = _rng_state(runtime)
    state = {"model": model_sd, "optim": optim_sd, **rng}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state[f"rng/cpu/rank{runtime.rank}"])
    if runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state[f"rng/cuda/rank{runtime.rank}"], runtime.device)
    return json.loads((path / "meta.json").read_text())


def clean_partial(root: Path, runtime: Runtime) -> None:
    """Remove folders left by a save that crashed before its rename."""
    if runtime.is_main:
        for tmp in root.glob(".tmp_step_*"):
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        barrier()
