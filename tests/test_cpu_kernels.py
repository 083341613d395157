"""kha.cpu_kernels (attention; fused QK-norm + RoPE, SwiGLU gate, cross-entropy; the knocks and KHA-Linear's
fold) against fp32 or float64 autograd of torch's ops, and when they are used. Every test runs on each
micro-kernel this CPU has: AVX512-BF16 dot products, and the AMX tiles where the CPU has them.

Tolerance: bf16 rounding of inputs and outputs dominates any kernel's error, so a kernel's largest error in
the output and each gradient against the reference must be within 1.5x (plus a small absolute term) of
the error of torch's own ops in bf16 on the same bf16 inputs; for attention also below 2 % of the
reference's largest entry.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from kha import AttentionConfig, cpu_kernels
from kha.attention import RMSNorm, RotaryEmbedding, sdpa_attention
from kha.config import ModelConfig
from kha.knock import KNOCK_CLASSES, folded
from kha.model import DecoderLM

pytestmark = pytest.mark.skipif(not cpu_kernels.prepare(), reason="no AVX512-BF16 CPU or no C++ compiler")
MICRO_KERNELS = ["avx512_bf16", "amx"] if cpu_kernels.micro_kernel() == "amx" else ["avx512_bf16"]


@pytest.fixture(autouse=True, params=MICRO_KERNELS)
def micro_kernel(request, monkeypatch):
    """The kernels' products on this micro-kernel for the test, then on the one this process chose again."""
    chosen = cpu_kernels.micro_kernel()
    monkeypatch.setattr(cpu_kernels, "_micro_kernel", request.param)
    torch.ops.kha_cpu.set_tiles(request.param == "amx")
    yield request.param
    torch.ops.kha_cpu.set_tiles(chosen == "amx")


@pytest.fixture(autouse=True)
def two_threads():
    """The shapes here have 4-16 (batch, KV head) pairs, the kernel's unit of parallel work; more threads
    than pairs would route them to torch's kernel (a rule tested on its own below)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


def inputs(batch, heads, kv_heads, length, head_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g) for _ in range(2))
    grad = torch.randn(batch, heads, length, head_dim, generator=g)
    return q, k, v, grad


def sdpa_grads(q, k, v, grad, is_causal):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=q.shape[1] != k.shape[1])
    return out.detach(), torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))


def kernel_grads(q, k, v, grad, is_causal):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = cpu_kernels.attention(q, k, v, is_causal)
    return out.detach(), torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))


SHAPES = [  # batch, heads, kv heads, length, head_dim, causal
    (2, 8, 2, 128, 64, True),  # GQA
    (1, 4, 4, 192, 32, True),  # MHA
    (2, 4, 1, 64, 16, True),  # MQA
    (1, 6, 2, 128, 48, False),  # full attention
    (2, 4, 2, 128, 128, True),  # head_dim > 64: outputs wider than one 64-column block
    (1, 2, 2, 64, 256, True),  # head_dim 256
    (1, 4, 2, 640, 32, True),  # dQ taken in two chunks of key blocks (8, then 2)
    (1, 2, 1, 576, 48, False),  # full attention over two chunks; head_dim padded to 64 for the tiles
    (1, 2, 1, 64, 96, True),  # head_dim 96
]


def within_bf16_error(name, ours, torch_bf16, ref):
    err, torch_err = ((x.float() - ref).abs().max().item() for x in (ours, torch_bf16))
    assert err <= 1.5 * torch_err + 1e-3, f"{name}: {err:.4g} vs torch bf16 {torch_err:.4g}"
    assert err <= 0.02 * ref.abs().max().item(), f"{name}: {err:.4g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp32_reference(shape):
    *dims, causal = shape
    q, k, v, grad = inputs(*dims)
    bf16 = [x.bfloat16() for x in (q, k, v)]
    ref_out, ref = sdpa_grads(*(x.float() for x in bf16), grad.bfloat16().float(), causal)
    torch_out, torch_bf16 = sdpa_grads(*bf16, grad, causal)
    out, ours = kernel_grads(*bf16, grad, causal)
    assert out.dtype == torch.bfloat16 and out.shape == ref_out.shape
    within_bf16_error("out", out, torch_out, ref_out)
    for name, g, t, r in zip("qkv", ours, torch_bf16, ref, strict=True):
        assert g.dtype == torch.bfloat16 and g.shape == r.shape
        within_bf16_error(f"d{name}", g, t, r)


def test_logsumexp_rows():
    """The forward's second output, which the backward relies on: log-sum-exp of each row's scaled,
    causally masked scores, against fp32 (tolerance: bf16 inputs, fp32 arithmetic, 1e-4 relative)."""
    q, k, v, _ = (x.bfloat16() for x in inputs(1, 4, 2, 128, 32))
    _, lse = cpu_kernels._attention(q, k, v, True)
    scores = q.float() @ k.float().repeat_interleave(2, dim=1).transpose(-1, -2) / 32**0.5
    scores = scores.masked_fill(torch.ones(128, 128, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=1e-4, atol=1e-4)


def reference_norm_rope(x, weight, positions):
    """RMSNorm then RoPE as ``kha.attention`` computes them, on float64 copies of the inputs (fp32 inside the
    modules, as they compute)."""
    norm = RMSNorm(x.shape[-1]).double()
    rope = RotaryEmbedding(x.shape[-1], 10_000.0)
    x = x.detach().double().requires_grad_()
    with torch.no_grad():
        norm.weight.copy_(weight)
    return x, norm.weight, rope(norm(x), positions)


@pytest.mark.parametrize("shape", [(2, 128, 8, 64, False), (3, 64, 4, 16, False), (2, 64, 3, 128, True)])
def test_norm_rope_matches_reference(shape):
    """The fused QK-norm + RoPE, output and gradients (x, weight), against float64 autograd of the module
    path: within 1.5x (plus 1e-3 of the reference's largest entry) of the module path's own error in bf16,
    whose output the attention kernels would round to bf16 anyway. Positions (T,) or per sequence (B, T)."""
    batch, length, heads, head_dim, per_sequence = shape
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(batch, length, heads, head_dim, generator=g)).bfloat16()
    weight = 0.5 + torch.rand(head_dim, generator=g)
    grad = torch.randn(batch, length, heads, head_dim, generator=g)
    positions = (torch.stack([torch.randperm(length, generator=g) for _ in range(batch)]) if per_sequence
                 else torch.arange(length))
    x64, w64, ref = reference_norm_rope(x, weight, positions)
    ref_grads = torch.autograd.grad(ref, (x64, w64), grad.double())
    xb = x.clone().requires_grad_()  # bf16 leaf, as Q and K are under autocast
    norm, rope = RMSNorm(head_dim), RotaryEmbedding(head_dim, 10_000.0)
    with torch.no_grad():
        norm.weight.copy_(weight)
    module_out = rope(norm(xb), positions)
    module_grads = torch.autograd.grad(module_out, (xb, norm.weight), grad)
    xf, wf = x.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = cpu_kernels.norm_rope(xf, wf, *rope.cos_sin(positions), norm.eps)
    assert fused.dtype == torch.bfloat16 and fused.shape == x.shape
    fused_grads = torch.autograd.grad(fused, (xf, wf), grad.bfloat16())
    cases = [("output", fused, module_out.bfloat16(), ref)] + [
        (name, a, b, r) for name, a, b, r in zip(("dx", "dweight"), fused_grads, module_grads, ref_grads, strict=True)]
    for name, ours, theirs, reference in cases:
        error = (ours.double() - reference).abs().max().item()
        bound = 1.5 * (theirs.double() - reference).abs().max().item() + 1e-3 * reference.abs().max().item()
        assert error <= bound, f"{name}: error {error:.4g} > {bound:.4g}"


def max_error(ours, reference):
    return (ours.double() - reference).abs().max().item()


def test_rms_norm_matches_reference():
    """The residual stream's RMSNorm (fp32 in and out), output and gradients (x, weight), against float64
    autograd of the module: within 1.5x of the module's own error in fp32, plus 1e-6 of the reference's
    largest entry; a width that is not a multiple of 16 exercises the vector tail."""
    g = torch.Generator().manual_seed(6)
    x = 2 * torch.randn(3, 50, 200, generator=g, dtype=torch.float64)
    weight = 0.5 + torch.rand(200, generator=g, dtype=torch.float64)
    grad = torch.randn(3, 50, 200, generator=g, dtype=torch.float64)

    def module_path(dtype):
        norm = RMSNorm(200).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
        xs = x.to(dtype).requires_grad_()
        out = norm(xs)
        return [out, *torch.autograd.grad(out, (xs, norm.weight), grad.to(dtype))]

    refs, theirs = module_path(torch.float64), module_path(torch.float32)
    xf, wf = x.float().requires_grad_(), weight.float().requires_grad_()
    ours = cpu_kernels.rms_norm(xf, wf, 1e-6)
    ours = [ours, *torch.autograd.grad(ours, (xf, wf), grad.float())]
    for name, o, t, r in zip(("output", "dx", "dweight"), ours, theirs, refs, strict=True):
        bound = 1.5 * max_error(t, r) + 1e-6 * r.abs().max().item()
        assert max_error(o, r) <= bound, f"{name}: error {max_error(o, r):.4g} > {bound:.4g}"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.fuses_rms_norm(xf, wf)
        assert not cpu_kernels.fuses_rms_norm(xf, wf.bfloat16())  # a model cast to bf16 as a whole
    assert not cpu_kernels.fuses_rms_norm(xf, wf)  # fp32 training keeps torch's ops


def test_silu_mul_matches_reference():
    """silu(a) * b and its gradients against float64 autograd: within 1.5x of torch's own bf16 ops' error
    (plus 1e-3 of the reference's largest entry); an odd size exercises the vector tail."""
    g = torch.Generator().manual_seed(4)
    a, b = ((4 * torch.randn(3, 50, 37, generator=g)).bfloat16() for _ in range(2))
    grad = torch.randn(3, 50, 37, generator=g).bfloat16()
    a64, b64 = (x.double().requires_grad_() for x in (a, b))
    ref = F.silu(a64) * b64
    refs = [ref, *torch.autograd.grad(ref, (a64, b64), grad.double())]
    at, bt = (x.clone().requires_grad_() for x in (a, b))
    theirs = F.silu(at) * bt
    theirs = [theirs, *torch.autograd.grad(theirs, (at, bt), grad)]
    af, bf = (x.clone().requires_grad_() for x in (a, b))
    ours = cpu_kernels.silu_mul(af, bf)
    ours = [ours, *torch.autograd.grad(ours, (af, bf), grad)]
    for name, o, t, r in zip(("output", "da", "db"), ours, theirs, refs, strict=True):
        assert o.dtype == torch.bfloat16
        bound = 1.5 * max_error(t, r) + 1e-3 * r.abs().max().item()
        assert max_error(o, r) <= bound, f"{name}: error {max_error(o, r):.4g} > {bound:.4g}"


def test_cross_entropy_matches_reference():
    """Mean cross-entropy of bf16 logits with ignored rows: the loss within 1e-5 (relative) of float64, the
    bf16 gradient within 1.5x of torch's (fp32 loss, bf16 leaf) error plus one bf16 rounding step of the
    largest entry; a target out of range is an error naming it."""
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(300, 1000, generator=g)).bfloat16()
    targets = torch.randint(0, 1000, (300,), generator=g)
    targets[::7] = -100
    l64 = logits.double().requires_grad_()
    ref = F.cross_entropy(l64, targets, ignore_index=-100)
    ref_grad = 2.5 * torch.autograd.grad(ref, l64)[0]
    lt = logits.clone().requires_grad_()
    torch_grad = torch.autograd.grad(2.5 * F.cross_entropy(lt.float(), targets, ignore_index=-100), lt)[0]
    lf = logits.clone().requires_grad_()
    loss = cpu_kernels.cross_entropy(lf, targets)
    grad = torch.autograd.grad(2.5 * loss, lf)[0]
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    assert grad.dtype == torch.bfloat16
    bound = 1.5 * max_error(torch_grad, ref_grad) + 2**-8 * ref_grad.abs().max().item()
    assert max_error(grad, ref_grad) <= bound
    assert (grad[::7] == 0).all()
    targets[3] = 1000
    with pytest.raises(RuntimeError, match="target 1000 is out of bounds for 1000 classes"):
        cpu_kernels.cross_entropy(lf, targets)


def test_fused_kernels_used_only_where_they_apply(monkeypatch):
    """bf16 CPU training only: fp32 tensors, no gradient wanted, or the kernels off keep torch's ops."""
    x = torch.randn(2, 64, 4, 32).bfloat16().requires_grad_()
    assert cpu_kernels.fuses(x) and cpu_kernels.fuses(x, torch.ones(32))
    assert not cpu_kernels.fuses(x, torch.ones(32, dtype=torch.bfloat16))  # a norm's weight in bf16
    assert not cpu_kernels.fuses(x.float())
    assert not cpu_kernels.fuses(x.detach())
    with torch.no_grad():
        assert not cpu_kernels.fuses(x)
    monkeypatch.setattr(cpu_kernels, "_state", False)
    assert not cpu_kernels.fuses(x)


def test_strided_inputs_and_determinism():
    """Heads interleaved in memory (``(B, T, H, D)`` transposed, as the model's projections give them, also
    for the incoming gradient) and rows with an odd stride change nothing, bit for bit; two runs agree
    exactly."""
    q, k, v, grad = (x.bfloat16() for x in inputs(2, 8, 2, 128, 32))
    _, dense = kernel_grads(q, k, v, grad, True)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, grad)]
    assert not strided[0].is_contiguous()
    _, from_strided = kernel_grads(*strided, True)
    odd = [torch.cat((x, x[..., :1]), dim=-1)[..., :-1] for x in (q, k, v, grad)]  # row stride 33: copied first
    assert odd[0].stride(2) == 33
    _, from_odd = kernel_grads(*odd, True)
    _, again = kernel_grads(q, k, v, grad, True)
    for a, b, c, d in zip(dense, from_strided, again, from_odd, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


def leaves(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def test_applies_only_where_it_can():
    q, k, v = leaves(2, 8, 128, 32), leaves(2, 2, 128, 32), leaves(2, 2, 128, 32)
    assert cpu_kernels.attention_applies(q, k, v, None)
    assert not cpu_kernels.attention_applies(q, k, v, torch.ones(128, 128, dtype=torch.bool))  # a mask
    assert not cpu_kernels.attention_applies(q[:, :, :96], k[:, :, :96], v[:, :, :96], None)  # length % 64
    assert not cpu_kernels.attention_applies(q[:, :, :64], k, v, None)  # decoding with a cache: fewer queries
    assert not cpu_kernels.attention_applies(*(x[..., :24] for x in (q, k, v)), None)  # head_dim % 16
    assert cpu_kernels.attention_applies(*(leaves(2, h, 128, 96) for h in (8, 2, 2)), None)  # any multiple of 16
    assert not cpu_kernels.attention_applies(q, k, v[..., :16], None)  # V narrower than Q, K (MLA)
    with torch.no_grad():
        assert not cpu_kernels.attention_applies(q, k, v, None)  # inference: torch's kernel
    fp32 = [x.detach().float().requires_grad_() for x in (q, k, v)]
    assert not cpu_kernels.attention_applies(*fp32, None)  # fp32 training stays fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.attention_applies(*fp32, None)  # ... unless autocast would run SDPA in bf16
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)  # 2 x 2 (batch, KV head) pairs cannot feed 8 threads
        assert not cpu_kernels.attention_applies(q, k, v, None)
    finally:
        torch.set_num_threads(threads)


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    monkeypatch.setattr(cpu_kernels, "_state", None)
    assert cpu_kernels.prepare() is False
    q, k, v = leaves(2, 8, 128, 32), leaves(2, 2, 128, 32), leaves(2, 2, 128, 32)
    assert not cpu_kernels.attention_applies(q, k, v, None)


def test_sdpa_kernel_uses_it_under_autocast_and_compiles(monkeypatch):
    """``sdpa_attention`` (what the models call) takes the kernel under CPU bf16 autocast, with fp32 Q/K
    as RMSNorm and RoPE leave them; the compiled graph (no graph break) gives the eager gradients."""
    q, k, v, grad = inputs(2, 8, 2, 128, 32, seed=1)

    def grads(fn):
        leaves_ = [x.clone().requires_grad_() for x in (q, k, v.bfloat16())]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*leaves_, None, True)
        return torch.autograd.grad(out, leaves_, grad.bfloat16())

    calls = count_calls(monkeypatch)
    eager = grads(sdpa_attention)
    monkeypatch.undo()
    assert calls == [1]
    direct = kernel_grads(q, k, v.bfloat16(), grad, True)[1]
    for a, b in zip(eager, direct, strict=True):
        assert torch.equal(a.to(b.dtype), b)
    compiled = grads(torch.compile(sdpa_attention, fullgraph=True))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


def count_calls(monkeypatch) -> list:
    calls = []
    original = cpu_kernels.attention

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(cpu_kernels, "attention", counting)
    return calls


@pytest.mark.parametrize("knock", ["none", "mlp", "linear"])
def test_model_gradients_under_autocast(knock, monkeypatch):
    """A GQA decoder (2 layers, 4 query / 2 KV heads of 32, 2 x 128 tokens) under bf16 autocast: with the
    kernel, its parameter gradients are as close to the fp32 model's as with torch's SDPA (relative error
    within 1.25x plus 1e-3), and both layers used the kernel."""
    attn = AttentionConfig(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, knock=knock,
                           knock_targets="qkv" if knock == "linear" else None)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(attention=attn, n_layers=2, d_ff=256, vocab_size=256))
    with torch.no_grad():  # knocks off the identity, so that their path matters
        for name, p in model.named_parameters():
            if ".knocks." in name:
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 256, (2, 129))

    def flat_grads(precision_context):
        model.zero_grad()
        with precision_context:
            loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = flat_grads(torch.autocast("cpu", enabled=False))
    monkeypatch.setattr(cpu_kernels, "_state", False)
    with_torch = flat_grads(torch.autocast("cpu", dtype=torch.bfloat16))
    monkeypatch.setattr(cpu_kernels, "_state", True)
    calls = count_calls(monkeypatch)
    with_kernel = flat_grads(torch.autocast("cpu", dtype=torch.bfloat16))
    assert len(calls) == 2
    error, torch_error = ((g - reference).norm() / reference.norm() for g in (with_kernel, with_torch))
    assert error <= 1.25 * torch_error + 1e-3, f"relative gradient error {error:.4f} vs torch's {torch_error:.4f}"


def test_whole_model_compiles_without_graph_breaks(monkeypatch):
    """A decoder under bf16 autocast runs both layers' attention on the kernel, and compiled whole it calls every
    kernel and matches the eager model (``compiles_like_eager``)."""
    attn = AttentionConfig(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(attention=attn, n_layers=2, d_ff=256, vocab_size=256))
    calls = count_calls(monkeypatch)
    ids = torch.randint(0, 256, (2, 129))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    assert len(calls) == 2  # both layers' attention on the kernel
    monkeypatch.undo()
    compiles_like_eager(model, [f"kha.{op}." for op in ("attention", "norm_rope", "rms_norm", "silu_mul",
                                                            "cross_entropy")])


def compiles_like_eager(model, ops: list[str]) -> None:
    """``model`` under bf16 autocast compiled with ``fullgraph=True`` (a graph break would raise): the traced graph
    calls an op named by each prefix in ``ops``, and with inductor its loss and gradients match the eager model's
    within bf16 rounding (the compiled graph fuses the remaining torch ops differently)."""
    ids = torch.randint(0, model.cfg.vocab_size, (2, 129), generator=torch.Generator().manual_seed(0))

    def loss_and_grads(module):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module(ids[:, :-1], targets=ids[:, 1:]).loss
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    eager_loss, eager_grads = loss_and_grads(model)
    traced = set()

    def record_ops(graph_module, example_inputs):
        traced.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    loss_and_grads(torch.compile(model, backend=record_ops, fullgraph=True))
    for op in ops:
        assert any(name.startswith(op) for name in traced), (op, sorted(traced))
    torch._dynamo.reset()
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    assert (compiled_grads - eager_grads).norm() <= 2e-2 * eager_grads.norm()


def test_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    """A build that fails (here: no compiler, in a fresh extensions folder) warns and leaves no folder behind."""
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_state", None)
    monkeypatch.setattr(cpu_kernels, "_library", None)  # as in a fresh process
    with pytest.warns(UserWarning, match="no compiler"):
        assert cpu_kernels.prepare() is False
    assert list(tmp_path.iterdir()) == []
    q, k, v = leaves(2, 8, 128, 32), leaves(2, 2, 128, 32), leaves(2, 2, 128, 32)
    out = sdpa_attention(q, k, v, None, True)  # torch's kernel, same result as calling it directly
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_covers_the_shipped_tiny_configs_not_mla():
    """What the ``auto`` precision rule asks: the tiny presets at their shipped batch x length train on the
    kernel; MLA (V narrower than Q, K), a length not a multiple of 64 and too few (batch, KV head) pairs
    for the threads do not."""
    from kha.config import get_preset

    tiny = get_preset("tiny").attention
    assert cpu_kernels.covers(tiny, batch=8, seq_len=128)
    assert not cpu_kernels.covers(tiny, batch=8, seq_len=100)
    assert not cpu_kernels.covers(get_preset("mla-a0.8b").attention, batch=8, seq_len=128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        assert not cpu_kernels.covers(tiny, batch=1, seq_len=128)  # 1 x 4 KV heads < 8 threads
    finally:
        torch.set_num_threads(threads)


def knock_module(kind: str, head_dim: int, scale: float = 0.05):
    """A knock of this type with every matrix moved off its init by noise of sd ``scale``."""
    torch.manual_seed(0)
    module = KNOCK_CLASSES[kind](head_dim)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def knock_outputs(module, y, grad, form):
    """The knock's output and the gradients of its input and every matrix, in float64, through ``form``:
    ``"kernel"`` (``residual``, which takes the kernel here) or ``"ops"`` (torch's ops)."""
    y = y.detach().clone().requires_grad_()
    module.zero_grad()
    out = module.residual(y) if form == "kernel" else module.residual_ops(y)
    out.backward(grad.to(out.dtype))
    return [out.detach().double(), y.grad.double(), *(p.grad.double() for p in module.parameters())]


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
@pytest.mark.parametrize("kind", ["linear", "mlp", "gate"])
def test_knock_kernel_matches_reference(kind, head_dim, monkeypatch):
    """Every knock type on the kernel (2 x 100 x 4 rows: not a whole number of its 64-row blocks; the heads
    interleaved in memory, as a transposed view), on bf16 input with fp32 matrices as training runs it: its
    output and the gradients of the input and of every matrix against float64 autograd of the knock's formula,
    each error within 1.5x torch's ops' on the same input plus 1e-3 of the reference's largest entry; the kernel
    did run."""
    module = knock_module(kind, head_dim)
    y = torch.randn(2, 4, 100, head_dim).bfloat16().transpose(1, 2)
    assert not y.is_contiguous()
    grad = torch.randn(2, 100, 4, head_dim)
    reference = knock_outputs(copy.deepcopy(module).double(), y.double(), grad.double(), "ops")
    ops = knock_outputs(module, y, grad, "ops")
    calls, original = [], cpu_kernels.knock
    monkeypatch.setattr(cpu_kernels, "knock", lambda *args: calls.append(1) or original(*args))
    ours = knock_outputs(module, y, grad, "kernel")
    assert calls == [1]
    names = ["out", "dy", *(f"d {name}" for name, _ in module.named_parameters())]
    for name, ref, theirs, mine in zip(names, reference, ops, ours, strict=True):
        error, torch_error = ((x - ref).abs().max().item() for x in (mine, theirs))
        assert error <= 1.5 * torch_error + 1e-3 * ref.abs().max().item(), (name, error, torch_error)


@pytest.mark.parametrize("kind", ["linear", "mlp", "gate"])
def test_knock_kernel_keeps_the_deviation_and_is_the_identity_at_init(kind):
    """The probe of tests/test_knock_forms.py (every matrix at its init plus 0.002 on the diagonal plus noise of sd
    5e-4, bf16 features) on the kernel: the output's deviation from the input keeps a slope within 5 % of 1 on
    the exact one; at init the output is the input, bit for bit (the baseline's value)."""
    from test_knock_forms import set_small_deviation, slope

    y = torch.randn(256, 4, 64).bfloat16().requires_grad_()
    at_init = KNOCK_CLASSES[kind](64)
    assert torch.equal(at_init.residual(y), y)
    set_small_deviation(at_init)
    with torch.no_grad():
        exact = copy.deepcopy(at_init).double()(y.detach().double()) - y.detach().double()
    assert cpu_kernels.knock_applies(y, *at_init.parameters())
    measured = at_init.residual(y).detach().double() - y.detach().double()
    assert abs(slope(measured, exact) - 1) <= 0.05


def test_knock_kernel_at_large_gates_and_without_rows():
    """Gate logits far beyond where exp(2x) overflows fp32 (W_gate = 512 I, exact in bf16, so the logits are 256 y,
    up to about +-1,000): the kernel's output and gradients are finite and within 1 % of float64's (tanh
    saturates to +-1); an input without rows gives an empty output and zero matrix gradients."""
    module = knock_module("mlp", 64)
    with torch.no_grad():
        module.w_gate.copy_(512 * torch.eye(64))
    y = torch.randn(2, 64, 4, 64).bfloat16()
    grad = torch.randn(2, 64, 4, 64)
    reference = knock_outputs(copy.deepcopy(module).double(), y.double(), grad.double(), "ops")
    assert 256 * y.abs().max() > 200  # beyond exp(2x)'s fp32 range (x > 44)
    ours = knock_outputs(module, y, grad, "kernel")
    for ref, mine in zip(reference, ours, strict=True):
        assert torch.isfinite(mine).all()
        assert (mine - ref).norm() <= 1e-2 * ref.norm()
    module.zero_grad(set_to_none=True)
    empty = torch.zeros(0, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    out = module.residual(empty)
    out.sum().backward()
    assert out.shape == empty.shape and all(torch.equal(p.grad, torch.zeros(64, 64)) for p in module.parameters())


def test_knock_kernel_applies_only_where_it_can():
    y = leaves(2, 64, 4, 64)
    w = torch.eye(64, requires_grad=True)
    assert cpu_kernels.knock_applies(y, w)
    assert cpu_kernels.knock_applies(y.detach(), w)  # knocks trained on a frozen projection
    assert not cpu_kernels.knock_applies(y[..., :48], torch.eye(48))  # head_dim not a multiple of 32
    assert not cpu_kernels.knock_applies(y, w.detach().bfloat16())  # a model cast to bf16 as a whole
    assert not cpu_kernels.knock_applies(y.detach().float().requires_grad_(), w)  # fp32 training
    with torch.no_grad():
        assert not cpu_kernels.knock_applies(y, w)  # inference: torch's ops


def fold_case(heads=5, head_dim=64, d_in=192):
    torch.manual_seed(1)
    weight = (0.05 * torch.randn(heads * head_dim, d_in)).requires_grad_()
    t = (torch.eye(head_dim) + 0.05 * torch.randn(head_dim, head_dim)).requires_grad_()
    return weight, t, torch.randn(heads * head_dim, d_in)


def test_fold_kernel_matches_reference():
    """KHA-Linear's fold on the kernel (5 heads of 64 from 192 features) under bf16 autocast: the folded bf16
    weight and the gradients of the projection's weight and of T against float64, each error within 1.5x that of
    torch's ops (``kha.knock.folded`` under autocast) plus 1e-3 of the reference's largest entry."""
    weight, t, grad = fold_case()

    def run(fn, w, tt):
        w, tt = w.detach().clone().requires_grad_(), tt.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(w, tt)
        out.backward(grad.to(out.dtype))
        return [out.detach().double(), w.grad.double(), tt.grad.double()]

    reference = run(lambda w, tt: folded(w, None, tt, 64)[0], weight.double(), t.double())
    ops = run(lambda w, tt: folded(w, None, tt, 64)[0], weight, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_kernels.fold_applies(weight, t)
    ours = run(cpu_kernels.fold, weight, t)
    for name, ref, theirs, mine in zip(["weight", "d weight", "d T"], reference, ops, ours, strict=True):
        error, torch_error = ((x - ref).abs().max().item() for x in (mine, theirs))
        assert error <= 1.5 * torch_error + 1e-3 * ref.abs().max().item(), (name, error, torch_error)


def test_fold_kernel_at_init_is_autocasts_cast_and_applies_only_where_it_can():
    """With T = I the folded weight is the weight rounded to bf16, bit for bit (what autocast would hand the
    projection); the kernel runs only in bf16 CPU training under autocast, on fp32 weights of whole heads."""
    weight, t, _ = fold_case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cpu_kernels.fold(weight, torch.eye(64)), weight.detach().bfloat16())
        assert not cpu_kernels.fold_applies(weight[:, :96], t)  # input width not a multiple of 64
        assert not cpu_kernels.fold_applies(weight.t().contiguous().t(), t)  # not contiguous: torch's ops
        assert not cpu_kernels.fold_applies(weight.detach().bfloat16(), t)
        with torch.no_grad():
            assert not cpu_kernels.fold_applies(weight, t)
    assert not cpu_kernels.fold_applies(weight, t)  # fp32 training: the fold stays fp32


def test_knock_and_fold_gradients_do_not_depend_on_the_thread_count():
    """The weight gradients are summed per chunk of rows (knock) or per head (fold), then in a fixed tree: bit for
    bit the same at 1, 2 and 3 threads."""
    from test_cpu_kernel_edges import at_threads

    mlp = knock_module("mlp", 64)
    y, grad = torch.randn(3, 300, 4, 64).bfloat16(), torch.randn(3, 300, 4, 64).bfloat16()
    weight, t, fold_grad = fold_case()
    runs = [at_threads(n, lambda: (*torch.ops.kha_cpu.knock_backward(grad, y, *mlp.parameters()),
                                   *torch.ops.kha_cpu.fold_backward(fold_grad.bfloat16(), weight.detach(), t.detach())))
            for n in (1, 2, 3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("knock,targets", [("mlp", "v"), ("linear", "qkv"), ("gate", "v")])
def test_knocked_model_compiles_whole_on_the_kernels(knock, targets):
    """A knocked decoder compiles whole with the knock's kernel in the graph (KHA-Linear: the fold's, at 256 rows
    into 128 features) and matches the eager model (``compiles_like_eager``)."""
    attn = AttentionConfig(d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, knock=knock, knock_targets=targets)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(attention=attn, n_layers=2, d_ff=256, vocab_size=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".knocks." in name:
                p.add_(0.05 * torch.randn_like(p))
    compiles_like_eager(model, ["kha_cpu.fold_forward" if knock == "linear" else "kha_cpu.knock_forward"])
