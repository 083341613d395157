"""bf16 training kernels for x86 CPUs with AVX512-BF16 (``csrc/cpu_kernels.cpp``), built on first use. Their
matrix products run on the AMX tiles where the CPU has them (Intel Sapphire Rapids and later) and the OS grants
them, else as AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake; :func:`micro_kernel` says which).

On such CPUs a bf16 training step spent most of its non-matmul time in torch's CPU flash-attention backward
(about six times its forward) and in chains of small elementwise kernels with a bf16/fp32 copy between
each (docs/benchmarks.md, sections e and i). This module replaces them where they run:

- :func:`attention`: causal, document-masked or full GQA/MHA/MQA attention, forward and backward. The ``"sdpa"``
  kernel uses it when :func:`attention_applies` says so: gradients wanted, bf16 inputs or CPU bf16 autocast, no
  mask other than causal or a document mask, as many queries as keys, the length a multiple of 64, one head_dim
  for Q, K and V that is a multiple of 16, and at least as many (batch, KV head) pairs as threads (its unit of
  parallel work);
- :func:`norm_rope` (QK-norm then RoPE), :func:`silu_mul` (SwiGLU's gate) and :func:`cross_entropy` (the
  LM loss), each one pass forward and one backward; the models use them where :func:`fuses` says so
  (training on CPU with the tensor in bf16, as linear layers leave it under CPU bf16 autocast), and
  :func:`rms_norm` for the fp32 residual stream under CPU bf16 autocast (:func:`fuses_rms_norm`);
- :func:`knock` (every knock type's fused form, :mod:`kha.knock`, where :func:`knock_applies`) and :func:`fold`
  (KHA-Linear folded into its projection, where :func:`fold_applies`): one pass each way where torch's ops run
  several small products and elementwise kernels, each costing more than its FLOPs at a knock's shapes.

Everything else (fp32, inference, MLA, GLA and talking-heads attention, GPUs, CPUs without AVX512-BF16) runs
torch's ops as before, as does every case with ``KHA_CPU_KERNELS=0``; ``KHA_CPU_KERNELS=avx512`` keeps the
kernels off the AMX tiles. The extension is compiled on first use (about 10 s) with OpenMP (its parallel loops
run on torch's threads), in a private folder renamed into place when complete, then cached under
``TORCH_EXTENSIONS_DIR`` in a folder named by a hash of the source, flags, torch and Python versions; a failed
build warns once and falls back to torch's ops; an OS that denies the process the AMX tiles warns once and the
products run on AVX512-BF16. Under ``torch.compile`` the build is not started: call :func:`prepare` first
(``kha train`` does, through :func:`covers`, when it decides the run's precision).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
BLOCK = 64  # the kernel's block of queries and of keys
ENV_SWITCH = "KHA_CPU_KERNELS"
SWITCH_VALUES = ("1", "0", "avx512")
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma",
          "-mamx-tile", "-mamx-bf16"]

LIBRARY = "kha_cpu_kernels"

_state: bool | None = None  # None: not tried yet; then whether the extension is loaded
_library: Path | None = None  # the extension's file, once loaded into this process
_micro_kernel = "avx512_bf16"  # what the loaded kernels' products run on (micro_kernel)
_fakes_registered = False


def cpu_supports() -> bool:
    """Whether this CPU has what the kernels run on: AVX512-BF16 (their products then run on the AMX tiles where
    the CPU has them and the OS grants them, see :func:`micro_kernel`)."""
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return bool(bf16())


def _switch() -> str:
    """``KHA_CPU_KERNELS``: ``1`` (default) the kernels where they apply, ``0`` never, ``avx512`` their products on
    AVX512-BF16 even where the CPU has AMX (to compare the two micro-kernels on one machine)."""
    value = os.environ.get(ENV_SWITCH, "1")
    if value not in SWITCH_VALUES:
        warnings.warn(f"kha: {ENV_SWITCH}={value!r} is not one of {', '.join(SWITCH_VALUES)}; using 1 (the kernels "
                      "where they apply)", stacklevel=3)
        return "1"
    return value


def micro_kernel() -> str | None:
    """What the kernels' matrix products run on: ``"amx"`` (the AMX tiles) or ``"avx512_bf16"`` (AVX512-BF16 dot
    products: CPUs without AMX, such as AMD Zen 4, or where the OS denies the tiles, or ``KHA_CPU_KERNELS=avx512``);
    None when the kernels are not loaded (:func:`prepare`)."""
    return _micro_kernel if prepare() else None


def _choose_micro_kernel(switch: str) -> str:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    if not amx() or switch == "avx512":
        return "avx512_bf16"
    if not _amx_permitted():
        warnings.warn("kha: the OS did not grant this process the AMX tiles (torch.cpu._init_amx() said no or is "
                      "missing); kha's CPU kernels run their products on AVX512-BF16", stacklevel=3)
        return "avx512_bf16"
    return "amx"


def kernels_label(kernels: dict) -> str:
    """What a run trains on, from what ``kha train`` records in ``train_config.json`` (``amx_attention``: kha's
    attention kernel, a name kept from when it ran on AMX only; ``cpu_kernels``; ``cpu_micro_kernel``, absent from
    runs recorded before the AVX512-BF16 path, which ran on AMX), e.g. "kha's AMX attention and kha's elementwise
    kernels"; "torch's ops" when neither."""
    if not (kernels.get("amx_attention") or kernels.get("cpu_kernels")):
        return "torch's ops"
    isa = "AVX512-BF16" if kernels.get("cpu_micro_kernel") == "avx512_bf16" else "AMX"
    if kernels.get("amx_attention"):
        return f"kha's {isa} attention and {'kha' if kernels.get('cpu_kernels') else 'torch'}'s elementwise kernels"
    return f"torch's SDPA and kha's elementwise kernels{' on AVX512-BF16' if isa != 'AMX' else ''}"


def recorded_micro_kernel(kernels: dict) -> str | None:
    """``cpu_micro_kernel`` as a run's ``train_config.json`` records it: None for a run that did not use the kernels;
    ``"amx"`` for one recorded before the key existed (the kernels ran on AMX only then) or with a value that is
    neither ``"amx"`` nor ``"avx512_bf16"``."""
    if not (kernels.get("amx_attention") or kernels.get("cpu_kernels")):
        return None
    recorded = kernels.get("cpu_micro_kernel")
    return recorded if recorded in ("amx", "avx512_bf16") else "amx"


def prepare() -> bool:
    """Build (or load the cached build of) the extension if this machine can run it; True when it is ready."""
    global _state, _micro_kernel
    if _state is None:
        _state = False
        switch = _switch()
        if switch != "0" and cpu_supports():
            try:
                _load_library()
                _micro_kernel = _choose_micro_kernel(switch)
                torch.ops.kha_cpu.set_tiles(_micro_kernel == "amx")
                if not _fakes_registered:
                    _register_fakes()
                _state = True
            except Exception as exc:  # a missing compiler or headers: torch's ops still work
                warnings.warn(f"kha: CPU kernels unavailable ({type(exc).__name__}: {exc}); using torch's ops",
                              stacklevel=2)
    return _state


def _amx_permitted() -> bool:
    """Whether this process may use the AMX tiles: Linux grants them per process on request, which
    ``torch.cpu._init_amx`` makes, answering whether it was granted (without it the first tile instruction
    would kill the process with SIGILL)."""
    init_amx = getattr(torch.cpu, "_init_amx", None)
    return init_amx is not None and bool(init_amx())


def _build_folder() -> Path:
    """Where the build for this source, these flags, this torch and this Python lives (under
    ``TORCH_EXTENSIONS_DIR``, else torch's default extensions folder)."""
    from torch.utils.cpp_extension import get_default_build_root

    key = hashlib.sha256("\0".join([SOURCE.read_text(), *CFLAGS, torch.__version__, sys.version]).encode())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"kha_cpu_kernels_{key.hexdigest()[:16]}"


def _load_library() -> None:
    """Load the extension into this process, building it first if no complete build exists. A build runs in a
    private temporary folder renamed into place once complete, so that a build killed half way (which leaves
    torch's ``lock`` file in its folder) blocks no later run; such folders an hour old are removed."""
    global _library
    if _library is not None:
        return
    folder = _build_folder()
    library = folder / f"{LIBRARY}.so"
    if library.is_file():
        torch.ops.load_library(str(library))
        _library = library
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f"{LIBRARY}_*.building-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    private = Path(tempfile.mkdtemp(prefix=f"{folder.name}.building-", dir=folder.parent))
    from torch.utils.cpp_extension import load

    start = time.perf_counter()
    try:
        built = load(name=LIBRARY, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                     build_directory=str(private), is_python_module=False)  # loads it too
    except Exception:
        shutil.rmtree(private, ignore_errors=True)
        raise
    _library = Path(built)
    if time.perf_counter() - start > 2:
        print(f"kha: built the CPU kernels in {time.perf_counter() - start:.0f} s (cached for later runs)",
              file=sys.stderr, flush=True)
    try:
        private.rename(folder)
    except OSError:  # another process finished the same build first
        shutil.rmtree(private, ignore_errors=True)


def _loaded() -> bool:
    """Whether the extension is loaded; under ``torch.compile`` whether it was before tracing (``prepare`` can
    not be traced)."""
    return _state if torch.compiler.is_compiling() else prepare()


def _training_on_cpu(*tensors: torch.Tensor) -> bool:
    """CPU tensors in a step that wants gradients of at least one of them."""
    return (all(t.device.type == "cpu" for t in tensors) and torch.is_grad_enabled()
            and any(t.requires_grad for t in tensors))


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


@torch._dynamo.assume_constant_result
def _threads() -> int:
    """torch's thread count, read as a constant when compiling (dynamo cannot trace the call)."""
    return torch.get_num_threads()


def supports(batch: int, heads: int, kv_heads: int, length: int, head_dim: int) -> bool:
    """Whether the kernel covers causal attention of this shape (queries = keys = ``length``) here, with enough
    (batch, KV head) pairs for the threads."""
    return (length > 0 and length % BLOCK == 0 and kv_heads > 0
            and heads % kv_heads == 0 and batch * kv_heads >= _threads()
            and head_dim > 0 and head_dim % 16 == 0)


def covers(attention, batch: int, seq_len: int) -> bool:
    """Whether a model with this ``AttentionConfig`` trains its attention on the kernel at ``batch x seq_len``
    in bf16 on this machine (MHA/GQA/MQA and GTA, whose Q, K and V share a head_dim; MLA's and GLA's keys are
    wider than their values, talking heads mixes the scores); builds the extension if needed."""
    return (attention.variant in ("gqa", "gta") and cpu_supports()
            and supports(batch, attention.n_heads, attention.n_kv_heads, seq_len, attention.head_dim) and prepare())


def attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`attention` can replace SDPA for these inputs (``q``: ``(B, H, T, D)``)."""
    if mask is not None or not _training_on_cpu(q, k, v):
        return False
    if not _autocast_bf16() and not q.dtype == k.dtype == v.dtype == torch.bfloat16:
        return False
    if q.dim() != 4 or k.dim() != 4:
        return False
    batch, heads, length, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim or k.shape[2] != length:
        return False  # e.g. MLA (V narrower than Q, K) or decoding with a cache (fewer queries than keys)
    return supports(batch, heads, k.shape[1], length, head_dim) and _loaded()


@torch.library.custom_op("kha::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
               starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``(B, L, H, D)`` (token-major, as the output projection reads it) and log-sum-exp rows ``(B, H,
    L)``; an op of its own so that autograd saves both for the backward. ``starts``: see :func:`attention`."""
    return torch.ops.kha_cpu.attention_forward(q, k, v, q.shape[-1] ** -0.5, is_causal, starts)


def _heads(token_major: torch.Tensor) -> torch.Tensor:
    """The ``(B, H, L, D)`` view of a ``(B, L, H, D)`` tensor."""
    return token_major.permute(0, 2, 1, 3)


def _token_major(x: torch.Tensor) -> torch.Tensor:
    """An empty ``(B, L, H, D)`` tensor for ``x`` of shape ``(B, H, L, D)``."""
    batch, heads, length, head_dim = x.shape
    return x.new_empty(batch, length, heads, head_dim)


def _attention_shapes(q, k, v, *_):
    """What the op above and the C++ forward (which also takes the scale) return."""
    return _token_major(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward_shapes(grad_out, q, k, v, out, lse, scale, is_causal, starts=None):
    return _token_major(q), _token_major(k), _token_major(v)


def _setup_context(ctx, inputs, output):
    q, k, v, is_causal, starts = inputs
    ctx.save_for_backward(q, k, v, *output, starts)
    ctx.is_causal = is_causal


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, starts = ctx.saved_tensors
    scale = q.shape[-1] ** -0.5
    grads = torch.ops.kha_cpu.attention_backward(_heads(grad_out), q, k, v, _heads(out), lse, scale, ctx.is_causal,
                                                 starts)
    return (*(_heads(g) for g in grads), None, None)


_attention.register_fake(_attention_shapes)
_attention.register_autograd(_backward, setup_context=_setup_context)


def _like_first(x, *_):
    """A new contiguous tensor like the first input: the output of every elementwise kernel here."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _like_inputs(grad_out, first, second, *_):
    """Gradients of the two tensor inputs (x and weight, or a and b) of an elementwise kernel's backward."""
    return _like_first(first), _like_first(second)


def _loss_and_lse(logits, *_):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape[:1], dtype=torch.float32)


def _logits_grad(grad, logits, *_):
    return _like_first(logits)


def _knock_grads(grad_out, y, *matrices):
    """``knock_backward``'s outputs: ``dy`` and the given matrices' gradients stacked, ``(m, D, D)`` fp32."""
    present = [w for w in matrices if w is not None]
    return _like_first(y), y.new_empty((len(present), y.shape[-1], y.shape[-1]), dtype=torch.float32)


def _register_fakes() -> None:
    """Output shapes of the C++ ops, for ``torch.compile``'s tracing, and the knock's autograd (once the library is
    loaded)."""
    global _fakes_registered
    _fakes_registered = True
    fakes = {"attention_forward": _attention_shapes, "attention_backward": _backward_shapes,
             "cross_entropy_forward": _loss_and_lse, "cross_entropy_backward": _logits_grad}
    fakes.update({"knock_forward": _like_first, "knock_backward": _knock_grads,
                  "fold_forward": lambda w, t: w.new_empty(w.shape, dtype=torch.bfloat16),
                  "fold_backward": lambda grad, w, t: (torch.empty_like(w), torch.empty_like(t, dtype=w.dtype))})
    for kernel in ("norm_rope", "rms_norm", "silu_mul"):
        fakes.update({f"{kernel}_forward": _like_first, f"{kernel}_backward": _like_inputs})
    for name, fake in fakes.items():
        torch.library.register_fake(f"kha_cpu::{name}", fake)
    torch.library.register_autograd("kha_cpu::knock_forward", _knock_backward, setup_context=_knock_setup)
    torch.library.register_autograd("kha_cpu::fold_forward", _fold_backward, setup_context=_fold_setup)


def fuses(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether the fused kernels (:func:`norm_rope`, :func:`silu_mul`, :func:`cross_entropy`) replace torch's
    ops for ``x``: training on CPU with ``x`` in bf16 (as linear layers leave it under CPU bf16 autocast) and
    ``weight`` (a norm's, if any) in fp32, the extension loaded."""
    if x.dtype != torch.bfloat16 or not _training_on_cpu(x):
        return False
    if weight is not None and weight.dtype != torch.float32:
        return False  # e.g. a model cast to bf16 as a whole
    return _loaded()


@torch.library.custom_op("kha::norm_rope", mutates_args=())
def norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (fp32, rounded to bf16, times ``weight``) then RoPE by ``cos``, ``sin``
    (``(1 or B, T, D/2)``, from :meth:`kha.attention.RotaryEmbedding.cos_sin`), in one pass; bf16 out. The same
    math as ``RMSNorm`` then ``RotaryEmbedding``, up to rounding (tests/test_cpu_kernels.py)."""
    return torch.ops.kha_cpu.norm_rope_forward(x.contiguous(), weight, cos.contiguous(), sin.contiguous(), eps)


def _norm_rope_setup(ctx, inputs, output):
    x, weight, cos, sin, eps = inputs
    ctx.save_for_backward(x, weight, cos, sin)
    ctx.eps = eps


def _norm_rope_backward(ctx, grad_out):
    x, weight, cos, sin = ctx.saved_tensors
    dx, dw = torch.ops.kha_cpu.norm_rope_backward(grad_out, x.contiguous(), weight, cos.contiguous(),
                                                  sin.contiguous(), ctx.eps)
    return dx, dw, None, None, None


norm_rope.register_fake(_like_first)
norm_rope.register_autograd(_norm_rope_backward, setup_context=_norm_rope_setup)


def fuses_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` replaces ``RMSNorm``'s ops for ``x``: training on CPU under bf16 autocast with
    ``x`` (the residual stream) and ``weight`` in fp32, the extension loaded; fp32 training keeps torch's ops."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not _training_on_cpu(x):
        return False
    return _autocast_bf16() and _loaded()


@torch.library.custom_op("kha::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm`` of fp32 ``x`` over its last dimension, one pass each way (fp32 in and out)."""
    return torch.ops.kha_cpu.rms_norm_forward(x.contiguous(), weight, eps)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    return (*torch.ops.kha_cpu.rms_norm_backward(grad_out, x.contiguous(), weight, ctx.eps), None)


rms_norm.register_fake(_like_first)
rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


@torch.library.custom_op("kha::silu_mul", mutates_args=())
def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` (SwiGLU's gate) in one pass, fp32 inside, bf16 in and out."""
    return torch.ops.kha_cpu.silu_mul_forward(a.contiguous(), b.contiguous())


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx, grad_out):
    a, b = ctx.saved_tensors
    return torch.ops.kha_cpu.silu_mul_backward(grad_out, a.contiguous(), b.contiguous())


silu_mul.register_fake(_like_first)
silu_mul.register_autograd(_silu_mul_backward, setup_context=_silu_mul_setup)


@torch.library.custom_op("kha::cross_entropy", mutates_args=())
def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss and each row's log-sum-exp (saved for the backward)."""
    return torch.ops.kha_cpu.cross_entropy_forward(logits.contiguous(), targets, ignore_index)


def _cross_entropy_setup(ctx, inputs, output):
    logits, targets, ignore_index = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index = ignore_index


def _cross_entropy_backward(ctx, grad, _grad_lse):
    logits, targets, lse = ctx.saved_tensors
    return (torch.ops.kha_cpu.cross_entropy_backward(grad, logits.contiguous(), targets, lse, ctx.ignore_index),
            None, None)


_cross_entropy.register_fake(_loss_and_lse)
_cross_entropy.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)`` (mean) for bf16 ``logits``
    ``(N, V)``, in one pass each way: fp32 inside, the gradient in bf16."""
    return _cross_entropy(logits, targets, ignore_index)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
              starts: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention (GQA when K/V have fewer heads) on kha's kernel; inputs are cast to bf16
    as CPU autocast would cast them for SDPA. Call only where :func:`attention_applies`.

    ``starts`` (``(B, L)``, non-decreasing along each row, ``starts[b, i] <= i``; with ``is_causal``): query ``i``
    sees keys ``starts[b, i] .. i`` only, the document mask of :class:`kha.attention.DocumentMask`; key blocks
    before a query block's first start are skipped."""
    q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
    if starts is not None:
        starts = starts.to(torch.int32).contiguous()
    return _heads(_attention(q, k, v, is_causal, starts)[0])


def knock_applies(y: torch.Tensor, *matrices: torch.Tensor) -> bool:
    """Whether :func:`knock` runs a knock with these fp32 matrices on ``y`` (``(..., head_dim)``): training on CPU
    with ``y`` in bf16 (as a head projection leaves it under CPU bf16 autocast), head_dim a multiple of 32, the
    extension loaded."""
    if y.dtype != torch.bfloat16 or y.shape[-1] % 32 or not _training_on_cpu(y, *matrices):
        return False
    return all(w.dtype == torch.float32 for w in matrices) and _loaded()


def knock(y: torch.Tensor, w_up: torch.Tensor | None, w_gate: torch.Tensor | None,
          w_down: torch.Tensor | None) -> torch.Tensor:
    """A knock of :mod:`kha.knock` in its fused form on bf16 rows ``y`` (``(..., head_dim)``), one pass each way:
    ``u = y + y (W_up - I)``, ``h = u + u tanh(y W_gate / 2)``, ``out = h + h (W_down - I)``, each matrix given
    or not (KHA-Linear: ``w_up = T``; the gate knock: ``w_gate``; KHA-MLP: all three); bf16 out. The same
    function as the torch form, up to rounding (tests/test_cpu_kernels.py). The C++ op carries its autograd
    itself (registered with the fakes), so a compiled graph calls it with no Python in between."""
    return torch.ops.kha_cpu.knock_forward(y.contiguous(), w_up, w_gate, w_down)


def _knock_setup(ctx, inputs, output):
    ctx.present = [w is not None for w in inputs[1:]]
    ctx.save_for_backward(*inputs)


def _knock_backward(ctx, grad_out):
    y, *matrices = ctx.saved_tensors
    dy, grads = torch.ops.kha_cpu.knock_backward(grad_out, y, *matrices)
    per_matrix = iter(grads.unbind(0))
    return dy, *(next(per_matrix) if present else None for present in ctx.present)


def fold_applies(weight: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether :func:`fold` folds KHA-Linear's ``t`` into the head projection ``weight`` (``(heads x head_dim,
    d_in)``): training on CPU under bf16 autocast with both in fp32, head_dim a multiple of 32 and d_in of 64, the
    extension loaded."""
    if weight.dtype != torch.float32 or t.dtype != torch.float32 or not _training_on_cpu(weight, t):
        return False
    if not weight.is_contiguous():
        return False
    if t.shape[0] % 32 or weight.shape[0] % t.shape[0] or weight.shape[1] % 64:
        return False
    return _autocast_bf16() and _loaded()


def fold(weight: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The bf16 weight of ``x -> (x W^T) T`` per head (eq. 8; :func:`kha.knock.folded` without a bias), in the one
    pass over ``W`` that autocast's cast to bf16 would make: ``W_i + (T - I)^T bf16(W_i)`` per head, the sum in
    fp32, rounded once; gradients to ``W`` (fp32) and ``T`` in one pass back."""
    return torch.ops.kha_cpu.fold_forward(weight, t)


def _fold_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _fold_backward(ctx, grad):
    return torch.ops.kha_cpu.fold_backward(grad, *ctx.saved_tensors)
