"""``KHAConfig``: a transformers config (model_type ``"kha"``) that maps one to one onto ``kha.config.ModelConfig``.

The names transformers' generation and cache code read are the standard ones (``num_hidden_layers``,
``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``vocab_size``,
``intermediate_size``, ``rms_norm_eps``, ``rope_theta``, ``tie_word_embeddings``); the kha-only fields
(knock, attention variant, latent ranks, MoE) keep kha's names. ``to_model_config()`` and
``from_model_config()`` convert without loss.
"""

from __future__ import annotations

from dataclasses import asdict

from transformers import PreTrainedConfig

from ..attention import AttentionConfig
from ..config import ModelConfig, MoEConfig


class KHAConfig(PreTrainedConfig):
    """Defaults are the ``tiny`` preset (dense, GQA 32 query / 4 KV heads of 16, no knock).

    ``qk_norm_eps`` is the QK-RMSNorm epsilon (None: ``rms_norm_eps``); ``moe`` is None (dense) or a dict of
    :class:`kha.config.MoEConfig` fields. Invalid combinations fail here with kha's error messages.
    """

    model_type = "kha"

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 128,
        intermediate_size: int = 384,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 4,
        head_dim: int | None = 16,
        rms_norm_eps: float = 1e-6,
        qk_norm_eps: float | None = None,
        rope_theta: float = 1_000_000.0,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 4096,
        attention_bias: bool = False,
        qk_norm: bool = True,
        rope: bool = True,
        attention_variant: str = "gqa",
        knock: str = "none",
        knock_targets: list[str] | str | None = None,
        knock_form: str = "fused",
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = None,
        rope_head_dim: int = 64,
        latent_groups: int = 2,
        moe: dict | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.rms_norm_eps = rms_norm_eps
        self.qk_norm_eps = rms_norm_eps if qk_norm_eps is None else qk_norm_eps
        self.rope_theta = rope_theta
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.qk_norm = qk_norm
        self.rope = rope
        self.attention_variant = attention_variant
        self.knock, self.knock_form = knock, knock_form
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.rope_head_dim = rope_head_dim
        self.latent_groups = latent_groups
        self.moe = None if moe is None else dict(moe)
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.head_dim = head_dim
        self.knock_targets = knock_targets
        # validate with kha's checks and store the resolved values (head_dim, knock targets)
        attn = self.to_model_config().attention
        self.head_dim, self.knock_targets = attn.head_dim, list(attn.knock_targets)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    def to_model_config(self) -> ModelConfig:
        """The equivalent :class:`kha.config.ModelConfig`."""
        attention = AttentionConfig(
            d_model=self.hidden_size, n_heads=self.num_attention_heads, n_kv_heads=self.num_key_value_heads,
            variant=self.attention_variant, head_dim=self.head_dim, knock=self.knock,
            knock_targets=None if self.knock_targets is None else tuple(self.knock_targets),
            knock_form=self.knock_form, qk_norm=self.qk_norm, rope=self.rope, rope_theta=self.rope_theta,
            qkv_bias=self.attention_bias,
            norm_eps=self.qk_norm_eps, kv_lora_rank=self.kv_lora_rank, q_lora_rank=self.q_lora_rank,
            rope_head_dim=self.rope_head_dim, latent_groups=self.latent_groups,
        )
        return ModelConfig(
            attention=attention, n_layers=self.num_hidden_layers, d_ff=self.intermediate_size,
            vocab_size=self.vocab_size, moe=None if self.moe is None else MoEConfig(**self.moe),
            tie_embeddings=self.tie_word_embeddings, norm_eps=self.rms_norm_eps, init_std=self.initializer_range,
            max_seq_len=self.max_position_embeddings,
        )

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> KHAConfig:
        """A ``KHAConfig`` for ``cfg``; ``kwargs`` add transformers fields (``eos_token_id`` ...)."""
        a = cfg.attention
        return cls(
            vocab_size=cfg.vocab_size, hidden_size=a.d_model, intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
            head_dim=a.head_dim, rms_norm_eps=cfg.norm_eps, qk_norm_eps=a.norm_eps, rope_theta=a.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
            max_position_embeddings=cfg.max_seq_len, attention_bias=a.qkv_bias, qk_norm=a.qk_norm, rope=a.rope,
            attention_variant=a.variant, knock=a.knock, knock_targets=list(a.knock_targets),
            knock_form=a.knock_form, kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank,
            rope_head_dim=a.rope_head_dim,
            latent_groups=a.latent_groups, moe=None if cfg.moe is None else asdict(cfg.moe), **kwargs,
        )
