"""Attention with knocks against independent references: baseline, naive per-head loop, eager kernel."""

import pytest
import torch

from kha import Attention, AttentionConfig, KVCache

from conftest import (
    HEAD_LAYOUTS,
    KNOCK_SETTINGS,
    assert_same_outputs_and_input_grads,
    assert_sdpa_matches_eager,
    attention_config,
    knocked_twin,
    perturb,
)
from reference import reference_attention

# fp32 throughout. Tolerances: identity at init is exact up to summation order (1e-6); paths that
# reorder float32 sums (eager vs SDPA, cache vs full, naive loop vs batched) agree within 1e-5.
EXACT = dict(rtol=0, atol=1e-6)
FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("knock,targets", KNOCK_SETTINGS)
def test_identity_at_init_matches_baseline(layout, knock, targets):
    base = Attention(attention_config(layout))
    perturb(base)  # non-trivial norm weights too
    kha = knocked_twin(base, knock, targets)
    assert_same_outputs_and_input_grads(base, kha, torch.randn(2, 12, 48))


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("knock,targets", [("none", None), ("linear", "qkv"), ("mlp", "v"), ("mlp", "qk"),
                                           ("gate", "v")])
@pytest.mark.parametrize("qk_norm,rope,bias", [(True, True, False), (False, False, True)])
def test_matches_naive_per_head_reference(layout, knock, targets, qk_norm, rope, bias):
    module = Attention(attention_config(layout, knock=knock, knock_targets=targets, qk_norm=qk_norm,
                                        rope=rope, qkv_bias=bias))
    perturb(module, scale=0.2)  # knocks far from the identity, so their place in the pipeline matters
    x = torch.randn(1, 10, 48)
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            torch.testing.assert_close(module(x, impl=impl)[0], reference_attention(module, x[0]), **FP32)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_matches_eager(layout, with_mask):
    module = Attention(attention_config(layout, knock="mlp", knock_targets="qkv"))
    perturb(module)
    assert_sdpa_matches_eager(module, 48, with_mask)


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("knock,targets", [("none", None), ("linear", "qkv"), ("mlp", "v")])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_cached_decoding_matches_full_forward(layout, knock, targets, impl):
    module = Attention(attention_config(layout, knock=knock, knock_targets=targets))
    perturb(module)
    x = torch.randn(2, 11, 48)
    with torch.no_grad():
        full = module(x, impl=impl)
        # token by token
        cache = KVCache()
        steps = [module(x[:, i:i + 1], cache=cache, impl=impl) for i in range(11)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, **FP32)
        assert cache.k.shape == (2, module.cfg.n_kv_heads, 11, 16)  # the baseline's cache size
        # a prefill of 4, then chunks of 3 and 4
        cache = KVCache()
        chunks = [module(x[:, a:b], cache=cache, impl=impl) for a, b in ((0, 4), (4, 7), (7, 11))]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, **FP32)


def test_left_padding_with_mask_matches_unpadded():
    module = Attention(attention_config("gqa", knock="mlp"))
    perturb(module)
    seq = torch.randn(1, 5, 48)
    padded = torch.cat((torch.randn(1, 3, 48), seq), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        expected = module(seq)
        for impl in ("sdpa", "eager"):
            out = module(padded, positions=positions, attention_mask=mask, impl=impl)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out[:, 3:], expected, **FP32)
        # the same through the cache: prefill the padded prompt, then decode one token
        cache = KVCache()
        module(padded, positions=positions, attention_mask=mask, cache=cache)
        nxt = torch.randn(1, 1, 48)
        grown_mask = torch.cat((mask, torch.ones(1, 1, dtype=torch.bool)), dim=1)
        step = module(nxt, positions=torch.tensor([[5]]), attention_mask=grown_mask, cache=cache)
        torch.testing.assert_close(step, module(torch.cat((seq, nxt), 1))[:, -1:], **FP32)


def test_rope_depends_only_on_relative_positions():
    module = Attention(attention_config("gqa"))
    perturb(module)
    x = torch.randn(2, 7, 48)
    with torch.no_grad():
        shifted = module(x, positions=torch.arange(7) + 1000)
        batched = module(x, positions=torch.arange(7).expand(2, 7))
        torch.testing.assert_close(shifted, module(x), rtol=1e-4, atol=1e-4)  # cos/sin of large angles
        torch.testing.assert_close(batched, module(x), **EXACT)


@pytest.mark.parametrize("knock", ["linear", "mlp"])
@pytest.mark.parametrize("target", ["q", "k", "v"])
def test_knock_gradient_is_sum_of_per_head_gradients(knock, target):
    """The shared knock's gradient equals the sum of gradients of independent per-head copies."""
    module = Attention(attention_config("gqa", knock=knock, knock_targets=target))
    perturb(module)
    x = torch.randn(1, 8, 48)
    upstream = torch.randn(1, 8, 48)
    (module(x) * upstream).sum().backward()

    shared = dict(module.knocks[target].named_parameters())
    heads = module.cfg.n_heads if target == "q" else module.cfg.n_kv_heads
    copies = [{n: p.detach().clone().requires_grad_() for n, p in shared.items()} for _ in range(heads)]

    def per_head(t, head):
        return copies[head] if t == target else None

    (reference_attention(module, x[0], knock_params=per_head) * upstream[0]).sum().backward()
    for name, param in shared.items():
        summed = sum(c[name].grad for c in copies)
        torch.testing.assert_close(param.grad, summed, **FP32)
        # every head contributes: no single head's gradient is the whole
        assert all(not torch.allclose(c[name].grad, summed) for c in copies)


@pytest.mark.parametrize("knock,per_target", [("linear", 1), ("mlp", 3), ("gate", 1)])
@pytest.mark.parametrize("targets", ["v", "qk", "qkv"])
def test_knock_parameter_counts(knock, per_target, targets):
    base = Attention(attention_config("gqa"))
    kha = Attention(attention_config("gqa", knock=knock, knock_targets=targets))
    added = sum(p.numel() for p in kha.parameters()) - sum(p.numel() for p in base.parameters())
    assert added == per_target * len(targets) * 16**2


def test_knocks_draw_no_random_numbers():
    """Same seed -> same base weights with or without knocks (paired comparisons rely on it)."""
    torch.manual_seed(3)
    base = Attention(attention_config("gqa"))
    torch.manual_seed(3)
    kha = Attention(attention_config("gqa", knock="mlp", knock_targets="qkv"))
    for name, tensor in base.state_dict().items():
        assert torch.equal(kha.state_dict()[name], tensor), name


def test_paper_default_targets():
    assert AttentionConfig(d_model=64, n_heads=4, knock="linear").knock_targets == ("q", "k", "v")
    assert AttentionConfig(d_model=64, n_heads=4, knock="mlp").knock_targets == ("v",)
    assert AttentionConfig(d_model=64, n_heads=4, knock="mlp", knock_targets=["v", "q"]).knock_targets == ("q", "v")


@pytest.mark.slow
def test_torch_compile_matches_eager():
    module = Attention(attention_config("gqa", knock="mlp"))
    perturb(module)
    x = torch.randn(2, 16, 48)
    compiled = torch.compile(module)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), module(x), **FP32)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(d_model=64, n_heads=6, n_kv_heads=4, head_dim=16),
         r"n_kv_heads=4 does not divide n_heads=6.*\[1, 2, 3, 6\]"),
        (dict(d_model=64, n_heads=6), r"d_model=64 is not divisible by n_heads=6"),
        (dict(d_model=64, n_heads=4, head_dim=15), r"head_dim must be even; got head_dim=15"),
        (dict(d_model=64, n_heads=4, knock="mixer"), r"unknown knock type 'mixer'.*none, linear, mlp, gate"),
        (dict(d_model=64, n_heads=4, knock="linear", knock_targets="qo"), r"unknown knock target.*'o'.*q, k, v"),
        (dict(d_model=64, n_heads=4, knock="mlp", knock_targets=""), r"at least one target"),
        (dict(d_model=64, n_heads=0), r"n_heads must be a positive integer, got 0"),
        (dict(d_model=64, n_heads=4, rope_theta=-1.0), r"rope_theta must be positive"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionConfig(**kwargs)


def test_odd_head_dim_is_fine_without_rope():
    assert AttentionConfig(d_model=60, n_heads=4, rope=False).head_dim == 15


def test_bad_forward_inputs_are_clear_errors():
    module = Attention(attention_config("gqa"))
    x = torch.randn(2, 5, 48)
    with pytest.raises(ValueError, match=r"expected input of shape \(batch, seq, 48\), got \(2, 5, 40\)"):
        module(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\); expected \(2, 5\)"):
        module(x, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positions has shape \(4,\); expected \(5,\) or \(2, 5\)"):
        module(x, positions=torch.arange(4))
    with pytest.raises(ValueError, match=r"unknown attention impl 'flash'; valid are sdpa, eager"):
        module(x, impl="flash")
