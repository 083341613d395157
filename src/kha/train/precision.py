"""Training precision: ``fp32``, or ``bf16`` autocast over fp32 master weights, and the ``auto`` rule.

``bf16`` runs matmuls and attention in bfloat16 under ``torch.autocast`` while parameters, gradients and
AdamW's state stay fp32; the loss, norms, RoPE and MoE routing are computed in fp32 by the model itself.

``auto`` picks what ``benchmarks/precision.py`` measured to be faster (results in docs/benchmarks.md):
- CUDA with bf16 support: bf16.
- A CPU with native bf16 matmul (``amx_bf16`` or ``avx512_bf16`` on x86, ``bf16`` on Arm): bf16 where
  ``kha.cpu_kernels``'s kernel covers the model's attention (bf16 then measured faster at every width,
  the tiny presets included), else once the model is wide enough for matmuls to dominate
  (``d_model >= AUTO_BF16_MIN_D_MODEL``); below that width, with torch's CPU attention, bf16 was slower.
- Anything else: fp32 (bf16 without hardware support is emulated and slow).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16")
# Measured on a 2-core Xeon with AMX (benchmarks/precision.py) with torch's CPU attention: at d_model 128 bf16
# is slower than fp32, at 256 and above it is faster, increasingly so with width.
AUTO_BF16_MIN_D_MODEL = 256


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (Linux: read from the CPU flags; elsewhere: no)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid are {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device, d_model: int,
                      amx_attention: bool = False) -> tuple[str, str]:
    """``(fp32 | bf16, reason)`` for a run asking for ``precision`` on ``device`` with this model width;
    ``amx_attention``: whether ``kha.cpu_kernels`` covers the run's attention (``cpu_kernels.covers``)."""
    check_precision(precision)
    if precision != "auto":
        return precision, "asked for"
    if not native_bf16(device):
        return "fp32", f"auto: {device.type} has no native bf16 matmul"
    if device.type == "cuda":
        return "bf16", "auto: CUDA with bf16"
    if amx_attention:
        return "bf16", "auto: CPU with native bf16 and kha's attention kernel for this model"
    if d_model < AUTO_BF16_MIN_D_MODEL:
        return "fp32", f"auto: d_model {d_model} < {AUTO_BF16_MIN_D_MODEL}, too small for bf16 to pay on CPU"
    return "bf16", f"auto: CPU with native bf16 and d_model {d_model} >= {AUTO_BF16_MIN_D_MODEL}"


def plan_precision(precision: str, model_cfg, batch: int, seq: int, device: torch.device) -> tuple[str, str, bool]:
    """``(fp32 | bf16, reason, amx_attention)`` for a run of ``model_cfg`` (a ``kha.config.ModelConfig``) at
    ``batch`` x ``seq`` asking for ``precision``: :func:`resolve_precision` told whether ``kha.cpu_kernels``'s
    attention kernel covers the model there (asked for auto or bf16 on a CPU), and that answer."""
    from kha import cpu_kernels

    covered = (device.type == "cpu" and precision in ("auto", "bf16")
               and cpu_kernels.covers(model_cfg.attention, batch, seq))
    resolved, why = resolve_precision(precision, device, model_cfg.d_model, amx_attention=covered)
    return resolved, why, covered


def autocast_context(precision: str, device: torch.device):
    """A fresh context manager for one forward pass in ``precision`` (already resolved)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
