"""GTA, MLA, GLA and talking-heads attention with knocks, against baselines and naive references."""

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kha import Attention, AttentionConfig, KVCache, fold_knocks
from kha.flops import attention_params, knock_params, layer_flops
from kha.variants import (
    GroupedTiedAttention,
    LatentAttention,
    LatentCache,
    TalkingHeadsAttention,
    TiedCache,
    build_attention,
)

from conftest import assert_same_outputs_and_input_grads, assert_sdpa_matches_eager, perturb
from reference import reference_attention, reference_gta, reference_latent, reference_talking_heads

# fp32 throughout. Identity at init is exact up to summation order (1e-6); paths that reorder fp32 sums
# (folded vs unfolded, cache vs full, SDPA vs eager, naive loop vs batched) agree within 1e-5.
EXACT = dict(rtol=0, atol=1e-6)
FP32 = dict(rtol=1e-5, atol=1e-5)

D_MODEL = 64
# Scaled-down paper shapes: head_dim 16, rope_head_dim 8, kv_lora_rank 32.
VARIANTS = {
    "gta": dict(variant="gta", n_heads=8, n_kv_heads=2),
    "mla": dict(variant="mla", n_heads=4, rope_head_dim=8, kv_lora_rank=32),
    "mla_q": dict(variant="mla", n_heads=4, rope_head_dim=8, kv_lora_rank=32, q_lora_rank=24),
    "gla": dict(variant="gla", n_heads=8, n_kv_heads=4, rope_head_dim=8, kv_lora_rank=32, latent_groups=2),
    "talking": dict(variant="talking", n_heads=8, n_kv_heads=2),
}
CLASSES = {"gta": GroupedTiedAttention, "mla": LatentAttention, "mla_q": LatentAttention, "gla": LatentAttention,
           "talking": TalkingHeadsAttention}
LATENT = ("mla", "mla_q", "gla")
# Allowed knocks: linear only for the latent variants (paper 4.2.3), every type elsewhere.
KNOCKS = {
    name: [("linear", t) for t in ("q", "v", "qkv")]
    + ([] if name in LATENT else [("mlp", "v"), ("mlp", "qkv"), ("gate", "v"), ("gate", "qk")])
    for name in VARIANTS
}
ALL_KNOCKS = [(name, knock, targets) for name in VARIANTS for knock, targets in KNOCKS[name]]


def config(name: str, **kwargs) -> AttentionConfig:
    return AttentionConfig(d_model=D_MODEL, head_dim=16, **{**VARIANTS[name], **kwargs})


def make(name: str, **kwargs):
    return build_attention(config(name, **kwargs))


def twin(base, knock: str, targets):
    """A knocked module of ``base``'s variant carrying ``base``'s weights (only the knocks are its own)."""
    module = build_attention(replace(base.cfg, knock=knock, knock_targets=targets))
    result = module.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(key.startswith("knocks.") for key in result.missing_keys)
    return module


def decode(module, x, bounds, impl=None):
    """Run ``x`` through a fresh cache chunk by chunk (``bounds`` = chunk ends); return outputs and cache."""
    cache, outs, start = module.new_cache(), [], 0
    for end in bounds:
        outs.append(module(x[:, start:end], cache=cache, impl=impl))
        start = end
    return torch.cat(outs, dim=1), cache


def test_factory_builds_each_variant():
    for name, cls in CLASSES.items():
        assert type(make(name)) is cls
    assert type(build_attention(AttentionConfig(d_model=48, n_heads=4))) is Attention
    assert isinstance(Attention(AttentionConfig(d_model=48, n_heads=4)).new_cache(), KVCache)


@pytest.mark.parametrize("name,knock,targets", ALL_KNOCKS)
def test_identity_at_init_matches_baseline(name, knock, targets):
    base = make(name)
    perturb(base)  # non-trivial norm weights and mixing too
    module = twin(base, knock, targets)
    assert_same_outputs_and_input_grads(base, module, torch.randn(2, 10, D_MODEL))


def train(module, steps: int = 10) -> None:
    """A few AdamW steps on every parameter, knocks included, so the knocks leave the identity."""
    opt = torch.optim.AdamW(module.parameters(), lr=2e-2)
    x, target = torch.randn(4, 12, D_MODEL), torch.randn(4, 12, D_MODEL)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(x), target).backward()
        opt.step()


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("targets", ["k", "qkv"])
def test_folded_equals_unfolded_after_training(name, targets):
    base = make(name)
    module = twin(base, "linear", targets)
    train(module)
    for knock in module.knocks.values():
        assert (knock.weight - torch.eye(knock.weight.shape[0])).abs().max() > 0.05  # really moved
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        expected = module(x)
        fold_knocks(module)
        assert module.cfg.knock == "none" and len(module.knocks) == 0
        torch.testing.assert_close(module(x), expected, **FP32)
        torch.testing.assert_close(decode(module, x, range(1, 10))[0], expected, **FP32)
    base.load_state_dict(module.state_dict(), strict=True)  # exactly the baseline's parameters
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, **FP32)


@pytest.mark.parametrize("name", ["gta", "talking"])
def test_nonlinear_knocks_refuse_to_fold(name):
    with pytest.raises(ValueError, match="cannot fold the MLPKnock on 'v'"):
        fold_knocks(make(name, knock="mlp"))


def expected_cache_shapes(name: str, batch: int, seq: int) -> dict[str, tuple[int, ...]]:
    """What each docstring says the cache holds; per token: GTA n_kv x head_dim + head_dim/2 (2x16+8,
    scaled-down "512+64"), MLA/GLA kv_lora_rank + rope_head_dim (32+8), talking-heads GQA's K and V."""
    cfg = config(name)
    if name == "gta":
        return {"tied": (batch, cfg.n_kv_heads, seq, 16), "k_rope": (batch, 1, seq, 8)}
    if name in LATENT:
        return {"latent": (batch, seq, 32), "k_rope": (batch, seq, 8)}
    return {"k": (batch, cfg.n_kv_heads, seq, 16), "v": (batch, cfg.n_kv_heads, seq, 16)}


CACHE_CASES = [(n, impl) for n in VARIANTS for impl in ("sdpa", "eager") if (n, impl) != ("talking", "sdpa")]


@pytest.mark.parametrize("name,impl", CACHE_CASES)
@pytest.mark.parametrize("knocked", [False, True])
def test_cached_decoding_matches_full_forward(name, impl, knocked):
    knock, targets = ("none", None)
    if knocked:
        knock, targets = ("linear" if name in LATENT else "mlp"), "qkv"
    module = make(name, knock=knock, knock_targets=targets)
    perturb(module)
    x = torch.randn(2, 11, D_MODEL)
    with torch.no_grad():
        full = module(x, impl=impl)
        steps, cache = decode(module, x, range(1, 12), impl)  # token by token
        torch.testing.assert_close(steps, full, **FP32)
        assert isinstance(cache, {"gta": TiedCache, "talking": KVCache}.get(name, LatentCache))
        assert cache.length == 11
        assert {f: tuple(getattr(cache, f).shape) for f in cache.fields} == expected_cache_shapes(name, 2, 11)
        chunks, _ = decode(module, x, (4, 7, 11), impl)  # a prefill of 4, then chunks of 3 and 4
        torch.testing.assert_close(chunks, full, **FP32)


def test_cache_holds_the_documented_tensors():
    """GTA caches the tied states after the v knock and the RoPE key after knock, norm and RoPE; MLA/GLA the
    normalised latent and the RoPE key after RoPE. Checked against the module's own pieces."""
    x = torch.randn(2, 6, D_MODEL)
    pos = torch.arange(6)
    gta = make("gta", knock="mlp", knock_targets="qkv")
    perturb(gta)
    with torch.no_grad():
        cache = gta.new_cache()
        gta(x, cache=cache)
        tied = gta.knocks["v"](gta.kv_proj(x).view(2, 6, 2, 16)).transpose(1, 2)
        k_rope = gta.rotary(gta.k_rope_norm(gta.knocks["k"](gta.k_rope_proj(x).view(2, 6, 1, 8))), pos)
        torch.testing.assert_close(cache.tied, tied, **EXACT)
        torch.testing.assert_close(cache.k_rope, k_rope.transpose(1, 2), **EXACT)
    gla = make("gla", knock="linear")
    perturb(gla)
    with torch.no_grad():
        cache = gla.new_cache()
        gla(x, cache=cache)
        c = gla.kv_down(x)
        latent = torch.cat((gla.kv_norm[0](c[..., :16]), gla.kv_norm[1](c[..., 16:])), dim=-1)
        torch.testing.assert_close(cache.latent, latent, **EXACT)
        torch.testing.assert_close(cache.k_rope, gla.rotary(gla.k_rope_proj(x)[:, :, None], pos)[:, :, 0], **EXACT)


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "talking"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_sdpa_matches_eager(name, with_mask):
    module = make(name, knock="linear")
    perturb(module)
    assert_sdpa_matches_eager(module, D_MODEL, with_mask)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padding_with_mask_matches_unpadded(name):
    module = make(name, knock="linear")
    perturb(module)
    seq = torch.randn(1, 5, D_MODEL)
    padded = torch.cat((torch.randn(1, 3, D_MODEL), seq), dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        out = module(padded, positions=positions, attention_mask=mask)
        torch.testing.assert_close(out[:, 3:], module(seq), **FP32)
        cache = module.new_cache()  # the same through the cache: prefill the padded prompt, decode one token
        module(padded, positions=positions, attention_mask=mask, cache=cache)
        nxt = torch.randn(1, 1, D_MODEL)
        step = module(nxt, positions=torch.tensor([[5]]), attention_mask=torch.cat((mask, mask[:, -1:]), 1),
                      cache=cache)
        torch.testing.assert_close(step, module(torch.cat((seq, nxt), 1))[:, -1:], **FP32)


# Naive per-head references with every parameter (knocks, norms, mixing) moved away from its init, so the
# place of each knock in the pipeline matters.
GTA_CASES = [("none", None), ("linear", "qkv"), ("mlp", "qkv"), ("gate", "v")]


@pytest.mark.parametrize("knock,targets", GTA_CASES)
@pytest.mark.parametrize("qk_norm,rope,bias", [(True, True, False), (False, False, True)])
def test_gta_matches_naive_reference(knock, targets, qk_norm, rope, bias):
    module = make("gta", knock=knock, knock_targets=targets, qk_norm=qk_norm, rope=rope, qkv_bias=bias)
    perturb(module, scale=0.2)
    x = torch.randn(1, 10, D_MODEL)
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            torch.testing.assert_close(module(x, impl=impl)[0], reference_gta(module, x[0]), **FP32)


@pytest.mark.parametrize("name", LATENT)
@pytest.mark.parametrize("knock,targets", [("none", None), ("linear", "qkv"), ("linear", "k")])
@pytest.mark.parametrize("qk_norm,rope", [(True, True), (False, False)])
def test_latent_matches_naive_reference(name, knock, targets, qk_norm, rope):
    module = make(name, knock=knock, knock_targets=targets, qk_norm=qk_norm, rope=rope)
    perturb(module, scale=0.2)
    x = torch.randn(1, 10, D_MODEL)
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            torch.testing.assert_close(module(x, impl=impl)[0], reference_latent(module, x[0]), **FP32)


@pytest.mark.parametrize("knock,targets", [("none", None), ("mlp", "qkv")])
def test_talking_heads_matches_naive_reference(knock, targets):
    module = make("talking", knock=knock, knock_targets=targets)
    perturb(module, scale=0.2)  # mixing far from the identity
    x = torch.randn(1, 10, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(module(x)[0], reference_talking_heads(module, x[0]), **FP32)


def test_talking_heads_at_init_equals_plain_attention():
    plain = Attention(replace(config("talking", knock="mlp"), variant="gqa"))
    perturb(plain)
    talking = make("talking", knock="mlp")  # freshly initialised mixing, the plain module's other weights
    result = talking.load_state_dict(plain.state_dict(), strict=False)
    assert set(result.missing_keys) == {"logits_mix", "weights_mix"} and result.unexpected_keys == []
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(talking(x), plain(x, impl="eager"), **EXACT)
        torch.testing.assert_close(talking(x), plain(x), **FP32)  # SDPA
        torch.testing.assert_close(talking(x)[0], reference_attention(plain, x[0]), **FP32)


def test_talking_heads_refuses_fused_kernel():
    module = make("talking")
    x = torch.randn(1, 4, D_MODEL)
    with pytest.raises(ValueError, match=r"mixes the attention matrix across heads.*use impl='eager'"):
        module(x, impl="sdpa")
    cache = module.new_cache()
    with pytest.raises(ValueError):
        module(x, cache=cache, impl="sdpa")
    assert cache.length == 0  # refused before touching the cache
    torch.testing.assert_close(module(x), module(x, impl="eager"), **EXACT)


@pytest.mark.parametrize("variant", ["mla", "gla"])
@pytest.mark.parametrize("knock", ["mlp", "gate"])
def test_latent_rejects_nonlinear_knocks(variant, knock):
    message = rf"{variant.upper()} supports knock='linear' or 'none' only, got knock='{knock}'.*materialises"
    with pytest.raises(ValueError, match=message):
        AttentionConfig(d_model=64, n_heads=4, variant=variant, knock=knock)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(variant="mamba"), r"unknown attention variant 'mamba'; valid are gqa, gta, mla, gla, talking"),
        (dict(variant="gla", latent_groups=3), r"latent_groups=3 must divide both kv_lora_rank=512 and "
                                                r"n_kv_heads=4; valid latent_groups are \[1, 2, 4\]"),
        (dict(variant="gla", latent_groups=0), r"latent_groups must be a positive integer, got 0"),
        (dict(variant="mla", rope_head_dim=7), r"rope_head_dim must be even; got rope_head_dim=7"),
        (dict(variant="mla", rope_head_dim=0), r"rope_head_dim must be a positive integer, got 0"),
        (dict(variant="mla", kv_lora_rank=-1), r"kv_lora_rank must be a positive integer, got -1"),
        (dict(variant="mla", q_lora_rank=0), r"q_lora_rank \(or None\) must be a positive integer, got 0"),
        (dict(variant="mla", qkv_bias=True), r"MLA has no projection biases"),
        (dict(variant="gta", head_dim=18), r"GTA .* head_dim must be divisible by 4; got head_dim=18"),
        (dict(variant="gta", head_dim=15, rope=False), r"head_dim must be divisible by 2; got head_dim=15"),
    ],
)
def test_bad_variant_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionConfig(d_model=64, n_heads=4, **kwargs)


def test_fields_of_other_variants_are_not_validated():
    AttentionConfig(d_model=64, n_heads=4, rope_head_dim=7, latent_groups=3, kv_lora_rank=0)  # gqa ignores them
    AttentionConfig(d_model=64, n_heads=4, variant="mla", latent_groups=3)  # only GLA has groups
    AttentionConfig(d_model=60, n_heads=4, variant="mla", rope_head_dim=8)  # odd head_dim is fine: no RoPE on it


@pytest.mark.parametrize("name,knock,targets", [(n, "none", None) for n in VARIANTS] + ALL_KNOCKS)
@pytest.mark.parametrize("qk_norm,bias", [(True, False), (False, True)])
def test_parameter_counts_match_module(name, knock, targets, qk_norm, bias):
    bias = bias and name not in LATENT  # MLA/GLA have no biases
    module = make(name, knock=knock, knock_targets=targets, qk_norm=qk_norm, qkv_bias=bias)
    knock_numel = sum(p.numel() for p in module.knocks.parameters())
    assert knock_params(module.cfg) == knock_numel
    assert attention_params(module.cfg) == sum(p.numel() for p in module.parameters()) - knock_numel


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("knock,targets", [("linear", "qkv"), ("linear", "k")])
def test_projection_and_knock_flops_match_torch_flop_counter(name, knock, targets):
    """Projection and knock FLOPs of ``layer_flops`` equal what torch counts on the real module (the knocks in the
    plain form, whose matmuls run inside the knock modules, as eq. 12 counts them)."""
    module = make(name, knock=knock, knock_targets=targets, qk_norm=False, rope=False, knock_form="plain")
    seq = 7
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, seq, D_MODEL), impl="eager")
    counts = counter.get_flop_counts()
    prefix = type(module).__name__ + "."
    linears = {prefix + n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    f = layer_flops(module.cfg, seq)
    assert sum(sum(counts[k].values()) for k in counts if ".knocks." in k) == f.knock
    assert sum(sum(counts[k].values()) for k in linears) == f.qkv + f.output


def test_knocks_draw_no_random_numbers():
    """Same seed -> same base weights with or without knocks (paired comparisons rely on it)."""
    for name, (knock, targets) in [(n, KNOCKS[n][-1]) for n in VARIANTS]:
        torch.manual_seed(3)
        base = make(name)
        torch.manual_seed(3)
        module = make(name, knock=knock, knock_targets=targets)
        for key, tensor in base.state_dict().items():
            assert torch.equal(module.state_dict()[key], tensor), (name, key)
