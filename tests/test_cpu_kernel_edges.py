"""kha.cpu_kernels at its edges: a build killed half way, an OS that denies the AMX tiles, the switch between AMX
and AVX512-BF16, weight-gradient sums over many rows, cross-entropy at large logits.

These run wherever the extension can be built: building and loading it runs no AMX instruction, and the
elementwise kernels tested here (RMSNorm, QK-norm + RoPE, cross-entropy) need AVX512-BF16 only, so they are
called through ``torch.ops.kha_cpu`` directly on CPUs without AMX too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kha import cpu_kernels
from kha.attention import RMSNorm, RotaryEmbedding, sdpa_attention

SRC = str(Path(cpu_kernels.__file__).parents[1])
BUILD_TIMEOUT = 600  # s: a build takes 10-60 s; a stale lock used to make the wait endless


@pytest.fixture(scope="module")
def ops():
    """The extension loaded into this process (without the AMX check: nothing here runs a tile instruction)."""
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        pytest.skip("no AVX512-BF16 CPU")
    try:
        cpu_kernels._load_library()
    except Exception as exc:  # no compiler: the fallback is tested in test_cpu_kernels.py
        pytest.skip(f"the extension does not build here ({exc})")
    return torch.ops.kha_cpu


def prepare_in_subprocess(extensions_dir: Path) -> tuple[str, str]:
    """``prepare()`` in a fresh process building into ``extensions_dir`` (as if the CPU had AMX: building and
    loading run no tile instruction); its standard output, its standard error (which may also hold torch's own
    warnings, e.g. a CUDA build's "No CUDA runtime is found" on a machine without a GPU)."""
    script = ("import torch; from kha import cpu_kernels as ck\n"
              "ck.cpu_supports = lambda: True\n"
              "torch.cpu._init_amx = lambda: True\n"
              "print(ck.prepare(), ck._library)\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir), "PYTHONPATH": SRC, "KHA_CPU_KERNELS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_a_killed_build_blocks_no_later_run(tmp_path, monkeypatch):
    """A build killed half way leaves torch's ``lock`` file in its build folder; torch's next build in that
    folder would wait for it forever. Here the folders a killed build leaves (the one torch managed before, a
    private one of an hour ago and one of a build still running) block nothing: the next ``prepare()`` builds
    within BUILD_TIMEOUT, in a private folder renamed into place, removes the hour-old one only, and a later
    run loads that build without building."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = cpu_kernels._build_folder()
    killed = [tmp_path / cpu_kernels.LIBRARY, tmp_path / f"{folder.name}.building-old",
              tmp_path / f"{folder.name}.building-now"]
    for stale in killed:
        stale.mkdir()
        (stale / "lock").touch()
    an_hour_ago = time.time() - 3700
    os.utime(killed[1], (an_hour_ago, an_hour_ago))

    output, errors = prepare_in_subprocess(tmp_path)
    assert output.startswith("True"), output + errors
    assert "built the CPU kernels" in errors
    assert (folder / f"{cpu_kernels.LIBRARY}.so").is_file() and not (folder / "lock").exists()
    assert not killed[1].exists() and killed[2].exists()  # a build of the last hour may still be running

    output, errors = prepare_in_subprocess(tmp_path)
    loaded = f"True {folder / cpu_kernels.LIBRARY}.so"
    assert output.strip() == loaded and "built" not in errors, output + errors  # loaded, not built again


@pytest.fixture
def fresh_prepare(ops, monkeypatch):
    """``prepare()`` runs again in this test; afterwards the micro-kernel this process chose before is restored."""
    before = cpu_kernels.micro_kernel()
    monkeypatch.setattr(cpu_kernels, "_micro_kernel", before)  # restored with _state
    monkeypatch.setattr(cpu_kernels, "_state", None)
    monkeypatch.setattr(cpu_kernels, "cpu_supports", lambda: True)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))  # the attention below has 4 (batch, KV head) pairs, its unit of work
    yield
    torch.set_num_threads(threads)
    ops.set_tiles(before == "amx")


@pytest.mark.parametrize("torch_has_it", [True, False])
def test_amx_denied_runs_the_kernels_on_avx512(fresh_prepare, monkeypatch, torch_has_it):
    """When the CPU has AMX but the OS denies the tiles (``torch.cpu._init_amx()`` returns False) or torch cannot
    ask (no ``_init_amx``), ``prepare()`` warns once and the kernels run their products on AVX512-BF16, which needs
    no permission: attention matches torch's SDPA in float64 within bf16's error, so no tile instruction ran (it
    would have died with SIGILL)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    if torch_has_it:
        monkeypatch.setattr(torch.cpu, "_init_amx", lambda: False)
    else:
        monkeypatch.delattr(torch.cpu, "_init_amx")
    with pytest.warns(UserWarning, match="AMX tiles") as warned:
        assert cpu_kernels.prepare() is True
        assert cpu_kernels.prepare() is True
    assert len(warned) == 1 and cpu_kernels.micro_kernel() == "avx512_bf16"
    q, k, v = (torch.randn(2, h, 128, 32, dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    assert cpu_kernels.attention_applies(q, k, v, None)
    out = sdpa_attention(q, k, v, None, True).double()
    exact = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), is_causal=True, enable_gqa=True)
    assert (out - exact).abs().max() < 2e-2  # bf16 output: 2^-8 relative on values of order 1


@pytest.mark.parametrize(("switch", "micro_kernel"), [("avx512", "avx512_bf16"), ("1", "amx"), ("yes", "amx")])
def test_the_switch_picks_the_micro_kernel(fresh_prepare, monkeypatch, switch, micro_kernel):
    """``KHA_CPU_KERNELS=avx512`` runs the products on AVX512-BF16 on a CPU with AMX; ``1`` on the tiles; a value
    that is none of 0, 1, avx512 warns, naming the valid ones, and counts as 1. (The AMX permission is faked:
    no product runs here.)"""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: True, raising=False)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, switch)
    if switch == "yes":
        with pytest.warns(UserWarning, match="'yes' is not one of 1, 0, avx512"):
            assert cpu_kernels.prepare()
    else:
        assert cpu_kernels.prepare()
    assert cpu_kernels.micro_kernel() == micro_kernel


def at_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_rms_norm_weight_grad_over_many_rows(ops):
    """RMSNorm's weight gradient over 65,573 rows (fp32; not a whole number of the kernel's 64-row blocks):
    bit-identical gradients at 1, 2 and 3 threads, and an error against float64 within 1.5x torch's own fp32
    error (about 0.8x in trials; the former row-by-row sum per thread 30x)."""
    g = torch.Generator().manual_seed(7)
    rows, d = 65_573, 64
    x = 2 * torch.randn(rows, d, generator=g, dtype=torch.float64)
    weight = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    grad = torch.randn(rows, d, generator=g, dtype=torch.float64)

    def module_weight_grad(dtype):
        norm = RMSNorm(d).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
        return torch.autograd.grad(norm(x.to(dtype)), norm.weight, grad.to(dtype))[0]

    ref, torch_fp32 = module_weight_grad(torch.float64), module_weight_grad(torch.float32)
    ours = [at_threads(t, lambda: ops.rms_norm_backward(grad.float(), x.float(), weight.float(), 1e-6))
            for t in (1, 2, 3)]
    for other in ours[1:]:
        assert torch.equal(ours[0][0], other[0]) and torch.equal(ours[0][1], other[1])
    error, torch_error = ((w.double() - ref).abs().max().item() for w in (ours[0][1], torch_fp32))
    assert error <= 1.5 * torch_error, f"{error:.3g} vs torch's {torch_error:.3g}"


def test_norm_rope_weight_grad_over_many_rows(ops):
    """QK-norm's weight gradient over 65,536 rows of 64 (8 x 1024 tokens x 8 heads): bit-identical at 1, 2 and
    3 threads (random inputs and positions). Its summation error, isolated: with rows of +-2^k (normalised
    to exactly +-1) at position 0 (RoPE the identity) every product is exact in fp32, so the only error is
    the sum's: within torch's fp32 sum of the same products against float64 (about 0.4x in trials; the
    former row-by-row sum per thread 1.2x)."""
    g = torch.Generator().manual_seed(8)
    batch, length, heads, head_dim = 8, 1024, 8, 64
    weight = 0.5 + torch.rand(head_dim, generator=g)
    dout = torch.randn(batch, length, heads, head_dim, generator=g).bfloat16()
    rope = RotaryEmbedding(head_dim, 10_000.0)
    x = (3 * torch.randn(batch, length, heads, head_dim, generator=g)).bfloat16()
    cos, sin = rope.cos_sin(torch.randint(0, 4096, (batch, length), generator=g))
    ours = [at_threads(t, lambda: ops.norm_rope_backward(dout, x, weight, cos, sin, 1e-6)) for t in (1, 2, 3)]
    for other in ours[1:]:
        assert torch.equal(ours[0][0], other[0]) and torch.equal(ours[0][1], other[1])

    sign = torch.randint(0, 2, x.shape, generator=g) * 2 - 1
    x = (sign * 2.0 ** torch.randint(-2, 3, (batch, length, heads, 1), generator=g)).bfloat16()
    cos, sin = rope.cos_sin(torch.zeros(length, dtype=torch.long))
    dweight = ops.norm_rope_backward(dout, x, weight, cos, sin, 1e-6)[1]
    ref = (dout.double() * sign).sum((0, 1, 2))
    torch_sum = (dout.float() * sign).sum((0, 1, 2))
    error, torch_error = ((w.double() - ref).abs().max().item() for w in (dweight, torch_sum))
    assert error <= torch_error, f"{error:.3g} vs torch's {torch_error:.3g}"


def test_cross_entropy_at_large_logits(ops):
    """Logits near 1e4 (bf16 steps of 64 there), each row's target at its largest value, so that the loss
    (about 4.9) is small beside lse: the mean loss within 1e-6 relative of float64 (taking lse - x[target]
    after rounding lse to fp32, whose spacing at 1e4 is 1e-3, gave 1.6e-5)."""
    g = torch.Generator().manual_seed(9)
    logits = (1e4 - 64 * torch.randint(0, 4, (256, 512), generator=g)).bfloat16()
    targets = logits.float().argmax(1)
    ref = F.cross_entropy(logits.double(), targets)
    loss, lse = ops.cross_entropy_forward(logits, targets, -100)
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    torch.testing.assert_close(lse.double(), logits.double().logsumexp(1), rtol=2e-7, atol=0)
