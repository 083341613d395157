"""An independent, deliberately naive attention used as the tests' reference.

It loops over heads with explicit per-head weight slices, applies a knock given per head (so a test can
hand each head its own copy of the shared parameters), RMSNorm by formula, RoPE as a complex rotation of
the pairs (j, j + D/2), and softmax with an explicit causal mask. It shares no code with ``kha``.
The same style covers the variants: ``reference_gta``, ``reference_latent`` (MLA/GLA) and
``reference_talking_heads``, each reading the module's weights slice by slice.
"""

from __future__ import annotations

import math

import torch


def rms(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope_complex(x, positions, theta):
    """x: (T, D); rotate pair (j, j + D/2) by angle pos * theta^(-2j/D)."""
    half = x.shape[-1] // 2
    j = torch.arange(half, dtype=torch.float64)
    angle = positions.double()[:, None] * theta ** (-2 * j / x.shape[-1])
    z = torch.complex(x[:, :half].double(), x[:, half:].double()) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def apply_knock(kind, params, x):
    if kind == "linear":
        return x @ params["weight"]
    if kind == "mlp":
        return 2 * ((x @ params["w_up"]) * torch.sigmoid(x @ params["w_gate"])) @ params["w_down"]
    if kind == "gate":
        return 2 * x * torch.sigmoid(x @ params["w_gate"])
    raise AssertionError(kind)


def reference_attention(module, x, knock_params=None, positions=None):
    """Naive forward of ``module`` (a ``kha.Attention``) on ``x`` of shape (T, d_model), one sequence.

    ``knock_params(target, head)`` returns the dict of matrices for that head; by default the module's
    own shared parameters.
    """
    cfg = module.cfg
    hd, t = cfg.head_dim, x.shape[0]
    positions = torch.arange(t) if positions is None else positions
    if knock_params is None:
        def knock_params(target, head):
            return dict(module.knocks[target].named_parameters()) if target in module.knocks else None

    def head_proj(proj, head):
        w = proj.weight[head * hd:(head + 1) * hd]
        out = x @ w.T
        return out if proj.bias is None else out + proj.bias[head * hd:(head + 1) * hd]

    def knocked(target, proj, head):
        h = head_proj(proj, head)
        params = knock_params(target, head)
        return h if params is None else apply_knock(cfg.knock, params, h)

    group = cfg.n_heads // cfg.n_kv_heads
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    outs = []
    for h in range(cfg.n_heads):
        g = h // group
        q, k, v = knocked("q", module.q_proj, h), knocked("k", module.k_proj, g), knocked("v", module.v_proj, g)
        if cfg.qk_norm:
            q = rms(q, module.q_norm.weight, cfg.norm_eps)
            k = rms(k, module.k_norm.weight, cfg.norm_eps)
        if cfg.rope:
            q, k = rope_complex(q, positions, cfg.rope_theta), rope_complex(k, positions, cfg.rope_theta)
        scores = (q @ k.T) / math.sqrt(hd)
        scores = scores.masked_fill(~causal, float("-inf"))
        outs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outs, dim=-1) @ module.o_proj.weight.T


def _knock_of(module, target):
    """The module's shared knock on ``target`` as a function of one head's features (identity if none)."""
    if target not in module.knocks:
        return lambda h: h
    params = dict(module.knocks[target].named_parameters())
    return lambda h: apply_knock(module.cfg.knock, params, h)


def _rows(proj, start, width, x):
    """``x`` through rows ``start:start + width`` of ``proj`` (one head's slice), bias included."""
    out = x @ proj.weight[start:start + width].T
    return out if proj.bias is None else out + proj.bias[start:start + width]


def _causal_softmax(scores):
    t = scores.shape[0]
    return torch.softmax(scores.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf")), -1)


def reference_gta(module, x, positions=None):
    """Naive GTA (a ``kha.variants.GroupedTiedAttention``) on one sequence ``x`` of shape (T, d_model).

    Key of group g = [k_norm(s_g[:D/2]), rope(k_rope_norm(knock_k(r)))], value = s_g = knock_v(x W_g),
    query = q_norm(knock_q(x W_h)) with RoPE on its second half; scale 1/sqrt(D).
    """
    cfg = module.cfg
    hd, half, t = cfg.head_dim, cfg.head_dim // 2, x.shape[0]
    positions = torch.arange(t) if positions is None else positions
    r = _knock_of(module, "k")(_rows(module.k_rope_proj, 0, half, x))
    if cfg.qk_norm:
        r = rms(r, module.k_rope_norm.weight, cfg.norm_eps)
    if cfg.rope:
        r = rope_complex(r, positions, cfg.rope_theta)
    outs = []
    for h in range(cfg.n_heads):
        g = h // (cfg.n_heads // cfg.n_kv_heads)
        q = _knock_of(module, "q")(_rows(module.q_proj, h * hd, hd, x))
        s = _knock_of(module, "v")(_rows(module.kv_proj, g * hd, hd, x))
        k_nope = s[:, :half]
        if cfg.qk_norm:
            q = rms(q, module.q_norm.weight, cfg.norm_eps)
            k_nope = rms(k_nope, module.k_norm.weight, cfg.norm_eps)
        if cfg.rope:
            q = torch.cat((q[:, :half], rope_complex(q[:, half:], positions, cfg.rope_theta)), dim=-1)
        k = torch.cat((k_nope, r), dim=-1)
        outs.append(_causal_softmax(q @ k.T / math.sqrt(hd)) @ s)
    return torch.cat(outs, dim=-1) @ module.o_proj.weight.T


def reference_latent(module, x, positions=None):
    """Naive MLA/GLA (a ``kha.variants.LatentAttention``) on one sequence ``x`` of shape (T, d_model).

    Head h uses KV head j = h // (n_heads / n_kv_heads), which lives in latent group
    i = j // (n_kv_heads / groups) as row block j - i * (n_kv_heads / groups) of that group's up-projections.
    """
    cfg = module.cfg
    hd, rd, t = cfg.head_dim, cfg.rope_head_dim, x.shape[0]
    groups = 1 if cfg.variant == "mla" else cfg.latent_groups
    width, kv_per_group = cfg.kv_lora_rank // groups, cfg.n_kv_heads // groups
    positions = torch.arange(t) if positions is None else positions

    def rope(z):
        return rope_complex(z, positions, cfg.rope_theta) if cfg.rope else z

    q_in = x
    if cfg.q_lora_rank is not None:
        q_in = x @ module.q_down.weight.T
        if cfg.qk_norm:
            q_in = rms(q_in, module.q_latent_norm.weight, cfg.norm_eps)
    latent = x @ module.kv_down.weight.T
    r = rope(x @ module.k_rope_proj.weight.T)
    outs = []
    for h in range(cfg.n_heads):
        j = h // (cfg.n_heads // cfg.n_kv_heads)
        i, row = j // kv_per_group, (j % kv_per_group) * hd
        c = latent[:, i * width:(i + 1) * width]
        if cfg.qk_norm:
            c = rms(c, module.kv_norm[i].weight, cfg.norm_eps)
        k_nope = _knock_of(module, "k")(_rows(module.k_up[i], row, hd, c))
        v = _knock_of(module, "v")(_rows(module.v_up[i], row, hd, c))
        q_nope = _knock_of(module, "q")(_rows(module.q_proj, h * hd, hd, q_in))
        q_rope = rope(_rows(module.q_rope_proj, h * rd, rd, q_in))
        scores = (q_nope @ k_nope.T + q_rope @ r.T) / math.sqrt(hd + rd)
        outs.append(_causal_softmax(scores) @ v)
    return torch.cat(outs, dim=-1) @ module.o_proj.weight.T


def reference_talking_heads(module, x):
    """Naive talking-heads attention on one sequence: per-head logits from ``reference_attention``'s
    ingredients, mixed by explicit sums over heads before the softmax and after it."""
    cfg = module.cfg
    hd, t, n = cfg.head_dim, x.shape[0], cfg.n_heads
    positions = torch.arange(t)
    logits, values = [], []
    for h in range(n):
        g = h // (n // cfg.n_kv_heads)
        q = _knock_of(module, "q")(_rows(module.q_proj, h * hd, hd, x))
        k = _knock_of(module, "k")(_rows(module.k_proj, g * hd, hd, x))
        values.append(_knock_of(module, "v")(_rows(module.v_proj, g * hd, hd, x)))
        if cfg.qk_norm:
            q, k = rms(q, module.q_norm.weight, cfg.norm_eps), rms(k, module.k_norm.weight, cfg.norm_eps)
        if cfg.rope:
            q, k = rope_complex(q, positions, cfg.rope_theta), rope_complex(k, positions, cfg.rope_theta)
        logits.append(q @ k.T / math.sqrt(hd))
    mixed = [sum(logits[h] * module.logits_mix[h, g] for h in range(n)) for g in range(n)]
    probs = [_causal_softmax(m) for m in mixed]
    weights = [sum(probs[h] * module.weights_mix[h, g] for h in range(n)) for g in range(n)]
    return torch.cat([weights[g] @ values[g] for g in range(n)], dim=-1) @ module.o_proj.weight.T
