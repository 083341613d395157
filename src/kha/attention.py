"""Causal self-attention with knocking heads: MHA, GQA and MQA.

Per layer: head projections -> knocks (shared across heads, on the KV heads before any repeat) ->
QK RMSNorm -> RoPE -> scaled dot-product attention -> output projection. The order follows the paper
(section 4.5.2: T^Q and T^K are applied before QK normalisation) and Qwen3's attention.

Two interchangeable attention kernels: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``,
GQA through ``enable_gqa`` so K/V are not repeated where the backend supports it) and ``"eager"``
(an explicit softmax reference used by the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .knock import fold_into_linear, make_knocks, parse_targets

ATTENTION_IMPLS = ("sdpa", "eager")
# "gqa" covers MHA (n_kv_heads == n_heads), GQA and MQA (n_kv_heads == 1).
ATTENTION_VARIANTS = ("gqa",)


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass
class AttentionConfig:
    """Shape and options of one attention layer.

    ``n_kv_heads`` defaults to ``n_heads`` (MHA); ``1`` is MQA; anything dividing ``n_heads`` is GQA.
    ``variant`` picks the attention family (see :func:`kha.variants.build_attention`).
    ``head_dim`` defaults to ``d_model // n_heads`` and may be set independently (Qwen3 uses 128).
    ``knock_targets`` defaults to the paper's choice for the knock type: q, k, v for ``linear``; v for
    ``mlp`` and ``gate``. It accepts ``"qkv"``, ``"v"``, ``("q", "v")`` and so on.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    variant: str = "gqa"
    head_dim: int | None = None
    knock: str = "none"
    knock_targets: tuple[str, ...] | str | None = None
    qk_norm: bool = True
    rope: bool = True
    rope_theta: float = 1_000_000.0
    qkv_bias: bool = False
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.variant not in ATTENTION_VARIANTS:
            raise ValueError(
                f"unknown attention variant {self.variant!r}; valid are {', '.join(ATTENTION_VARIANTS)}"
            )
        _check_positive("d_model", self.d_model)
        _check_positive("n_heads", self.n_heads)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _check_positive("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            divisors = [g for g in range(1, self.n_heads + 1) if self.n_heads % g == 0]
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                f"valid n_kv_heads are {divisors}"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly or choose n_heads dividing d_model"
                )
            self.head_dim = self.d_model // self.n_heads
        _check_positive("head_dim", self.head_dim)
        if self.rope and self.head_dim % 2:
            raise ValueError(
                f"RoPE rotates feature pairs, so head_dim must be even; got head_dim={self.head_dim} "
                "(use an even head_dim or rope=False)"
            )
        if self.rope and not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        self.knock_targets = parse_targets(self.knock, self.knock_targets)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 (Qwen3's convention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half layout (Llama/Qwen): feature ``j`` pairs with ``j + head_dim/2``."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``(B, T, H, D)`` by ``positions`` of shape ``(T,)`` or ``(B, T)``."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        if angles.dim() == 2:
            angles = angles[None]
        cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class KVCache:
    """Per-layer cache of keys (after knock, QK-norm and RoPE) and values (after knock).

    Shapes ``(B, n_kv_heads, S, head_dim)``: the knocks act on the KV heads before any repeat, so the
    cache is exactly the baseline's size.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        return self.k, self.v


def build_mask(
    q_len: int, past: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean ``(B|1, 1, q_len, past + q_len)`` mask, True where a query may attend.

    Causal by sequence index; ``attention_mask`` (``(B, past + q_len)``, true/1 = real token) hides
    padding keys. A query whose every key is hidden (a left-padding query) keeps its own key, so no row
    is empty and no NaN appears; such outputs are meaningless and should be ignored by the caller.
    """
    total = past + q_len
    q_idx = torch.arange(past, total, device=device)[:, None]
    k_idx = torch.arange(total, device=device)[None, :]
    allowed = (k_idx <= q_idx)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = allowed | (k_idx == q_idx)[None, None]
    return allowed


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """Reference attention: explicit K/V repeat, scores, fp32 softmax. ``q``: ``(B, H, T, D)``."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if is_causal:
        mask = build_mask(q.shape[2], k.shape[2] - q.shape[2], None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)


_KERNELS = {"sdpa": sdpa_attention, "eager": eager_attention}


def resolve_positions(
    positions: torch.Tensor | None, batch: int, q_len: int, past: int, device: torch.device
) -> torch.Tensor:
    if positions is None:
        return torch.arange(past, past + q_len, device=device)
    if positions.shape not in ((q_len,), (batch, q_len)):
        raise ValueError(
            f"positions has shape {tuple(positions.shape)}; expected ({q_len},) or ({batch}, {q_len})"
        )
    return positions


class Attention(nn.Module):
    """Causal self-attention (MHA / GQA / MQA) with optional knocking-heads transforms.

    ``forward(x, positions=None, attention_mask=None, cache=None, impl="sdpa")``:
    ``x`` is ``(B, T, d_model)``; ``positions`` (``(T,)`` or ``(B, T)``) feed RoPE and default to
    ``cache.length + arange(T)``; ``attention_mask`` (``(B, past + T)``, 1 = real token) hides padding;
    ``cache`` is a :class:`KVCache` that is extended in place for incremental decoding.
    """

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        hd, d = cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.knocks = make_knocks(cfg.knock, cfg.knock_targets, hd)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(hd, cfg.rope_theta) if cfg.rope else None

    def _knock(self, target: str, x: torch.Tensor) -> torch.Tensor:
        return self.knocks[target](x) if target in self.knocks else x

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V as ``(B, heads, T, head_dim)``: projections, knocks, QK-norm, RoPE."""
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self._knock("q", self.q_proj(x).view(b, t, self.cfg.n_heads, hd))
        k = self._knock("k", self.k_proj(x).view(b, t, self.cfg.n_kv_heads, hd))
        v = self._knock("v", self.v_proj(x).view(b, t, self.cfg.n_kv_heads, hd))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        impl: str = "sdpa",
    ) -> torch.Tensor:
        if impl not in _KERNELS:
            raise ValueError(f"unknown attention impl {impl!r}; valid are {', '.join(ATTENTION_IMPLS)}")
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected input of shape (batch, seq, {self.cfg.d_model}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({b}, {past + t}) "
                "(batch, cached + new tokens)"
            )
        q, k, v = self.project(x, resolve_positions(positions, b, t, past, x.device))
        if cache is not None:
            k, v = cache.update(k, v)
        mask, is_causal = None, False
        if attention_mask is not None or (past > 0 and t > 1):
            mask = build_mask(t, past, attention_mask, x.device)
        else:
            is_causal = past == 0 and t > 1
        out = _KERNELS[impl](q, k, v, mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def fold_knocks(self) -> None:
        """Absorb every linear knock into its projection (eq. 8) and drop it; see :func:`kha.fold_knocks`."""
        for target in list(self.knocks):
            fold_into_linear(getattr(self, f"{target}_proj"), self.knocks[target], self.cfg.head_dim)
            del self.knocks[target]
        self.cfg = replace(self.cfg, knock="none", knock_targets=None)
