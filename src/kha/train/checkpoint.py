"""Sharded, atomic, verified training checkpoints without pickle.

A checkpoint is a folder ``checkpoints/step_NNNNNNN``:

- ``rankNNNNN.safetensors``: every tensor one process holds (its local shards of the model and optimizer
  state, plain tensors such as buffers and AdamW step counts, its RNG states);
- ``rankNNNNN.json``: that process's non-tensor optimizer entries (``param_groups`` hyperparameters) and the
  layout of its shards;
- ``meta.json``: step, number of processes, data position, callbacks' state;
- ``checksums.json``, written last: the SHA-256 of every other file.

Nothing is pickled, so loading a checkpoint someone handed you cannot run code (``torch.distributed.checkpoint``'s
``.metadata`` is a pickle). The folder is written under a temporary name and renamed once complete;
``latest`` is then replaced atomically. Loading verifies a checkpoint as strictly as a config file (``damage``):
every file listed in ``checksums.json`` and matching it (an unlisted file is damage), ``meta.json`` typed and
consistent with its folder's name, every rank file a readable safetensors/JSON file, the RNG states of the right
size and every weight finite; a damaged or incomplete newest checkpoint falls back to the newest intact one,
saying which and why. Nothing is read or deleted through a symbolic link (``kha.safe_io``). FSDP2 shards are
saved as each process holds them; a checkpoint resumes with any number of processes (another number than wrote it
reassembles and cuts them again, ``load_checkpoint``).
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .. import safe_io
from ..data.sources import sha256_file
from ..errors import UserError
from .config import MAX_SEED, MAX_STEPS
from .distributed import Runtime, any_rank, barrier

FORMAT = "kha-checkpoint"
FORMAT_VERSION = 1
CHECKSUMS = "checksums.json"
MAX_WORLD = 1 << 20


def step_dirs(root: Path) -> list[Path]:
    """The checkpoint folders ``step_N`` under ``root``, oldest first (a copy such as ``step_N.bak`` is none)."""
    found = (p for p in Path(root).glob("step_*") if p.is_dir() and p.name[5:].isascii() and p.name[5:].isdigit())
    return sorted(found, key=lambda p: int(p.name[5:]))


class NonFiniteError(RuntimeError):
    """A NaN or infinity in the loss, the gradients or the weights: the run stops, no bad state is saved."""


@contextmanager
def disk_errors(what: str, path: Path):
    """Turn a full disk into one sentence naming the file or folder being written."""
    try:
        yield
    except Exception as err:  # safetensors' writer reports ENOSPC as a SafetensorError "... (os error 28)"
        if getattr(err, "errno", None) == errno.ENOSPC or f"(os error {errno.ENOSPC})" in str(err):
            raise OSError(errno.ENOSPC, f"No space left on device while writing {what} {path}; free some space "
                          "(fewer --keep-checkpoints also helps) and resume with --resume") from err
        raise


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _leaves(tree, prefix: str = ""):
    """``(path, leaf)`` of nested dicts and lists; tensors and JSON values are leaves."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and any(isinstance(x, (dict, torch.Tensor)) for x in tree):
        items = enumerate(tree)
    else:
        yield prefix, tree
        return
    for key, value in items:
        yield from _leaves(value, f"{prefix}/{key}" if prefix else str(key))


def _fill(tree, tensors: dict, values: dict, prefix: str = ""):
    """``tree`` with its tensors overwritten in place from ``tensors`` and its other leaves from ``values``."""
    if isinstance(tree, dict):
        return {k: _fill(v, tensors, values, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and any(isinstance(x, (dict, torch.Tensor)) for x in tree):
        return type(tree)(_fill(v, tensors, values, f"{prefix}/{i}") for i, v in enumerate(tree))
    if isinstance(tree, torch.Tensor):
        if prefix not in tensors:
            raise ValueError(f"the checkpoint has no tensor {prefix!r}: it was written for another model")
        local, saved = _local(tree), tensors[prefix]
        if local.shape != saved.shape or local.dtype != saved.dtype:
            raise ValueError(f"tensor {prefix!r} is {tuple(saved.shape)} {saved.dtype} in the checkpoint but "
                             f"{tuple(local.shape)} {local.dtype} in this model: it was written for another model")
        with torch.no_grad():
            local.copy_(saved)
        return tree
    if prefix not in values:
        raise ValueError(f"the checkpoint has no entry {prefix!r}: it was written for another model or optimizer")
    value = values[prefix]
    return tuple(value) if isinstance(tree, tuple) else value


def _layout(t: torch.Tensor) -> dict | None:
    """How a DTensor is split across processes (enough to rebuild the full tensor from every rank's shard)."""
    if not hasattr(t, "placements"):
        return None
    dims = [p.dim if p.is_shard() else None for p in t.placements]
    return {"global_shape": list(t.shape), "shard_dims": dims}


def _rng_state(runtime: Runtime) -> dict[str, torch.Tensor]:
    state = {"rng/cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["rng/cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def broadcast_int(value: int, runtime: Runtime) -> int:
    """Rank 0's ``value`` on every process (a tensor broadcast: no pickled objects)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=runtime.device)
    dist.broadcast(t, 0)
    return int(t.item())


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank{rank:05d}.safetensors", f"rank{rank:05d}.json"


def save_checkpoint(root: Path, step: int, model, optimizer, meta: dict, runtime: Runtime, keep: int) -> Path:
    """Save after optimizer step ``step`` (the number of steps done); returns the checkpoint folder.

    Refuses (``NonFiniteError``) when any weight is NaN or infinite, so no checkpoint is ever poisoned.
    """
    from safetensors.torch import save_file

    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    floats = [_local(t) for t in model_sd.values() if t.is_floating_point()]
    finite = bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()) if floats else True  # one sync
    if any_rank(not finite, runtime.device):
        raise NonFiniteError(f"the weights hold NaN or infinite values after step {step}; refusing to save them "
                             "as a checkpoint")
    if runtime.is_main:
        safe_io.check_no_links(root, root.parent, doing="save checkpoints")
        safe_io.remove_tree(tmp, root)
        tmp.mkdir(parents=True)
    barrier()
    tensors, values, layout = dict(_rng_state(runtime)), {}, {}
    for key, leaf in _leaves({"model": model_sd, "optim": optim_sd}):
        if isinstance(leaf, torch.Tensor):
            local = _local(leaf.detach())
            tensors[key] = torch.empty(local.shape, dtype=local.dtype).copy_(local)  # contiguous CPU copy
            if (info := _layout(leaf)) is not None:
                layout[key] = info
        else:
            values[key] = leaf
    st_name, json_name = _rank_files(runtime.rank)
    try:
        with disk_errors("checkpoint", tmp):
            with safe_io.atomic_output(tmp / st_name, tmp) as part:
                save_file(tensors, str(part))
            safe_io.write_text(tmp / json_name, json.dumps({"values": values, "layout": layout}), tmp)
        barrier()
        if runtime.is_main:
            with disk_errors("checkpoint", tmp):
                safe_io.write_text(tmp / "meta.json", json.dumps(
                    {"step": step, "world_size": runtime.world_size, **meta}, indent=1), tmp)
                sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
                safe_io.write_text(tmp / CHECKSUMS, json.dumps(
                    {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": sums}, indent=1), tmp)
                safe_io.remove_tree(final, root)
                os.replace(tmp, final)
                safe_io.write_text(root / "latest", final.name, root)
            done = step_dirs(root)
            for old in done[:-keep]:
                safe_io.remove_tree(old, root)  # a linked step_N (another run's checkpoint) is an error, not pruned
    except BaseException:
        if runtime.is_main:
            safe_io.remove_tree(tmp, root)
        raise
    barrier()
    return final


class CheckpointError(UserError):
    """A checkpoint file that is malformed, inconsistent or not what kha wrote (the message names it)."""


def _is_int(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_meta(meta, path: Path) -> dict:
    """``meta.json`` of checkpoint ``path``, checked field by field (the fields resuming reads)."""
    where = path / "meta.json"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    step = meta.get("step")
    if not _is_int(step, 0, MAX_STEPS):
        raise CheckpointError(f"{where}: step {step!r} is not a whole number in [0, {MAX_STEPS}]")
    if path.name.startswith("step_") and path.name[5:].isdigit() and int(path.name[5:]) != step:
        raise CheckpointError(f"{where}: step {step} disagrees with its folder {path.name}")
    if not _is_int(meta.get("world_size"), 1, MAX_WORLD):
        raise CheckpointError(f"{where}: world_size {meta.get('world_size')!r} is not a number of processes")
    data = meta.get("data")
    ints = ("epoch", "step", "seed", "seq_len", "global_batch")
    if not (isinstance(data, dict) and all(_is_int(data.get(k), 0, MAX_SEED) for k in ints)
            and all(isinstance(data.get(k), str) for k in ("split", "data_sha256"))):
        raise CheckpointError(f"{where}: 'data' is not a data position (whole numbers {', '.join(ints)}; strings "
                              "split, data_sha256)")
    callbacks = meta.get("callbacks")
    spikes = callbacks.get("spikes") if isinstance(callbacks, dict) else None
    if not (isinstance(spikes, dict) and isinstance(spikes.get("history"), list)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in spikes["history"])
            and isinstance(spikes.get("spikes"), list) and all(_is_int(x, 0, MAX_STEPS) for x in spikes["spikes"])
            and isinstance(spikes.get("in_event", False), bool) and _is_int(spikes.get("high_run", 0), 0, MAX_STEPS)):
        raise CheckpointError(f"{where}: 'callbacks' lacks the spike detector's state (callbacks.spikes: history "
                              "of finite losses, spikes of steps, in_event, high_run)")
    return meta


def read_meta(path: Path) -> dict:
    """The checked ``meta.json`` of checkpoint folder ``path`` (a :class:`CheckpointError` names what is wrong)."""
    return _check_meta(_read_json(Path(path) / "meta.json"), Path(path))


def _read_json(file: Path):
    """A checkpoint's JSON file, not followed through a link; any malformed content is one line naming it."""
    if safe_io.is_link(file):
        raise CheckpointError(f"{file} is a symbolic link; a checkpoint's files are plain files")
    try:
        return json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), "pt")
    except Exception as err:  # SafetensorError: huge or overlapping header, truncated file, ...
        raise CheckpointError(f"{file}: not a readable safetensors file ({' '.join(str(err).split())})") from err


def _check_rank_files(path: Path, meta: dict, finite: bool = True) -> None:
    """Every process's files: JSON of the right shape, safetensors that open, RNG states of the right size and
    (``finite``) no NaN or infinity in the weights."""
    rng_bytes = torch.get_rng_state().numel()
    for rank in range(meta["world_size"]):
        st_name, json_name = _rank_files(rank)
        info = _read_json(path / json_name)
        if not (isinstance(info, dict) and isinstance(info.get("values"), dict)
                and isinstance(info.get("layout"), dict)):
            raise CheckpointError(f"{path / json_name}: not a rank file (an object with 'values' and 'layout')")
        with _open_safetensors(path / st_name) as f:
            keys = set(f.keys())
            if "rng/cpu" not in keys:
                raise CheckpointError(f"{path / st_name}: no CPU RNG state (rng/cpu)")
            try:
                for key in sorted(keys):
                    if key.startswith("rng/"):
                        t = f.get_tensor(key)
                        if t.dtype != torch.uint8 or t.dim() != 1 or (key == "rng/cpu" and t.numel() != rng_bytes):
                            raise CheckpointError(f"{path / st_name}: {key} is {tuple(t.shape)} {t.dtype}, not an "
                                                  f"RNG state ({rng_bytes} uint8 for rng/cpu)")
                    elif finite and key.startswith("model/"):
                        t = f.get_tensor(key)
                        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                            raise CheckpointError(f"{path / st_name}: {key} holds NaN or infinite weights")
            except CheckpointError:
                raise
            except Exception as err:  # a tensor's bytes out of the file
                raise CheckpointError(f"{path / st_name}: unreadable tensor ({' '.join(str(err).split())})") from err


def damage(path: Path, verify: bool = True) -> str | None:
    """Why checkpoint folder ``path`` cannot be used (missing, incomplete, damaged), or None when it can.

    ``verify=False`` only checks that it is complete (its checksum manifest is there and lists every file),
    without hashing or reading the tensors.
    """
    if safe_io.is_link(path):
        return "a symbolic link (kha reads no checkpoint through a link)"
    if not path.is_dir():
        return "missing"
    try:
        manifest = _read_json(path / CHECKSUMS)
    except (OSError, CheckpointError):
        return f"incomplete (no readable {CHECKSUMS}; or written by an older kha)"
    sums = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not (isinstance(sums, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in sums.items())):
        return f"damaged ({CHECKSUMS} is not a table of file names and SHA-256 digests)"
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        found = f"{manifest.get('format')!r} version {manifest.get('format_version')}"
        return f"in format {found}, not {FORMAT!r} version {FORMAT_VERSION}"
    if "meta.json" not in sums:
        return f"incomplete ({CHECKSUMS} lists no meta.json)"
    present = {p.name for p in path.iterdir()} - {CHECKSUMS}
    unlisted = sorted(present - set(sums))
    if unlisted:
        return f"damaged ({unlisted[0]} is not listed in {CHECKSUMS})"
    if not verify:
        return None
    for name, want in sums.items():
        file = path / name
        if name not in present or not file.is_file():
            return f"damaged ({name} is missing)"
        if safe_io.is_link(file):
            return f"damaged ({name} is a symbolic link)"
        if sha256_file(file) != want:
            return f"damaged ({name} does not match its SHA-256 in {CHECKSUMS})"
    try:
        meta = read_meta(path)
        missing = [n for r in range(meta["world_size"]) for n in _rank_files(r) if n not in sums]
        if missing:
            return f"incomplete ({CHECKSUMS} lists no {missing[0]})"
        _check_rank_files(path, meta)
    except (CheckpointError, OSError) as err:
        return f"damaged ({' '.join(str(err).split())})"
    return None


def _read_pointer(pointer: Path) -> str | None:
    """The folder name in ``latest``, or None when it is absent, a link, or not a checkpoint name."""
    if safe_io.is_link(pointer) or not pointer.is_file():
        return None
    try:
        named = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return named if named.startswith("step_") and named[5:].isdigit() else None


def latest_checkpoint(root: Path, verify: bool = False, log: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete (and, with ``verify``, intact) checkpoint under ``root``, or None.

    A ``latest`` pointer naming a missing or incomplete folder (or holding no folder name), or a damaged newer
    checkpoint, is passed over for the next one, and ``log`` is told which and why.
    """
    root = Path(root)
    candidates = step_dirs(root)[::-1]
    pointer = root / "latest"
    named = _read_pointer(pointer)
    if log and pointer.exists() and named is None:
        log(f"{pointer} does not name a checkpoint folder (step_N); looking for the newest complete checkpoint")
    elif named and not (root / named).is_dir() and log:
        log(f"{pointer} names {named}, which is missing; looking for the newest complete checkpoint")
    skipped = []
    for path in candidates:
        reason = damage(path, verify)
        if reason is None:
            if skipped and log:
                log(f"using {path}: " + "; ".join(f"{p.name} is {r}" for p, r in skipped))
            return path
        skipped.append((path, reason))
    if skipped and log:
        log(f"no usable checkpoint in {root}: " + "; ".join(f"{p.name} is {r}" for p, r in skipped))
    return None


def load_checkpoint(path: Path, model, optimizer, runtime: Runtime) -> dict:
    """Restore model, optimizer and this process's RNG states in place; return ``meta.json``.

    Reads only safetensors and JSON (never pickle). The caller verifies the checkpoint (``damage``) first. Written
    by another number of processes, it is resharded (:func:`_resharded`): each process reads the piece FSDP2
    gives it here from the writers' shards; the RNG state is this rank's where the writers had one, else rank
    0's. The data position is global, so the resumed run sees the same batches if it keeps the global batch
    (``--batch-size`` x processes).
    """
    from safetensors.torch import load_file

    meta = read_meta(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    template = {"model": model_sd, "optim": optim_sd}
    if meta["world_size"] == runtime.world_size:
        st_name, json_name = _rank_files(runtime.rank)
        with _open_safetensors(path / st_name):
            tensors = load_file(str(path / st_name))
        values = _read_json(path / json_name)["values"]
    else:
        tensors, values = _resharded(path, meta, template, runtime)
    values = {**values, **_run_choices(template)}
    state = _fill(template, tensors, values)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(tensors["rng/cpu"])
    if runtime.device.type == "cuda" and "rng/cuda" in tensors:  # none in a checkpoint written on a CPU
        torch.cuda.set_rng_state(tensors["rng/cuda"], runtime.device)
    return meta


# optimizer settings that say how this run steps, not what it learned (AdamW is fused in one process, not under
# FSDP: kha.train.optim.build_optimizer): a resume keeps this run's, whoever wrote the checkpoint
RUN_CHOICES = ("fused", "foreach", "capturable", "differentiable")


def _run_choices(template: dict) -> dict:
    return {key: leaf for key, leaf in _leaves(template)
            if key.startswith("optim/") and key.rsplit("/", 1)[-1] in RUN_CHOICES}


def _resharded(path: Path, meta: dict, template: dict, runtime: Runtime) -> tuple[dict, dict]:
    """This process's tensors and values from a checkpoint written by another number of processes: each tensor
    of ``template`` (this process's state dicts) as the piece this process holds (:func:`_piece_here`), read from
    the parts of the writers' shards it overlaps, so that no process reads the whole state."""
    with _every_rank(path, meta) as (files, first):
        saved = set(files[0].keys())
        own = files[runtime.rank] if runtime.rank < len(files) else files[0]
        tensors = {key: own.get_tensor(key) for key in saved if key.startswith("rng/")}
        for key, leaf in _leaves(template):
            if isinstance(leaf, torch.Tensor) and key in saved:
                tensors[key] = _read_part(path, key, files, first["layout"].get(key), _piece_here(key, leaf),
                                          list(leaf.shape))
    return tensors, first["values"]


@contextmanager
def _every_rank(path: Path, meta: dict):
    """Every writer's safetensors file open (checked first), and rank 0's JSON (its ``layout`` and ``values``)."""
    _check_rank_files(path, meta, finite=False)
    first = _read_json(path / _rank_files(0)[1])
    with ExitStack() as opened:
        yield [opened.enter_context(_open_safetensors(path / _rank_files(r)[0]))
               for r in range(meta["world_size"])], first


def _piece_here(key: str, leaf: torch.Tensor) -> tuple[int, int, int] | None:
    """``(dim, start, stop)``: the range this process holds of ``leaf`` (its tensor in the model or optimizer),
    None for all of it. A DTensor sharded on a 1-D mesh is cut as FSDP2 cuts it: chunk ``rank`` of
    ``torch.chunk`` along the sharded dimension (empty where there are fewer chunks than processes)."""
    placements = getattr(leaf, "placements", ())
    shard_dims = [p.dim for p in placements if p.is_shard()]
    if not shard_dims:
        return None
    if len(placements) > 1:
        raise ValueError(f"{key} is sharded over a {len(placements)}-D mesh here; a checkpoint can be resharded "
                         "only for 1-D (FSDP2) sharding")
    dim, mesh = shard_dims[0], leaf.device_mesh
    size = leaf.shape[dim]
    chunk = -(-size // mesh.size())
    start = min(mesh.get_local_rank() * chunk, size)
    return dim, start, min(start + chunk, size)


def _read_part(path: Path, key: str, files: list, info: dict | None, part: tuple[int, int, int] | None,
               shape: list[int] | None = None):
    """Tensor ``key`` of a checkpoint whose rank files are open as ``files``, whole (``part`` None) or the range
    ``part`` = ``(dim, start, stop)`` of it, from the writers' shards as ``info`` (its layout) says they were cut
    (FSDP2: one sharded dimension at most); ``shape``: the whole tensor's shape in this model, where known. Only
    the overlapping parts of the shards are read."""
    dims = [d for d in info["shard_dims"] if d is not None] if info else []
    if len(dims) > 1:
        raise ValueError(f"{path}: {key} is sharded over a {len(info['shard_dims'])}-D mesh; only 1-D (FSDP2) "
                         "sharding can be reassembled")
    saved_dim = dims[0] if dims else None
    shards = [f.get_slice(key) for f in (files if dims else files[:1])]
    shapes = [list(shard.get_shape()) for shard in shards]
    whole = list(shapes[0])
    if dims:
        whole[saved_dim] = sum(shape[saved_dim] for shape in shapes)
    if info is not None and whole != info["global_shape"]:
        raise ValueError(f"{path}: the shards of {key} make {whole}, not its global shape {info['global_shape']}")
    if shape is not None and whole != shape:
        raise ValueError(f"tensor {key!r} is {whole} in the checkpoint but {shape} in this model: it was written "
                         "for another model")
    if part is None and not dims:
        return files[0].get_tensor(key)
    pieces, offset = [], 0
    for shard, shard_shape in zip(shards, shapes, strict=True):
        length = shard_shape[saved_dim] if dims else 0
        index = [slice(None)] * len(shard_shape)
        if part is not None:
            dim, start, stop = part
            if dim == saved_dim:  # the overlap of this shard with the range, in the shard's own indices
                index[dim] = slice(min(max(start - offset, 0), length), min(max(stop - offset, 0), length))
            else:
                index[dim] = slice(start, stop)
        pieces.append(shard[tuple(index)])
        offset += length
    return torch.cat(pieces, dim=saved_dim) if dims else pieces[0]


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a checkpoint, in one process: for analysis, not for resuming."""
    path = Path(path)
    with _every_rank(path, read_meta(path)) as (files, first):
        return {key.removeprefix("model/"): _read_part(path, key, files, first["layout"].get(key), None)
                for key in files[0].keys() if key.startswith("model/")}


def clean_partial(root: Path, runtime: Runtime) -> None:
    """Remove folders left by a save that crashed before its rename."""
    if runtime.is_main:
        for tmp in root.glob(".tmp_step_*"):
            safe_io.remove_tree(tmp, root)
    if dist.is_initialized():
        barrier()
