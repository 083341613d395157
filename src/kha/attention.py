"""Causal self-attention with knocking heads: MHA, GQA and MQA, and the pieces every variant shares.

Per layer: head projections -> knocks (shared across heads, on the KV heads before any repeat) ->
QK RMSNorm -> RoPE -> scaled dot-product attention -> output projection. The order follows the paper
(section 4.5.2: T^Q and T^K are applied before QK normalisation) and Qwen3's attention.

Two interchangeable attention kernels: ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``,
GQA through ``enable_gqa`` so K/V are not repeated where the backend supports it; when training in bf16 on
a CPU with AVX512-BF16, ``kha.cpu_kernels``'s kernels where they apply) and ``"eager"``
(an explicit softmax reference used by the tests).

:class:`AttentionBase` holds what every variant (``kha.variants``) shares: input checks, masks, positions,
kernel choice, the output projection and folding; a variant only says how it makes Q, K, V and its cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .knock import check_form, fold_into_linear, make_knocks, parse_targets

ATTENTION_IMPLS = ("sdpa", "eager")
# "gqa" covers MHA (n_kv_heads == n_heads), GQA and MQA (n_kv_heads == 1); the others live in kha.variants:
# grouped-tied (GTA), multi-head latent (MLA), grouped latent (GLA) and talking-heads attention.
ATTENTION_VARIANTS = ("gqa", "gta", "mla", "gla", "talking")
LATENT_VARIANTS = ("mla", "gla")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


@dataclass
class AttentionConfig:
    """Shape and options of one attention layer.

    ``n_kv_heads`` defaults to ``n_heads`` (MHA); ``1`` is MQA; anything dividing ``n_heads`` is GQA.
    ``variant`` picks the attention family (see :func:`kha.variants.build_attention`).
    ``head_dim`` defaults to ``d_model // n_heads`` and may be set independently (Qwen3 uses 128).
    ``knock_targets`` defaults to the paper's choice for the knock type: q, k, v for ``linear``; v for
    ``mlp`` and ``gate``. It accepts ``"qkv"``, ``"v"``, ``("q", "v")`` and so on. ``knock_form`` is how the
    knocks are computed (:mod:`kha.knock`): ``"fused"`` (robust in bf16, KHA-Linear folded into the
    projections) or ``"plain"`` (the formulas as written, the reference); the same function and parameters.

    MLA / GLA only: ``kv_lora_rank`` (the cached latent's width, all groups together), ``q_lora_rank``
    (None = queries projected directly from the input), ``rope_head_dim`` (the decoupled RoPE part of
    each query and of the shared RoPE key); GLA only: ``latent_groups``. Fields of other variants are
    neither used nor validated.
    """

    d_model: int
    n_heads: int
    n_kv_heads: int | None = None
    variant: str = "gqa"
    head_dim: int | None = None
    knock: str = "none"
    knock_targets: tuple[str, ...] | str | None = None
    knock_form: str = "fused"
    qk_norm: bool = True
    rope: bool = True
    rope_theta: float = 1_000_000.0
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    rope_head_dim: int = 64
    latent_groups: int = 2

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
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                f"valid n_kv_heads are {_divisors(self.n_heads)}"
            )
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly or choose n_heads dividing d_model"
                )
            self.head_dim = self.d_model // self.n_heads
        _check_positive("head_dim", self.head_dim)
        if self.rope and not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        self.knock_targets = parse_targets(self.knock, self.knock_targets)
        check_form(self.knock_form)
        if self.variant in LATENT_VARIANTS:
            self._check_latent()
        elif self.variant == "gta":
            if self.head_dim % (4 if self.rope else 2):
                raise ValueError(
                    f"GTA splits each head in a non-RoPE and a RoPE half and RoPE rotates pairs within the "
                    f"half, so head_dim must be divisible by {4 if self.rope else 2}; got head_dim={self.head_dim}"
                )
        elif self.rope and self.head_dim % 2:
            raise ValueError(
                f"RoPE rotates feature pairs, so head_dim must be even; got head_dim={self.head_dim} "
                "(use an even head_dim or rope=False)"
            )

    def _check_latent(self) -> None:
        name = self.variant.upper()
        if self.knock not in ("none", "linear"):
            raise ValueError(
                f"{name} supports knock='linear' or 'none' only, got knock={self.knock!r}: {name} never "
                "materialises per-head K/V at inference (it caches the latent, paper section 4.2.3), so only "
                "a linear knock, which folds into the up-projections, keeps latent caching"
            )
        if self.qkv_bias:
            raise ValueError(f"{name} has no projection biases (as DeepSeek-V2); set qkv_bias=False")
        _check_positive("kv_lora_rank", self.kv_lora_rank)
        if self.q_lora_rank is not None:
            _check_positive("q_lora_rank (or None)", self.q_lora_rank)
        _check_positive("rope_head_dim", self.rope_head_dim)
        if self.rope and self.rope_head_dim % 2:
            raise ValueError(
                f"RoPE rotates feature pairs, so rope_head_dim must be even; got rope_head_dim={self.rope_head_dim}"
            )
        if self.variant == "gla":
            _check_positive("latent_groups", self.latent_groups)
            if self.kv_lora_rank % self.latent_groups or self.n_kv_heads % self.latent_groups:
                valid = [g for g in _divisors(self.kv_lora_rank) if self.n_kv_heads % g == 0]
                raise ValueError(
                    f"latent_groups={self.latent_groups} must divide both kv_lora_rank={self.kv_lora_rank} "
                    f"and n_kv_heads={self.n_kv_heads}; valid latent_groups are {valid}"
                )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def n_latents(self) -> int:
        """Latent groups of MLA (1) and GLA (``latent_groups``); 0 for variants without a latent."""
        return {"mla": 1, "gla": self.latent_groups}.get(self.variant, 0)

    def knock_dim(self, target: str) -> int:
        """Width of the features a knock on ``target`` transforms: ``head_dim``, except GTA's RoPE key."""
        return self.head_dim // 2 if self.variant == "gta" and target == "k" else self.head_dim


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in fp32 (Qwen3's convention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_kernels.fuses_rms_norm(x, self.weight):
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half layout (Llama/Qwen): feature ``j`` pairs with ``j + head_dim/2``."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles of ``positions`` (``(T,)`` or ``(B, T)``), each ``(1 or B, T, D/2)``, fp32."""
        freqs = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        if freqs.dim() == 2:
            freqs = freqs[None]
        return freqs.cos(), freqs.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape ``(B, T, H, D)`` by ``positions`` of shape ``(T,)`` or ``(B, T)``."""
        cos, sin = (torch.cat((a, a), dim=-1)[:, :, None, :] for a in self.cos_sin(positions))
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class SequenceCache:
    """Named tensors that grow along the sequence dimension ``seq_dim``; subclasses name the fields."""

    fields: tuple[str, ...] = ()
    seq_dim = 2

    def __init__(self) -> None:
        for name in self.fields:
            setattr(self, name, None)

    @property
    def length(self) -> int:
        first = getattr(self, self.fields[0])
        return 0 if first is None else first.shape[self.seq_dim]

    def update(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new positions of every field (in ``fields`` order); return the whole fields."""
        for name, new in zip(self.fields, tensors, strict=True):
            old = getattr(self, name)
            setattr(self, name, new if old is None else torch.cat((old, new), dim=self.seq_dim))
        return tuple(getattr(self, name) for name in self.fields)


class KVCache(SequenceCache):
    """Per-layer cache of keys (after knock, QK-norm and RoPE) and values (after knock).

    Shapes ``(B, n_kv_heads, S, head_dim)``: the knocks act on the KV heads before any repeat, so the
    cache is exactly the baseline's size.
    """

    fields = ("k", "v")


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


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """``(B, T)`` int32 index of each token's document within its window of ``tokens`` (``(B, T)``): 0 for the
    first (which may have begun before the window), one more after every ``eos_id``; the separator belongs to
    the document it ends."""
    after_eos = (tokens[:, :-1] == eos_id).to(torch.int32)
    return F.pad(after_eos, (1, 0)).cumsum(1, dtype=torch.int32)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` int32 index of the first token of each token's document (``doc_ids`` from
    :func:`document_ids`); non-decreasing along each row, as the documents are contiguous."""
    t = doc_ids.shape[-1]
    first = F.pad(doc_ids[:, 1:] != doc_ids[:, :-1], (1, 0), value=True)
    index = torch.arange(t, device=doc_ids.device, dtype=torch.int32).expand_as(doc_ids)
    return torch.where(first, index, 0).cummax(1).values


def document_positions(starts: torch.Tensor) -> torch.Tensor:
    """RoPE positions that restart at every document: a token's index minus its document's start."""
    return torch.arange(starts.shape[-1], device=starts.device, dtype=starts.dtype) - starts


def same_document(doc_ids: torch.Tensor):
    """``flex_attention``'s ``mask_mod`` of block-diagonal causal attention over ``doc_ids`` (``(B, T)``)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


class DocumentMask(NamedTuple):
    """Attention limited to each token's document within packed windows (block-diagonal causal), built once
    per batch by :meth:`build`: query ``i`` sees keys ``starts[i] .. i``. ``block_mask`` is the
    ``flex_attention`` block mask of the same pattern where that kernel runs (CUDA), else None."""

    starts: torch.Tensor
    block_mask: object | None = None

    @classmethod
    def build(cls, doc_ids: torch.Tensor, flex: bool | None = None) -> DocumentMask:
        """From ``doc_ids`` (``(B, T)``, see :func:`document_ids`); ``flex`` (default: on CUDA) also builds the
        ``flex_attention`` block mask, once for every layer."""
        block_mask = None
        if doc_ids.is_cuda if flex is None else flex:
            from torch.nn.attention.flex_attention import create_block_mask

            b, t = doc_ids.shape
            block_mask = create_block_mask(same_document(doc_ids), b, None, t, t, device=doc_ids.device)
        return cls(document_starts(doc_ids), block_mask)

    def dense(self) -> torch.Tensor:
        """The boolean ``(B, 1, T, T)`` mask (True = may attend), for torch's SDPA and the eager kernels."""
        index = torch.arange(self.starts.shape[-1], device=self.starts.device)
        return ((index[None, :] <= index[:, None]) & (index[None, None, :] >= self.starts[:, :, None]))[:, None]


_flex_attention = None


def flex_attention(q, k, v, block_mask) -> torch.Tensor:
    """``torch.nn.attention.flex_attention`` compiled once (uncompiled it materialises the scores)."""
    global _flex_attention
    if _flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _flex_attention = torch.compile(flex, dynamic=False)
    return _flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


def attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled scores ``(B, H, T, S)`` in fp32, K repeated to the query heads. ``q``: ``(B, H, T, D)``."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])


def mask_logits(scores: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    if is_causal:
        mask = build_mask(scores.shape[-2], scores.shape[-1] - scores.shape[-2], None, scores.device)
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def weighted_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``probs`` (``(B, H, T, S)``) times V repeated to the query heads."""
    v = v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)
    return probs.to(v.dtype) @ v


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    documents: DocumentMask | None = None,
) -> torch.Tensor:
    """Reference attention: explicit K/V repeat, scores, fp32 softmax. ``q``: ``(B, H, T, D)``; ``documents``
    replaces ``mask`` and ``is_causal`` by its explicit mask."""
    if documents is not None:
        mask, is_causal = documents.dense(), False
    return weighted_values(torch.softmax(mask_logits(attention_logits(q, k), mask, is_causal), dim=-1), v)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
    documents: DocumentMask | None = None,
) -> torch.Tensor:
    """The fast kernel for the inputs: kha's kernel (CPU bf16 training), ``flex_attention`` (a document mask
    with its block mask), else torch's SDPA (a document mask as its explicit mask)."""
    if documents is not None:
        if documents.block_mask is not None:
            return flex_attention(q, k, v, documents.block_mask)
        if cpu_kernels.attention_applies(q, k, v, None):
            return cpu_kernels.attention(q, k, v, True, documents.starts)
        mask, is_causal = documents.dense(), False
    if cpu_kernels.attention_applies(q, k, v, mask):
        return cpu_kernels.attention(q, k, v, is_causal)
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


class AttentionBase(nn.Module):
    """What every attention variant shares; subclasses build ``o_proj`` and ``knocks`` and implement
    ``qkv`` (Q, K, V as ``(B, heads, T or S, dim)``, extending the cache) and ``knock_projections``.

    ``forward(x, positions=None, attention_mask=None, cache=None, impl=None, documents=None)``:
    ``x`` is ``(B, T, d_model)``; ``positions`` (``(T,)`` or ``(B, T)``) feed RoPE and default to
    ``cache.length + arange(T)``; ``attention_mask`` (``(B, past + T)``, 1 = real token) hides padding;
    ``cache`` (from :meth:`new_cache`) is extended in place for incremental decoding; ``impl`` is
    ``"sdpa"`` or ``"eager"``, None meaning the variant's best kernel (``default_impl``); ``documents``
    (a :class:`DocumentMask`, without cache or padding) limits attention to each token's document.
    """

    cache_class: type[SequenceCache] = KVCache
    default_impl = "sdpa"
    cfg: AttentionConfig
    o_proj: nn.Linear
    knocks: nn.ModuleDict

    def new_cache(self) -> SequenceCache:
        """An empty cache of the kind this variant stores (callers need not know the variant)."""
        return self.cache_class()

    def _project(self, target: str, proj: nn.Linear, x: torch.Tensor, dim: int) -> torch.Tensor:
        """``proj(x)`` as ``(..., heads, dim)`` with the knock on ``target``, if any, in ``cfg.knock_form``."""
        if target not in self.knocks:
            return proj(x).unflatten(-1, (-1, dim))
        return self.knocks[target].project(proj, x, dim, self.cfg.knock_form)

    def resolve_impl(self, impl: str | None) -> str:
        impl = self.default_impl if impl is None else impl
        if impl not in _KERNELS:
            raise ValueError(f"unknown attention impl {impl!r}; valid are {', '.join(ATTENTION_IMPLS)}")
        return impl

    def qkv(
        self, x: torch.Tensor, positions: torch.Tensor, cache: SequenceCache | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(self, q, k, v, mask: torch.Tensor | None, is_causal: bool, impl: str,
               documents: DocumentMask | None = None) -> torch.Tensor:
        return _KERNELS[impl](q, k, v, mask, is_causal, documents)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: SequenceCache | None = None,
        impl: str | None = None,
        documents: DocumentMask | None = None,
    ) -> torch.Tensor:
        impl = self.resolve_impl(impl)
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected input of shape (batch, seq, {self.cfg.d_model}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        past = cache.length if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({b}, {past + t}) "
                "(batch, cached + new tokens)"
            )
        if documents is not None and (cache is not None or attention_mask is not None):
            raise ValueError("a document mask is for whole packed windows: pass it without cache or attention_mask")
        q, k, v = self.qkv(x, resolve_positions(positions, b, t, past, x.device), cache)
        mask, is_causal = None, False
        if attention_mask is not None or (past > 0 and t > 1):
            mask = build_mask(t, past, attention_mask, x.device)
        elif past == 0 and t > 1:  # a branch, not a value: under dynamic shapes SDPA needs a Python bool
            is_causal = True
        out = self.attend(q, k, v, mask, is_causal, impl, documents)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def knock_projections(self, target: str) -> list[nn.Linear]:
        """The projections whose output the knock on ``target`` transforms (where it folds)."""
        raise NotImplementedError

    def fold_knocks(self) -> None:
        """Absorb every linear knock into its projections (eq. 8) and drop it; see :func:`kha.fold_knocks`."""
        for target in list(self.knocks):
            for proj in self.knock_projections(target):
                fold_into_linear(proj, self.knocks[target], self.cfg.knock_dim(target))
            del self.knocks[target]
        self.cfg = replace(self.cfg, knock="none", knock_targets=None)


class Attention(AttentionBase):
    """Causal self-attention (MHA / GQA / MQA) with optional knocking-heads transforms.

    The forward signature and arguments are :class:`AttentionBase`'s; the cache is a :class:`KVCache`.
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

    def project(
        self, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V as ``(B, heads, T, head_dim)``: projections, knocks, QK-norm, RoPE."""
        hd = self.cfg.head_dim
        q = self._project("q", self.q_proj, x, hd)
        k = self._project("k", self.k_proj, x, hd)
        v = self._project("v", self.v_proj, x, hd)
        if (self.q_norm is not None and self.rotary is not None and cpu_kernels.fuses(q, self.q_norm.weight)
                and cpu_kernels.fuses(k, self.k_norm.weight)):
            cos, sin = self.rotary.cos_sin(positions)
            q = cpu_kernels.norm_rope(q, self.q_norm.weight, cos, sin, self.q_norm.eps)
            k = cpu_kernels.norm_rope(k, self.k_norm.weight, cos, sin, self.k_norm.eps)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def qkv(self, x, positions, cache):
        q, k, v = self.project(x, positions)
        if cache is not None:
            k, v = cache.update(k, v)
        return q, k, v

    def knock_projections(self, target: str) -> list[nn.Linear]:
        return [getattr(self, f"{target}_proj")]
