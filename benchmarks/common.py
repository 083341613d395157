"""Shared benchmark machinery: options, machine/version banner, interleaved timing, ratios, tables, JSON.

Every script in ``benchmarks/`` measures *ratios against a baseline taken in the same run*: the cases are
timed round-robin (baseline, case 1, case 2, baseline, ...) after a warm-up, so machine noise hits all of
them alike, and each case's ratio is the median over rounds of its time divided by the baseline's time in
the same round. Peak memory is measured on CUDA only (``torch.cuda.max_memory_allocated`` during the timed
call, minus what was allocated when the call began); on CPU it is reported as n/a.

``--dtype bf16`` means ``torch.autocast(..., dtype=torch.bfloat16)`` over fp32 weights, as kha's training
loop does on GPUs (fp32 here allows TF32 matmuls on CUDA; kha train keeps full fp32); ``--compile`` wraps the
modules in ``torch.compile`` (default options, recompile limit raised so that no case falls back to eager).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kha import cpu_kernels
from kha.attention import AttentionConfig
from kha.config import ModelConfig
from kha.runfiles import PACKAGE_DIR, code_version
from kha.train.host_memory import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent

# key -> (label, knock, targets): the knock settings the benchmarks compare; "baseline" has no knock.
KNOCKS = {
    "baseline": ("baseline", "none", None),
    "linear-qkv": ("KHA-Linear qkv", "linear", "qkv"),
    "linear-v": ("KHA-Linear v", "linear", "v"),
    "mlp-v": ("KHA-MLP v", "mlp", "v"),
    "gate-v": ("gate v", "gate", "v"),
}


def small_lm_config(knock: str = "none", targets=None) -> ModelConfig:
    """The small dense LM of the CPU runs: 6 layers, d 512, GQA 32 query / 4 KV heads of 64, SwiGLU 1536,
    vocabulary 8192 (32.5M parameters, tied embeddings)."""
    attn = AttentionConfig(d_model=512, n_heads=32, n_kv_heads=4, head_dim=64, knock=knock, knock_targets=targets)
    return ModelConfig(attention=attn, n_layers=6, d_ff=1536, vocab_size=8192, max_seq_len=8192)


def describe(cfg: ModelConfig) -> str:
    a = cfg.attention
    m = cfg.moe
    ffn = f"MoE {m.n_experts} experts of {m.d_expert}, top-{m.top_k}" if m else f"SwiGLU {cfg.d_ff}"
    return (f"{cfg.n_layers} layers, d_model {a.d_model}, {a.n_heads} query / {a.n_kv_heads} KV heads of "
            f"{a.head_dim}, {ffn}, vocabulary {cfg.vocab_size:,}, "
            f"{'tied' if cfg.tie_embeddings else 'untied'} embeddings")


def n_params(module: nn.Module) -> int:
    """Parameters, tied weights counted once."""
    return sum(p.numel() for p in module.parameters())


def adamw(module: nn.Module) -> torch.optim.AdamW:
    """AdamW with the paper's hyper-parameters (one group; the LR value does not change the cost), fused as in
    ``kha train``."""
    return torch.optim.AdamW(module.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


# ---------------------------------------------------------------- options and environment


def parser(description: str, repeats: int = 10) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = autocast to bfloat16 over fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile the modules")
    p.add_argument("--repeats", type=int, default=None, help=f"timed rounds (default {repeats}; --quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per case first (default 3; --quick: 2)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats: a smoke test, not a measurement")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.set_defaults(default_repeats=repeats)
    return p


@dataclass
class Env:
    """Device, precision and the knobs every script shares, resolved from the options."""

    device: torch.device
    dtype: str
    compile: bool
    repeats: int
    warmup: int
    quick: bool
    freed_memory_kept: bool = False

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.dtype == "bf16" else nullcontext()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def maybe_compile(self, module):
        return compile_module(module) if self.compile else module


def static_compile_settings() -> None:
    """Compile settings for timing many cases in one process. The cases share code objects (one
    ``DecoderLM.forward`` for every knock setting and shape), so: dynamo's recompile limit is raised (at the
    default of 8 later cases would silently fall back to eager; hitting the raised limit is an error), and
    automatic dynamic shapes are off (a second shape of the same code would otherwise be recompiled into
    slower shape-generic kernels, and every case of that code would run those)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "accumulated_recompile_limit"):
        setattr(config, name, max(getattr(config, name), 256))
    config.fail_on_recompile_limit_hit = True
    config.automatic_dynamic_shapes = False


def compile_module(module):
    """``torch.compile`` under :func:`static_compile_settings`."""
    static_compile_settings()
    return torch.compile(module)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled so far in this process (0 when nothing was compiled)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def setup(args: argparse.Namespace) -> Env:
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for, but torch sees no CUDA device (torch "
                 f"{torch.__version__}); use --device cpu")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else args.default_repeats)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    if repeats < 1 or warmup < 0:
        sys.exit("--repeats must be >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 (kha train keeps full fp32)
    return Env(torch.device(args.device), args.dtype, args.compile, repeats, warmup, args.quick, keep_freed_memory())


# ---------------------------------------------------------------- machine and versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(env: Env, modules: tuple[str, ...] = ()) -> dict:
    """What produced the numbers: CPU, cores, threads, GPU, versions, commit, load."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(env.device) if env.cuda else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if env.cuda else None,
        "kha": code_version(PACKAGE_DIR, ROOT / "benchmarks"),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "allocator": "glibc, freed memory kept in the process (as kha train)" if env.freed_memory_kept else "default",
        "device": str(env.device),
        # what kha.cpu_kernels' products run on here ("amx", "avx512_bf16"), None where they do not load
        "cpu_micro_kernel": cpu_kernels.micro_kernel() if env.device.type == "cpu" else None,
        "dtype": "bf16 autocast" if env.dtype == "bf16" else "fp32",
        "compile": env.compile,
        "repeats": env.repeats,
        "warmup": env.warmup,
        "quick": env.quick,
    }
    for name in modules:
        info[name] = importlib.import_module(name).__version__
    return info


def print_banner(title: str, info: dict) -> None:
    print(f"# {title}\n")
    gpu = f"{info['gpu']} (CUDA {info['cuda']})" if info["gpu"] else "none"
    print(f"- machine: {info['cpu']}; {info['cores']} cores ({info['cores_usable']} usable), "
          f"torch threads {info['torch_threads']}; GPU: {gpu}")
    versions = ", ".join(f"{k} {info[k]}" for k in ("python", "torch", "transformers") if k in info)
    print(f"- versions: {versions}; kha {info['kha']}")
    print(f"- run: device {info['device']}, {info['dtype']}, compile {'on' if info['compile'] else 'off'}, "
          f"per case {info['warmup']} warm-up call(s) then {info['repeats']} timed round(s), cases interleaved; "
          f"1-min load average before starting {info['load_avg_1m']:.2f} (near 0 on a quiet machine); "
          f"allocator: {info.get('allocator', 'default')}")
    if info["device"] == "cpu":
        names = {"amx": "on the AMX tiles", "avx512_bf16": "on AVX512-BF16 dot products"}
        print(f"- kha's CPU kernels (bf16): {names.get(info.get('cpu_micro_kernel'), 'off (torch ops)')}")
    if info.get("quick"):
        print("- QUICK SMOKE RUN: tiny shapes, few repeats; these numbers mean nothing")
    print(flush=True)


# ---------------------------------------------------------------- timing


@dataclass
class Case:
    """One thing to time: ``run()`` is timed; ``setup()`` (untimed) runs before every call of ``run()``."""

    name: str
    run: Callable[[], object]
    setup: Callable[[], object] | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Timing:
    times: list[float]
    peak_bytes: int | None = None


def training_case(name: str, forward: Callable[[], torch.Tensor], loss: Callable[[torch.Tensor], torch.Tensor],
                  opt: torch.optim.Optimizer, env: Env, context=nullcontext) -> Case:
    """A training step: ``forward()`` under autocast, ``loss(output).backward()``, ``opt.step()``, grads freed;
    all inside ``context()`` (e.g. an SDPA backend choice)."""

    def step():
        with context():
            with env.autocast():
                out = forward()
            loss(out).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return Case(name, step)


def auto_precision(cfg: ModelConfig, batch: int, seq: int, device: torch.device) -> tuple[str, str, bool]:
    """What ``kha train --precision auto`` picks for this model and batch on ``device``, why, and whether its
    attention then trains on kha's attention kernel (``kha.cpu_kernels``): ``kha.train.precision.plan_precision``."""
    from kha.train.precision import plan_precision

    precision, why, covered = plan_precision("auto", cfg, batch, seq, device)
    return precision, why, covered and precision == "bf16"


def kha_train_step(cfg: ModelConfig, batch: int, seq: int, precision: str, compile: bool, device: torch.device, *,
                   ids: torch.Tensor | None = None, doc_mask: bool = False, doc_positions: str = "restart",
                   prepare: Callable[[nn.Module], None] | None = None, compile_scope: str = "model"):
    """One optimizer step exactly as ``kha train`` runs it, on a fixed random batch (or ``ids``, ``(batch, seq +
    1)``): ``DecoderLM`` with the loss inside, the run's autocast, backward, gradient clipping,
    ``build_optimizer``'s AdamW; ``compile`` as ``kha train --compile`` (``kha.train.distributed.parallelize``);
    ``doc_mask``, ``doc_positions`` as in ``TrainConfig``, with token 0 as ``<|endoftext|>``; ``prepare(model)``
    before compiling, if given; ``compile_scope`` as ``TrainConfig.compile_scope``."""
    from kha.model import DecoderLM
    from kha.train.config import TrainConfig
    from kha.train.distributed import Runtime, parallelize
    from kha.train.loop import document_inputs
    from kha.train.optim import build_optimizer, clip_gradients
    from kha.train.precision import autocast_context

    if precision == "bf16" and device.type == "cpu":
        cpu_kernels.prepare()  # as kha train does before compiling: kha's CPU kernels, where they run
    torch.manual_seed(0)
    model = DecoderLM(cfg).to(device)
    if prepare is not None:
        prepare(model)
    model = parallelize(model, Runtime(0, 1, device), compile=compile, scope=compile_scope)
    optimizer = build_optimizer(model, TrainConfig())
    if ids is None:
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    documents = document_inputs(TrainConfig(doc_mask=doc_mask, doc_positions=doc_positions), eos_id=0)

    def step():
        with autocast_context(precision, device):
            loss = model(ids[:, :-1], targets=ids[:, 1:], **documents(ids[:, :-1])).loss
        loss.backward()
        clip_gradients(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def lm_loss(targets: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Next-token cross-entropy of ``(B, T, vocab)`` logits, in fp32, against ``targets`` ``(B, T)``."""
    return lambda logits: torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median: the order statistics x_(j) and x_(n+1-j) of the
    largest j whose coverage P(j <= B <= n - j), B ~ Binomial(n, 1/2), is at least ``level`` (None: too few
    values for that level, fewer than 6 at 0.95)."""
    n, xs = len(values), sorted(values)
    below, j = 0.0, 0  # below: P(B <= j - 1)
    while j < n // 2 and 1 - 2 * (below + math.comb(n, j) / 2**n) >= level:
        below += math.comb(n, j) / 2**n
        j += 1
    return None if j == 0 else (xs[j - 1], xs[n - j])


def _call(case: Case, env: Env) -> tuple[float, int | None]:
    if case.setup is not None:
        case.setup()
    env.sync()
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
        before = torch.cuda.memory_allocated(env.device)
    t0 = time.perf_counter()
    case.run()
    env.sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(env.device) - before if env.cuda else None
    return elapsed, peak


def measure(cases: list[Case], env: Env, label: str = "") -> dict[str, Timing]:
    """Warm every case up, then time them round-robin ``env.repeats`` times."""
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names must be unique, got {names}")
    t0 = time.perf_counter()
    for case in cases:
        for _ in range(env.warmup):
            _call(case, env)
    graphs = compiled_graphs()
    timings = {c.name: Timing([]) for c in cases}
    for _ in range(env.repeats):
        for case in cases:
            elapsed, peak = _call(case, env)
            timing = timings[case.name]
            timing.times.append(elapsed)
            if peak is not None:
                timing.peak_bytes = max(timing.peak_bytes or 0, peak)
    recompiled = compiled_graphs() - graphs
    if recompiled:
        raise RuntimeError(f"{label or 'cases'}: {recompiled} graph(s) compiled during the timed rounds; the "
                           "warm-up must compile everything (raise --warmup)")
    print(f"[{label or 'cases'}: {len(cases)} cases timed in {time.perf_counter() - t0:.1f} s, no recompilation]",
          file=sys.stderr, flush=True)
    return timings


def summarize(timings: dict[str, Timing], baseline: str, scale: float = 1.0) -> dict[str, dict]:
    """Per case: median, quartiles, min, max of ``time * scale`` (seconds), peak MiB and the paired ratio
    to ``baseline`` (median, quartiles and the median's 95 % interval over rounds of case time / baseline time
    in the same round)."""
    base = timings[baseline].times
    out = {}
    for name, t in timings.items():
        values = [x * scale for x in t.times]
        q1, med, q3 = _quartiles(values)
        ratios = [a / b for a, b in zip(t.times, base, strict=True)]
        r1, ratio, r3 = _quartiles(ratios)
        out[name] = {"median_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(values), "max_s": max(values),
                     "n": len(values), "times_s": values, "ratio": ratio, "ratio_q1": r1, "ratio_q3": r3,
                     "ratio_ci95": median_interval(ratios),
                     "peak_mib": None if t.peak_bytes is None else t.peak_bytes / 2**20}
    return out


# Kernel families by name: fused attention, cuBLAS / CUTLASS GEMMs (and CPU matmul ops), Inductor's generated
# kernels (pointwise and reductions), everything else. First match wins.
KERNEL_FAMILIES = (  # attention first: flash and memory-efficient attention kernels are CUTLASS templates
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.IGNORECASE)),
    ("gemm", re.compile(r"gemm|cutlass|nvjet|cublas|xmma|wgmma"
                        r"|aten::(?:mm|addmm|bmm|baddbmm|linear|matmul|_grouped_mm)\b", re.IGNORECASE)),
    ("generated", re.compile(r"^triton_|cpp_fused|^graph_\d+_")),
)
FAMILY_NAMES = (*(family for family, _ in KERNEL_FAMILIES), "other")


def kernel_family(name: str) -> str:
    return next((family for family, pattern in KERNEL_FAMILIES if pattern.search(name)), "other")


def covered_time(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (overlaps counted once)."""
    covered, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return covered


def _outermost_operator(event) -> bool:
    """An ``aten::`` operator called from no other (on CPU: counted once, not again for the operators inside)."""
    if not event.name.startswith("aten::"):
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def device_kernels(events) -> list:
    """The CUDA kernels, copies and fills among profiler ``events``; not the annotations (``## Call
    CompiledFxGraph ##``, ``Optimizer.step#AdamW.step``) that the profiler also reports on the device's
    timeline, which span the gaps between kernels."""
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def profile_case(case: Case, env: Env, steps: int, timed_ms: float | None = None) -> dict:
    """Profile ``steps`` calls of an already warmed-up ``case`` with ``torch.profiler``. Per step: wall ms under
    the profiler, the kernels launched (on CUDA; on CPU the operators run), their busy ms (union of their time
    intervals: what the device spent computing), idle ms (``timed_ms``, the step's time measured without the
    profiler, else the profiled wall time, minus busy: launch and host overhead the device waited on) and busy
    ms per kernel family (:data:`KERNEL_FAMILIES`). Compared across cases, it says where a knock's extra step
    time goes: more GEMM time is FLOPs, more generated-kernel time is memory traffic, more idle time is launch
    overhead. On CPU the "kernels" are the outermost ``aten::`` operators; compiled C++ kernels are not
    recorded there, so their time counts as idle."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    env.sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            case.run()
        env.sync()
        wall = time.perf_counter() - t0
    events = prof.events()
    kernels = device_kernels(events) if env.cuda else [e for e in events if _outermost_operator(e)]
    busy = covered_time((e.time_range.start, e.time_range.end) for e in kernels)
    families: dict[str, float] = {}
    for e in kernels:
        family = kernel_family(e.name)
        families[family] = families.get(family, 0.0) + (e.time_range.end - e.time_range.start)
    per_step = 1e-3 / steps  # µs summed over the steps -> ms per step
    wall_ms = wall * 1e3 / steps
    return {"steps": steps, "wall_ms": wall_ms, "kernels": len(kernels) / steps, "busy_ms": busy * per_step,
            "idle_ms": max((wall_ms if timed_ms is None else timed_ms) - busy * per_step, 0.0),
            "family_ms": {f: families.get(f, 0.0) * per_step for f in FAMILY_NAMES}}


def add_profile_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile-steps", type=int, default=0, metavar="N",
                   help="after timing, profile N steps of each case (torch.profiler): kernels, busy and idle time "
                        "per step, and where each knock's extra time goes (default 0: no profile)")


def profile_after_timing(args: argparse.Namespace, env: Env, info: dict, cases: list[Case], stats: dict,
                         results: list[dict], labels: dict[str, str], baseline: str = "baseline") -> None:
    """With ``--profile-steps N``: profile each timed case (:func:`profile_case`), print :func:`profile_table` and
    add each profile to its result (``results[i]["case"]`` names the case), then rewrite the JSON. Run after the
    JSON of the timings is written, so that a time limit hit while profiling keeps the timings."""
    if args.profile_steps <= 0:
        return
    profiles = {case.name: profile_case(case, env, args.profile_steps, 1e3 * stats[case.name]["median_s"])
                for case in cases}
    print(f"\nProfile of {args.profile_steps} step(s) per case, ms per step (in brackets: minus the baseline); "
          "idle = the timed step (without the profiler) minus busy\n")
    print(profile_table(profiles, labels, baseline))
    for result in results:
        result["profile"] = profiles[result["case"]]
    write_json(args, info, results)


def profile_table(profiles: dict[str, dict], labels: dict[str, str], baseline: str) -> str:
    """Markdown: each case's profile (:func:`profile_case`) and, from the second case on, its difference to
    ``baseline`` in ms per step."""
    base = profiles[baseline]
    rows = []
    for name, prof in profiles.items():
        diff = name != baseline
        cell = (lambda v, b: f"{v:.2f} ({v - b:+.2f})") if diff else (lambda v, b: f"{v:.2f}")
        rows.append([labels.get(name, name), cell(prof["wall_ms"], base["wall_ms"]),
                     f"{prof['kernels']:.0f}" + (f" ({prof['kernels'] - base['kernels']:+.0f})" if diff else ""),
                     cell(prof["busy_ms"], base["busy_ms"]), cell(prof["idle_ms"], base["idle_ms"]),
                     *(cell(prof["family_ms"][f], base["family_ms"][f]) for f in FAMILY_NAMES)])
    return markdown_table(["case", "wall ms", "kernels", "busy ms", "idle ms", *(f"{f} ms" for f in FAMILY_NAMES)],
                          rows)


# ---------------------------------------------------------------- formatting and output


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.3g}"


def fmt_time(stats: dict) -> str:
    """``median [q1, q3]`` in ms."""
    return f"{_ms(stats['median_s'])} [{_ms(stats['q1_s'])}, {_ms(stats['q3_s'])}]"


def fmt_ratio(stats: dict) -> str:
    return f"{stats['ratio']:.3f} [{stats['ratio_q1']:.3f}, {stats['ratio_q3']:.3f}]"


def fmt_ratio_ci(stats: dict) -> str:
    """The 95 % confidence interval of the median ratio (order statistics), or why there is none."""
    ci = stats.get("ratio_ci95")
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a (< 6 rounds)"


def fmt_mib(stats: dict) -> str:
    return "n/a (CPU)" if stats["peak_mib"] is None else f"{stats['peak_mib']:.0f}"


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f} %"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


TIME_NOTE = ("Times: median [first quartile, third quartile] over the timed rounds. Ratio: median [quartiles] "
             "over rounds of case time / baseline time in the same round; its 95 % CI, where shown: the median's "
             "distribution-free interval (order statistics of those ratios). Peak MiB: CUDA memory allocated "
             "during the timed call above what was allocated when it began (n/a on CPU).")


def finish(args: argparse.Namespace, info: dict, results: list[dict]) -> None:
    """Print the closing note and write ``--json`` if asked."""
    print(f"\n{TIME_NOTE}")
    write_json(args, info, results)


def write_json(args: argparse.Namespace, info: dict, results: list[dict]) -> None:
    """Write ``--json`` (whole, replacing what was there) if asked."""
    if args.json is not None:
        payload = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
