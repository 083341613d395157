"""The training loop, readable top to bottom: data -> model -> parallelize -> optimizer -> resume -> steps.

Each optimizer step: ``grad_accum`` micro-batches (bf16 autocast on CUDA, fp32 on CPU), a non-finite
loss check (the run stops with a clear message and the last good checkpoint untouched), gradient
clipping, AdamW with the scheduled LR, the MoE balancing-bias update, metrics, spike detection,
periodic validation and checkpoints. The same seed gives the same run, bit for bit on CPU, resumed or not.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..data.loader import TokenBatches, read_manifest
from ..flops import model_flops_per_token, peak_flops
from ..model import DecoderLM
from .callbacks import MetricsLog, SpikeDetector
from .checkpoint import clean_partial, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, base_model_config
from .distributed import Runtime, mean_across_ranks, parallelize, setup_runtime, teardown_runtime
from .optim import build_optimizer, lr_at


class NonFiniteLossError(RuntimeError):
    pass


def build_model_config(cfg: TrainConfig, vocab_size: int):
    model_cfg = base_model_config(cfg)
    return replace(model_cfg, vocab_size=vocab_size, max_seq_len=max(model_cfg.max_seq_len, cfg.seq_len))


@torch.no_grad()
def evaluate(model, batches: TokenBatches, n_batches: int, runtime: Runtime, autocast) -> float:
    model.eval()
    losses = []
    for inputs, targets in batches.val_batches(n_batches):
        with autocast():
            losses.append(model(inputs.to(runtime.device), targets=targets.to(runtime.device)).loss.float())
    model.train()
    return mean_across_ranks(torch.stack(losses).mean()).item()


def save_final_weights(model, model_cfg, out: Path, runtime: Runtime) -> None:
    """``model.safetensors`` (full, unsharded weights; the tied LM head stored once) + ``model_config.json``."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if runtime.is_main:
        if model_cfg.tie_embeddings:
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
        (out / "model_config.json").write_text(json.dumps(asdict(model_cfg), indent=1))


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the last step's record plus ``params`` and ``spikes`` (count)."""
    runtime = setup_runtime(cfg.device)
    try:
        return _train(cfg, runtime)
    finally:
        teardown_runtime()


def _train(cfg: TrainConfig, runtime: Runtime) -> dict:
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    if runtime.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    clean_partial(ckpt_root, runtime)

    # data
    train_data = TokenBatches(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                              rank=runtime.rank, world_size=runtime.world_size)
    val_data = TokenBatches(cfg.data, "val", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                            rank=runtime.rank, world_size=runtime.world_size)

    # model: the same seed gives the same base weights whatever the knock setting
    torch.manual_seed(cfg.seed)
    model_cfg = build_model_config(cfg, read_manifest(cfg.data)["tokenizer"]["vocab_size"])
    model = DecoderLM(model_cfg).to(runtime.device)
    n_params = sum(p.numel() for p in model.parameters())
    model = parallelize(model, runtime, compile=cfg.compile)
    optimizer = build_optimizer(model, cfg)
    use_bf16 = runtime.device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    spikes = SpikeDetector(cfg.spike_window, cfg.spike_threshold)
    start_step = 0
    latest = latest_checkpoint(ckpt_root) if cfg.resume else None
    if latest is not None:
        meta = load_checkpoint(latest, model, optimizer, runtime)
        start_step = meta["step"]
        train_data.load_state_dict(meta["data"])
        spikes.load_state_dict(meta["callbacks"]["spikes"])
        if runtime.is_main:
            print(f"resumed from {latest} (step {start_step})", flush=True)
    elif cfg.resume and runtime.is_main:
        print(f"no checkpoint in {ckpt_root}; starting from scratch", flush=True)

    metrics = MetricsLog(out / "metrics.jsonl", start_step) if runtime.is_main else None
    writer = _tensorboard(out, cfg) if runtime.is_main else None
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * runtime.world_size
    flops_per_token = model_flops_per_token(model_cfg, cfg.seq_len)
    peak = (peak_flops(runtime.device) or 0) * runtime.world_size
    bar = _progress(cfg, runtime, start_step)
    record: dict = {}
    model.train()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=runtime.device)
        for _ in range(cfg.grad_accum):
            inputs, targets = (t.to(runtime.device) for t in train_data.next_batch())
            with autocast():
                loss = model(inputs, targets=targets).loss / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        loss_value = mean_across_ranks(loss_sum).item()
        if not math.isfinite(loss_value):
            latest = latest_checkpoint(ckpt_root)
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {step + 1}; stopping without updating the weights. "
                f"The last good checkpoint is {latest or 'none (no checkpoint saved yet)'}; resume from it "
                "with --resume, e.g. with a lower --lr."
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moe_load = model.update_moe_biases()
        dt = time.perf_counter() - t0

        done = step + 1
        record = {"step": done, "loss": loss_value, "lr": lr, "tokens": done * tokens_per_step,
                  "grad_norm": grad_norm.item(), "tokens_per_s": tokens_per_step / dt,
                  "spike": spikes.update(done, loss_value)}
        if moe_load:
            record["moe_max_over_mean"] = max(m["max_over_mean"] for m in moe_load)
        if peak:
            record["mfu"] = flops_per_token * tokens_per_step / dt / peak
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record["val_loss"] = evaluate(model, val_data, cfg.eval_batches, runtime, autocast)
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
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            meta = {"data": train_data.state_dict(), "callbacks": {"spikes": spikes.state_dict()}}
            save_checkpoint(ckpt_root, done, model, optimizer, meta, runtime, cfg.keep_checkpoints)

    if bar is not None:
        bar.close()
    save_final_weights(model, model_cfg, out, runtime)
    if writer is not None:
        writer.close()
    if runtime.is_main and record:
        summary = f"step {record['step']}: loss {record['loss']:.4f}"
        if "val_loss" in record:
            summary += f", val_loss {record['val_loss']:.4f}"
        print(f"{summary}; {len(spikes.spikes)} loss spike(s); wrote {out}", flush=True)
    return {**record, "params": n_params, "spikes": len(spikes.spikes)}


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
    return SummaryWriter(str(out / "tensorboard"))
