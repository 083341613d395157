"""Attention variants beyond MHA/GQA/MQA, and the factory that builds any of them from a config.

- :class:`GroupedTiedAttention` (GTA; Zadouri, Strauss & Dao 2025): one tied K/V state per KV group.
- :class:`LatentAttention`: MLA (DeepSeek-V2) and GLA (grouped latent, same paper as GTA), which cache a
  compressed latent instead of per-head K/V; linear knocks only (paper section 4.2.3).
- :class:`TalkingHeadsAttention` (Shazeer et al. 2020): a comparison baseline that mixes the attention
  logits and weights across heads. That is *not* knocking heads (DESIGN section 1).

Every module shares :class:`~kha.attention.AttentionBase`'s forward signature, owns its knocks in
``knocks``, implements ``fold_knocks()`` and makes its own cache with ``new_cache()``.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import (
    Attention,
    AttentionBase,
    AttentionConfig,
    RMSNorm,
    RotaryEmbedding,
    SequenceCache,
    attention_logits,
    mask_logits,
    weighted_values,
)
from .knock import make_knocks


def _knocks_by_width(cfg: AttentionConfig) -> nn.ModuleDict:
    """One knock per target, each as wide as ``cfg.knock_dim(target)``."""
    return nn.ModuleDict({t: make_knocks(cfg.knock, (t,), cfg.knock_dim(t))[t] for t in cfg.knock_targets})


class TiedCache(SequenceCache):
    """GTA cache: tied states ``(B, n_kv_heads, S, head_dim)`` (after the ``v`` knock) and the shared RoPE
    key ``(B, 1, S, head_dim / 2)`` (after the ``k`` knock, its norm and RoPE): the baseline GTA cache."""

    fields = ("tied", "k_rope")


class LatentCache(SequenceCache):
    """MLA/GLA cache: the normalised latent ``(B, S, kv_lora_rank)`` (all groups side by side) and the
    shared RoPE key after RoPE ``(B, S, rope_head_dim)``: the baseline latent cache."""

    fields = ("latent", "k_rope")
    seq_dim = 1


class GroupedTiedAttention(AttentionBase):
    """Grouped-tied attention (GTA) with knocking heads.

    Per KV group ``g`` one tied state ``s_g = x W_g`` (``head_dim`` wide) is the value whole, and its first
    half is the non-RoPE half of the key; the key's other half is one RoPE key ``r = x W_r``
    (``head_dim / 2``) shared by all heads: ``k_g = [norm_k(s_g[:D/2]), rope(norm_r(r))]``, ``v_g = s_g``.
    Queries are ``n_heads x head_dim``; RoPE turns their second half, the one that meets ``r``.

    QK-norm (``qk_norm``): ``q_norm`` over the whole query head as in the base attention; the key's halves
    come from different projections, so each has its own norm (``k_norm`` on the tied half, applied when
    the key is assembled so the value stays un-normalised; ``k_rope_norm`` on ``r`` before RoPE).

    Knocks, all after the projections and before QK-norm and RoPE, so the cache stays GTA's
    (``n_kv_heads x head_dim + head_dim / 2`` per token, e.g. 4x128+64 = "512+64" in Table 3):

    - ``v``: on each tied state ``s_g`` (``head_dim`` square, shared by the KV groups), before caching;
      the value and the key's non-RoPE half both see it, as they both are ``s_g``. The paper's KHA-MLP.
    - ``k``: on the shared RoPE key ``r`` (``head_dim / 2`` square). There is a single RoPE key, so this
      knock shares nothing across heads (a linear one is a reparametrisation); the per-group key
      features are the tied state's, knocked by ``v``.
    - ``q``: on each query head, as in the base attention.

    Linear knocks fold into ``q_proj``, ``k_rope_proj`` and ``kv_proj``.
    """

    cache_class = TiedCache

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        hd, d, half = cfg.head_dim, cfg.d_model, cfg.head_dim // 2
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.kv_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.k_rope_proj = nn.Linear(d, half, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.knocks = _knocks_by_width(cfg)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(half, cfg.norm_eps) if cfg.qk_norm else None
        self.k_rope_norm = RMSNorm(half, cfg.norm_eps) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(half, cfg.rope_theta) if cfg.rope else None

    def qkv(self, x, positions, cache):
        b, t, _ = x.shape
        cfg, half = self.cfg, self.cfg.head_dim // 2
        q = self._project("q", self.q_proj, x, cfg.head_dim)
        tied = self._project("v", self.kv_proj, x, cfg.head_dim)
        k_rope = self._project("k", self.k_rope_proj, x, half)
        if self.q_norm is not None:
            q, k_rope = self.q_norm(q), self.k_rope_norm(k_rope)
        if self.rotary is not None:
            q = torch.cat((q[..., :half], self.rotary(q[..., half:], positions)), dim=-1)
            k_rope = self.rotary(k_rope, positions)
        tied, k_rope = tied.transpose(1, 2), k_rope.transpose(1, 2)
        if cache is not None:
            tied, k_rope = cache.update(tied, k_rope)
        k_nope = tied[..., :half] if self.k_norm is None else self.k_norm(tied[..., :half])
        k = torch.cat((k_nope, k_rope.expand(-1, cfg.n_kv_heads, -1, -1)), dim=-1)
        return q.transpose(1, 2), k, tied

    def knock_projections(self, target: str) -> list[nn.Linear]:
        return [{"q": self.q_proj, "k": self.k_rope_proj, "v": self.kv_proj}[target]]


class LatentAttention(AttentionBase):
    """Multi-head latent attention (MLA, DeepSeek-V2) and grouped latent attention (GLA).

    K/V come from a latent ``c = x W_down`` (``kv_lora_rank`` wide), RMS-normalised and up-projected per
    head to the non-RoPE key and the value (``head_dim`` each); one decoupled RoPE key ``x W_r``
    (``rope_head_dim``) is shared by all heads. A query head is ``[q_nope (head_dim), rope(q_rope)
    (rope_head_dim)]``, from ``x`` or from a normalised ``q_lora_rank`` latent; the softmax scale is
    ``1 / sqrt(head_dim + rope_head_dim)``. ``n_kv_heads`` up-projected K/V heads (default ``n_heads``
    as in DeepSeek-V2; fewer groups the queries as in GQA).

    GLA splits the latent into ``latent_groups`` equal groups (``kv_lora_rank / latent_groups`` each, so
    the cache is as wide as MLA's); group ``i`` has its own latent norm and up-projections and serves
    KV heads ``i * n_kv_heads / latent_groups ...`` and so the matching ``n_heads / latent_groups`` query
    heads. MLA is GLA with one group.

    QK-norm: per-head key normalisation would need K materialised, which latent caching avoids, so as in
    DeepSeek-V2 ``qk_norm`` means the RMSNorms on the latents (KV latent, and the query latent when
    ``q_lora_rank`` is set).

    Knocks (linear only): on ``q_nope``, ``k_nope`` and ``v`` after the up-projections, before RoPE;
    ``fold_knocks()`` folds them into ``q_proj``, ``k_up`` and ``v_up``. The cache holds the latent and
    the RoPE key (:class:`LatentCache`, "512+64" at paper shapes); decoding re-expands the whole cached
    latent to K/V at every step (simple, not the absorbed-weights inference trick).
    """

    cache_class = LatentCache

    def __init__(self, cfg: AttentionConfig):
        super().__init__()
        self.cfg = cfg
        d, hd, rd, groups = cfg.d_model, cfg.head_dim, cfg.rope_head_dim, cfg.n_latents
        q_in = d if cfg.q_lora_rank is None else cfg.q_lora_rank
        if cfg.q_lora_rank is not None:
            self.q_down = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_latent_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps) if cfg.qk_norm else None
        self.q_proj = nn.Linear(q_in, cfg.n_heads * hd, bias=False)
        self.q_rope_proj = nn.Linear(q_in, cfg.n_heads * rd, bias=False)
        self.kv_down = nn.Linear(d, cfg.kv_lora_rank, bias=False)
        self.k_rope_proj = nn.Linear(d, rd, bias=False)
        width, heads = cfg.kv_lora_rank // groups, cfg.n_kv_heads // groups
        self.kv_norm = nn.ModuleList(RMSNorm(width, cfg.norm_eps) for _ in range(groups)) if cfg.qk_norm else None
        self.k_up = nn.ModuleList(nn.Linear(width, heads * hd, bias=False) for _ in range(groups))
        self.v_up = nn.ModuleList(nn.Linear(width, heads * hd, bias=False) for _ in range(groups))
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.knocks = make_knocks(cfg.knock, cfg.knock_targets, hd)
        self.rotary = RotaryEmbedding(rd, cfg.rope_theta) if cfg.rope else None

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x if self.rotary is None else self.rotary(x, positions)

    def qkv(self, x, positions, cache):
        b, t, _ = x.shape
        cfg, hd, rd = self.cfg, self.cfg.head_dim, self.cfg.rope_head_dim
        q_in = x
        if cfg.q_lora_rank is not None:
            q_in = self.q_down(x)
            q_in = q_in if self.q_latent_norm is None else self.q_latent_norm(q_in)
        q_nope = self._project("q", self.q_proj, q_in, hd)
        q = torch.cat((q_nope, self._rope(self.q_rope_proj(q_in).view(b, t, cfg.n_heads, rd), positions)), -1)

        latent = self.kv_down(x).chunk(cfg.n_latents, dim=-1)
        if self.kv_norm is not None:
            latent = [norm(c) for norm, c in zip(self.kv_norm, latent, strict=True)]
        latent = torch.cat(latent, dim=-1)
        k_rope = self._rope(self.k_rope_proj(x).view(b, t, 1, rd), positions)[:, :, 0]
        if cache is not None:
            latent, k_rope = cache.update(latent, k_rope)
        s = latent.shape[1]
        chunks = latent.chunk(cfg.n_latents, dim=-1)
        k_nope = torch.cat([self._project("k", up, c, hd) for up, c in zip(self.k_up, chunks, strict=True)], dim=-2)
        v = torch.cat([self._project("v", up, c, hd) for up, c in zip(self.v_up, chunks, strict=True)], dim=-2)
        k = torch.cat((k_nope, k_rope[:, :, None].expand(b, s, cfg.n_kv_heads, rd)), dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def knock_projections(self, target: str) -> list[nn.Linear]:
        return {"q": [self.q_proj], "k": list(self.k_up), "v": list(self.v_up)}[target]


class TalkingHeadsAttention(Attention):
    """Talking-heads attention (Shazeer et al. 2020) on MHA/GQA: a comparison baseline, not KHA.

    The attention logits are mixed across the ``n_heads`` heads by ``logits_mix`` before the softmax, and
    the weights by ``weights_mix`` after it (``n_heads x n_heads`` each, used as ``logits @ mix`` over the
    head axis; identity at init, so it starts as plain attention). Masking comes after the logits mix, so
    masked keys stay masked. The attention matrix is materialised, so only the eager kernel exists: it is
    the default, and asking for ``impl="sdpa"`` is an error. Knocks are allowed and act as in
    :class:`~kha.attention.Attention` (they sit before the attention matrix and fold the same way).
    """

    default_impl = "eager"

    def __init__(self, cfg: AttentionConfig):
        super().__init__(cfg)
        self.logits_mix = nn.Parameter(torch.eye(cfg.n_heads))
        self.weights_mix = nn.Parameter(torch.eye(cfg.n_heads))

    def resolve_impl(self, impl: str | None) -> str:
        if impl == "sdpa":
            raise ValueError(
                "talking-heads attention mixes the attention matrix across heads, so it cannot use a fused "
                "kernel; use impl='eager' (or None, its default)"
            )
        return super().resolve_impl(impl)

    def attend(self, q, k, v, mask, is_causal, impl, documents=None):
        if documents is not None:
            mask, is_causal = documents.dense(), False
        logits = torch.einsum("bhts,hg->bgts", attention_logits(q, k), self.logits_mix.float())
        probs = torch.softmax(mask_logits(logits, mask, is_causal), dim=-1)
        return weighted_values(torch.einsum("bhts,hg->bgts", probs, self.weights_mix.float()), v)


VARIANT_CLASSES = {
    "gqa": Attention,
    "gta": GroupedTiedAttention,
    "mla": LatentAttention,
    "gla": LatentAttention,
    "talking": TalkingHeadsAttention,
}


def build_attention(cfg: AttentionConfig) -> AttentionBase:
    """The attention module for ``cfg.variant``; every one shares ``Attention``'s forward signature."""
    return VARIANT_CLASSES[cfg.variant](cfg)  # AttentionConfig validated the name
