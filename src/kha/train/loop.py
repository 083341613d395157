"""The training loop, readable top to bottom: data -> model -> parallelize -> optimizer -> resume -> steps.

Each optimizer step: ``grad_accum`` micro-batches (in the run's precision, see ``precision.py``), a non-finite
loss check, gradient clipping and a non-finite gradient-norm check (either stops the run before the
weights change, naming the last good checkpoint; checkpoints refuse non-finite weights), AdamW (or Muon
and AdamW, see ``optim.py``) with the scheduled LR, the MoE balancing-bias update, metrics, spike detection,
periodic validation and checkpoints.
The same seed gives the same run, bit for bit on CPU, resumed or not.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .. import cpu_kernels, safe_io
from ..attention import document_ids
from ..data.loader import TokenBatches, read_manifest, verify_shards
from ..errors import UserError, read_json
from ..flops import model_flops_per_token, peak_flops
from ..model import DecoderLM
from ..runfiles import code_version
from .callbacks import MetricsLog, SpikeDetector
from .checkpoint import (
    NonFiniteError,
    broadcast_int,
    clean_partial,
    disk_errors,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)
from .config import TrainConfig, base_model_config, check_resume_fixed, check_resume_steps
from .distributed import Runtime, mean_across_ranks, parallelize, setup_runtime, teardown_runtime
from .host_memory import keep_freed_memory
from .optim import build_optimizer, clip_gradients, lr_at
from .precision import autocast_context, plan_precision
from .runlock import RunLock
from .stopsignal import StopOnSignal

# what a run writes into its --out folder, none of them a symbolic link: files (train_config.json is rewritten,
# --overwrite deletes the others) and folders
RUN_FILES = ("train_config.json", "metrics.jsonl", "model.safetensors", "model_config.json", "knocks.safetensors")
RUN_FOLDERS = ("checkpoints", "tensorboard")


def build_model_config(cfg: TrainConfig, vocab_size: int):
    model_cfg = base_model_config(cfg)
    return replace(model_cfg, vocab_size=vocab_size, max_seq_len=max(model_cfg.max_seq_len, cfg.seq_len))


def document_inputs(cfg: TrainConfig, eos_id: int):
    """The model's document-mask arguments for a batch of windows (none without ``doc_mask``): the documents'
    indices, computed on the batch's device, and the positions option."""
    def inputs(tokens: torch.Tensor) -> dict:
        return {"doc_ids": document_ids(tokens, eos_id), "doc_positions": cfg.doc_positions} if cfg.doc_mask else {}

    return inputs


@torch.no_grad()
def evaluate(model, batches: TokenBatches, n_batches: int, runtime: Runtime, autocast, documents=None) -> float:
    """Mean validation loss over ``n_batches``; ``documents``: :func:`document_inputs`, as in training."""
    model.eval()
    losses = []
    for inputs, targets in batches.val_batches(n_batches):
        inputs = inputs.to(runtime.device)
        with autocast():
            extra = documents(inputs) if documents is not None else {}
            losses.append(model(inputs, targets=targets.to(runtime.device), **extra).loss.float())
    model.train()
    return mean_across_ranks(torch.stack(losses).mean()).item()


def save_final_weights(model, model_cfg, out: Path, runtime: Runtime) -> None:
    """``model.safetensors`` (full, unsharded weights; the tied LM head stored once) + ``model_config.json``,
    and the knock matrices alone in ``knocks.safetensors`` (kilobytes: what a study keeps of its weights)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if runtime.is_main:
        if model_cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        with disk_errors("final weights", out / "model.safetensors"):
            with safe_io.atomic_output(out / "model.safetensors", out) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            knocks = {k: v.contiguous() for k, v in state.items() if ".knocks." in k}
            if knocks:
                with safe_io.atomic_output(out / "knocks.safetensors", out) as tmp:
                    save_file(knocks, str(tmp))
        safe_io.write_text(out / "model_config.json", json.dumps(asdict(model_cfg), indent=1), out)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the last step's record plus ``params`` and ``spikes`` (count)."""
    if cfg.deterministic:  # cuBLAS reads it when it starts: deterministic matmul workspaces (CUDA's docs)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    runtime = setup_runtime(cfg.device)
    lock = RunLock(cfg.out)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if cfg.deterministic:  # warn_only: an op without a deterministic form warns rather than stops the run
            torch.use_deterministic_algorithms(True, warn_only=True)
        with StopOnSignal() as stop:
            return _train(cfg, runtime, lock, stop)
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        lock.release()
        teardown_runtime()


def _claim_run(cfg: TrainConfig, runtime: Runtime, lock: RunLock) -> int:
    """Rank 0 locks ``out``, refuses (or with ``overwrite`` clears) an old run, verifies the data and picks the
    checkpoint to resume; every rank gets that checkpoint's step (-1: start from scratch)."""
    step = -2
    try:
        if runtime.is_main:
            step = _claim_run_main(cfg, lock)
    finally:
        step = broadcast_int(step, runtime)  # -2: rank 0 failed (its own error says why)
    if step == -2:
        raise RuntimeError(f"process 0 could not start the run in {cfg.out}; its error says why")
    return step


def _claim_run_main(cfg: TrainConfig, lock: RunLock) -> int:
    out, ckpt_root = Path(cfg.out), Path(cfg.out) / "checkpoints"
    lock.acquire()
    for name in RUN_FILES + RUN_FOLDERS:  # fail before training, not at the first write; no linked folder is pruned
        safe_io.check_no_links(out / name, out, doing="write, prune or delete")
    verify_shards(cfg.data)  # before anything is deleted
    if not cfg.resume and ((out / "metrics.jsonl").exists() or any(ckpt_root.glob("step_*"))):
        if not cfg.overwrite:
            raise ValueError(f"{out} already holds a run (metrics.jsonl or checkpoints); pass --resume to continue "
                             "it, --overwrite to delete it and start again, or another --out")
        print(f"overwrite: deleting the run in {out}", flush=True)
        for name in RUN_FILES[1:]:
            (out / name).unlink(missing_ok=True)  # checked above: none is a link
        for name in RUN_FOLDERS:
            safe_io.remove_tree(out / name, out)  # a link there is an error, never followed
    if not cfg.resume:
        return -1
    ckpt = latest_checkpoint(ckpt_root, verify=True, log=lambda msg: print(msg, flush=True))
    if ckpt is not None:
        step = int(ckpt.name.removeprefix("step_"))
        check_resume_steps(cfg.steps, step, cfg.stop_after)  # before train_config.json is rewritten with the new steps
        started = started_config(out)
        if started is not None:
            check_resume_fixed(started, cfg)
        if cfg.steps == step:
            print(f"{ckpt} is already at --steps {step}: nothing left to train; pass a larger --steps to continue",
                  flush=True)
        elif started is not None and (note := schedule_change(started, cfg, step)) is not None:
            print(note, flush=True)
        return step
    if any(ckpt_root.glob("step_*")):
        raise ValueError(f"{ckpt_root} holds checkpoints but none is complete and intact (see above); remove them, "
                         "or start again with --overwrite instead of --resume")
    print(f"no checkpoint in {ckpt_root}; starting from scratch", flush=True)
    return -1


SCHEDULE_FIELDS = ("steps", "lr", "warmup_frac", "min_lr_frac")


def started_config(out: Path) -> dict | None:
    """The ``train_config.json`` a run started with (None for a run that has none), checked to be a JSON object."""
    path = out / "train_config.json"
    if not path.is_file():
        return None
    started = read_json(safe_io.inside(path, out))
    if not isinstance(started, dict):
        raise UserError(f"{path}: not a training config (a JSON object); restore it or start again with --overwrite")
    return started


def schedule_change(started: dict, cfg: TrainConfig, step: int) -> str | None:
    """A warning when a resume at ``step`` changes the LR schedule the run started with (``started``, its
    ``train_config.json``): the schedule is a function of these settings, so e.g. a larger ``--steps`` stretches
    the cosine from here on."""
    changed = {k: started[k] for k in SCHEDULE_FIELDS if k in started and started[k] != getattr(cfg, k)}
    if not changed:
        return None
    try:
        before = replace(cfg, **changed)
    except (TypeError, ValueError):
        return None
    what = ", ".join(f"--{k.replace('_', '-')} {v} -> {getattr(cfg, k)}" for k, v in changed.items())
    return (f"warning: resuming with a changed schedule ({what}): the warmup + cosine LR schedule is recomputed for "
            f"{cfg.steps} steps; the LR of step {step + 1} is {lr_at(step, cfg):.3g} (it would have been "
            f"{lr_at(step, before):.3g}), ending at {lr_at(cfg.steps - 1, cfg):.3g} at step {cfg.steps}")


def _stop_non_finite(what: str, value: float, step: int, ckpt_root: Path, runtime: Runtime):
    latest = latest_checkpoint(ckpt_root, verify=runtime.is_main)
    return NonFiniteError(
        f"{what} is {value} at step {step + 1}; stopping without updating the weights. "
        f"The last good checkpoint is {latest or 'none (no checkpoint saved yet)'}; resume from it "
        "with --resume, e.g. with a lower --lr."
    )


def _train(cfg: TrainConfig, runtime: Runtime, lock: RunLock, stop: StopOnSignal) -> dict:
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    resume_step = _claim_run(cfg, runtime, lock)
    latest = ckpt_root / f"step_{resume_step:07d}" if resume_step >= 0 else None

    # data; a resume's position (and so its data, seed, seq_len and global batch) checked before anything is written
    train_data = TokenBatches(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                              rank=runtime.rank, world_size=runtime.world_size)
    val_data = TokenBatches(cfg.data, "val", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                            rank=runtime.rank, world_size=runtime.world_size)
    if latest is not None:
        train_data.load_state_dict(read_meta(latest)["data"])
    started = started_config(out) if cfg.resume else None
    precision, why, kernels = _precision(cfg, runtime, started)
    kept = runtime.device.type == "cpu" and cfg.keep_freed_memory and keep_freed_memory()
    if runtime.is_main:
        print(f"precision: {precision} ({why})", flush=True)
        if kept:
            print("host memory: freed memory kept in the process for the next step (--no-keep-freed-memory to "
                  "give it back to the system)", flush=True)
        if kernels["cpu_kernels"]:
            print(f"CPU kernels: {cpu_kernels.kernels_label(kernels)} (kha.cpu_kernels; "
                  f"{cpu_kernels.ENV_SWITCH}=0 for torch's ops)", flush=True)
        safe_io.make_dirs(ckpt_root, out)
        saved = {**cfg.to_dict(), "resolved_precision": precision, **kernels,
                 "trained_on": _trained_on(started, runtime, max(resume_step, 0) + 1, cfg.steps)}
        # atomic: other processes may be reading the old file (_precision) at this moment
        safe_io.write_text(out / "train_config.json", json.dumps(saved, indent=1), out)
    clean_partial(ckpt_root, runtime)

    # model: the same seed gives the same base weights whatever the knock setting
    torch.manual_seed(cfg.seed)
    tokenizer = read_manifest(cfg.data)["tokenizer"]
    model_cfg = build_model_config(cfg, tokenizer["vocab_size"])
    documents = document_inputs(cfg, tokenizer["eos_id"])
    model = DecoderLM(model_cfg).to(runtime.device)
    n_params = sum(p.numel() for p in model.parameters())
    model = parallelize(model, runtime, compile=cfg.compile, scope=cfg.compile_scope)
    optimizer = build_optimizer(model, cfg)

    def autocast():
        return autocast_context(precision, runtime.device)

    spikes = SpikeDetector(cfg.spike_window, cfg.spike_threshold)
    start_step = 0
    if latest is not None:
        meta = load_checkpoint(latest, model, optimizer, runtime)
        start_step = meta["step"]
        spikes.load_state_dict(meta["callbacks"]["spikes"])
        if runtime.is_main:
            print(f"resumed from {latest} (step {start_step})", flush=True)

    metrics = MetricsLog(out / "metrics.jsonl", start_step) if runtime.is_main else None
    writer = _tensorboard(out, cfg) if runtime.is_main else None
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * runtime.world_size
    flops_per_token = model_flops_per_token(model_cfg, cfg.seq_len)
    peak = (peak_flops(runtime.device) or 0) * runtime.world_size
    bar = _progress(cfg, runtime, start_step)
    record: dict = {}
    stopped_at = None  # (step, checkpoint) when a stop signal ended the run early
    sliced_at = None  # (step, checkpoint) when stop_after ended this call
    model.train()
    try:
        if stop.agreed(runtime.device):  # signalled while starting: nothing new to save
            raise stop.error(f"before step {start_step + 1}; nothing was trained in this call; it starts again "
                             "where it was with --resume")
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=runtime.device)
            for _ in range(cfg.grad_accum):
                inputs, targets = (t.to(runtime.device) for t in train_data.next_batch())
                with autocast():
                    loss = model(inputs, targets=targets, **documents(inputs)).loss / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            # the stop flag travels with the loss: one reduction, and every rank stops after the same step
            flag = loss_sum.new_tensor(float(stop.signum > 0))
            loss_value, stopping = mean_across_ranks(torch.stack([loss_sum, flag])).tolist()
            if not math.isfinite(loss_value):
                raise _stop_non_finite("loss", loss_value, step, ckpt_root, runtime)
            grad_norm = clip_gradients(model, cfg.grad_clip)
            if not math.isfinite(grad_norm):  # a finite loss can still have NaN gradients: never apply them
                raise _stop_non_finite("the gradient norm", grad_norm, step, ckpt_root, runtime)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moe_load = model.update_moe_biases()
            dt = time.perf_counter() - t0

            done = step + 1
            record = {"step": done, "loss": loss_value, "lr": lr, "tokens": done * tokens_per_step,
                      "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                      "spike": spikes.update(done, loss_value)}
            if moe_load:  # read here, outside the compiled model, once per step
                record["moe_max_over_mean"] = torch.stack([m["max_over_mean"] for m in moe_load]).max().item()
            if peak:
                record["mfu"] = flops_per_token * tokens_per_step / dt / peak
            if done % cfg.eval_every == 0 or done == cfg.steps:
                record["val_loss"] = evaluate(model, val_data, cfg.eval_batches, runtime, autocast, documents)
            if runtime.is_main:
                metrics.write(record)
                if writer is not None:
                    for key, value in record.items():
                        if isinstance(value, (int, float)) and key != "step":
                            writer.add_scalar(key, value, done)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                    spikes=len(spikes.spikes), refresh=False)
                    bar.update(1)
            slice_end = done == cfg.stop_after < cfg.steps
            if stopping or slice_end or done % cfg.ckpt_every == 0 or done == cfg.steps:
                meta = {"data": train_data.state_dict(), "callbacks": {"spikes": spikes.state_dict()}}
                saved = save_checkpoint(ckpt_root, done, model, optimizer, meta, runtime, cfg.keep_checkpoints)
                if stopping and done < cfg.steps:
                    stopped_at = (done, saved)
                    break
                if slice_end:
                    sliced_at = (done, saved)
                    break
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()

    if stopped_at is not None:
        raise stop.error(f"after step {stopped_at[0]} of {cfg.steps}; saved {stopped_at[1]}; continue with --resume")
    if sliced_at is not None:
        if runtime.is_main:
            print(f"stopped after step {sliced_at[0]} of {cfg.steps} as --stop-after asked; saved {sliced_at[1]}; "
                  "continue with --resume", flush=True)
        return {**record, "params": n_params, "spikes": len(spikes.spikes)}
    save_final_weights(model, model_cfg, out, runtime)
    if runtime.is_main and record:
        summary = f"step {record['step']}: loss {record['loss']:.4f}"
        if "val_loss" in record:
            summary += f", val_loss {record['val_loss']:.4f}"
        print(f"{summary}; {len(spikes.spikes)} loss-spike event(s); wrote {out}", flush=True)
    if stop.agreed(runtime.device):  # during the last step or the final save: the run is complete, stop the caller
        raise stop.error(f"as the run finished; it is complete in {out}")
    return {**record, "params": n_params, "spikes": len(spikes.spikes)}


def planned_precision(cfg: TrainConfig, device: torch.device, asked: str | None = None) -> tuple[str, str, bool]:
    """``(precision, why, amx_attention)``: what ``asked`` (default ``cfg.precision``) resolves to for ``cfg``'s
    model on ``device``, and whether kha's attention kernel covers it there."""
    return plan_precision(asked or cfg.precision, base_model_config(cfg), cfg.batch_size, cfg.seq_len, device)


def _trained_on(started: dict | None, runtime: Runtime, first_step: int, steps: int) -> list[dict]:
    """Where each stretch of a run trained: one entry per (re)start, from its step ``first_step`` (1-based, as in
    ``metrics.jsonl``) on, so a run resumed on other hardware or code (which round differently) says which steps
    ran where and on what. Kept from ``started`` (the run's ``train_config.json``): well-formed entries of steps before
    ``first_step`` (a resume from an earlier checkpoint discards the later ones); none is added for a run that
    has no step left."""
    earlier = (started or {}).get("trained_on")
    kept = [e for e in (earlier if isinstance(earlier, list) else []) if isinstance(e, dict)
            and type(e.get("first_step")) is int and e["first_step"] < first_step and isinstance(e.get("device"), str)]
    if first_step > steps:
        return kept
    device = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else runtime.device.type
    return [*kept, {"first_step": first_step, "device": device, "processes": runtime.world_size,
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "kha": code_version()}]


def _precision(cfg: TrainConfig, runtime: Runtime, started: dict | None) -> tuple[str, str, dict]:
    """The run's precision, why, and which of ``kha.cpu_kernels``'s kernels it trains on (``amx_attention``:
    its attention, on AMX or AVX512-BF16 alike; ``cpu_kernels``: the fused QK-norm + RoPE, SwiGLU gate, loss and
    knocks; ``cpu_micro_kernel``: what their products run on, ``kha.cpu_kernels.micro_kernel``). A resumed ``auto`` run
    keeps the precision it started in (``started``: its ``train_config.json``); one that lands on other kernels
    says so."""
    asked = started.get("resolved_precision", "auto") if started and cfg.precision == "auto" else cfg.precision
    precision, why, covered = planned_precision(cfg, runtime.device, asked)
    bf16_cpu = runtime.device.type == "cpu" and precision == "bf16"
    fused = bf16_cpu and cpu_kernels.prepare()
    kernels = {"amx_attention": covered and bf16_cpu, "cpu_kernels": fused,
               "cpu_micro_kernel": cpu_kernels.micro_kernel() if fused else None}
    before = ({"amx_attention": started.get("amx_attention", False), "cpu_kernels": started.get("cpu_kernels", False),
               "cpu_micro_kernel": cpu_kernels.recorded_micro_kernel(started)} if started else kernels)
    if before != kernels and runtime.is_main:
        print(f"warning: this run trained on {cpu_kernels.kernels_label(before)} and resumes on "
              f"{cpu_kernels.kernels_label(kernels)}: the same run, but no longer bit for bit the uninterrupted one "
              f"({cpu_kernels.ENV_SWITCH}=0 selects torch's ops, {cpu_kernels.ENV_SWITCH}=avx512 the kernels "
              "without the AMX tiles)", flush=True)
    return precision, why, kernels


def _progress(cfg: TrainConfig, runtime: Runtime, start_step: int):
    if not (cfg.progress and runtime.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start_step, desc=Path(cfg.out).name, unit="step", dynamic_ncols=True)


def _tensorboard(out: Path, cfg: TrainConfig):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("tensorboard=True needs the tensorboard package: pip install tensorboard") from err
    return SummaryWriter(str(safe_io.make_dirs(out / "tensorboard", out)))
