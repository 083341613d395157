"""An independent, deliberately naive attention used as the tests' reference.

It loops over heads with explicit per-head weight slices, applies a knock given per head (so a test can
hand each head its own copy of the shared parameters), RMSNorm by formula, RoPE as a complex rotation of
the pairs (j, j + D/2), and softmax with an explicit causal mask. It shares no code with ``kha``.
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
