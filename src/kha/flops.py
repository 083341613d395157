"""Parameter and FLOP accounting for attention layers with knocks (paper section 3.4, eq. 10-12).

Convention, as in the paper: every matmul counts 2 FLOPs per multiply-add, once. The paper calls these
"training FLOPs"; a forward + backward pass is 3x each figure, which leaves every ratio unchanged
(``LayerFlops.training`` gives that). Attention scores count the full ``L x L`` matrix (eq. 10), and the
element-wise work of the MLP and gate knocks (sigmoid, products) is not counted, as in eq. 12.

With ``d_k = d/n`` and ``d_ff = 3d`` this reproduces the paper exactly: attention ``8Ld^2 + 4L^2d``,
layer ``26Ld^2 + 4L^2d``, knocks ``6Ld^2/n`` for both KHA-Linear on Q, K, V and KHA-MLP on V.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attention import AttentionConfig
from .knock import MATRICES_PER_KNOCK


def heads_of(cfg: AttentionConfig, target: str) -> int:
    """How many heads a knock on ``target`` transforms (KV heads for k and v, before any repeat).

    GTA's ``k`` knock acts on its single shared RoPE key.
    """
    if target == "q":
        return cfg.n_heads
    return 1 if cfg.variant == "gta" and target == "k" else cfg.n_kv_heads


def knock_params(cfg: AttentionConfig) -> int:
    """Parameters the knocks add to one layer: ``knock_dim^2`` per matrix, per target."""
    return MATRICES_PER_KNOCK[cfg.knock] * sum(cfg.knock_dim(t) ** 2 for t in cfg.knock_targets)


def input_projections(cfg: AttentionConfig) -> list[tuple[int, int]]:
    """``(in, out)`` features of every projection between the layer input and Q, K, V."""
    d, hd, n, nkv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    if cfg.variant in ("gqa", "talking"):
        return [(d, n * hd), (d, nkv * hd), (d, nkv * hd)]
    if cfg.variant == "gta":  # queries, tied states, the shared RoPE key
        return [(d, n * hd), (d, nkv * hd), (d, hd // 2)]
    # MLA / GLA: optional query latent, query parts, KV latent, RoPE key, per-group K and V up-projections
    rd, groups = cfg.rope_head_dim, cfg.n_latents
    q_in = d if cfg.q_lora_rank is None else cfg.q_lora_rank
    q = [(q_in, n * hd), (q_in, n * rd)] + ([] if cfg.q_lora_rank is None else [(d, cfg.q_lora_rank)])
    up = (cfg.kv_lora_rank // groups, nkv // groups * hd)
    return q + [(d, cfg.kv_lora_rank), (d, rd)] + [up] * (2 * groups)


def attention_params(cfg: AttentionConfig) -> int:
    """Parameters of one baseline attention layer of any variant (projections, biases, norms, talking-heads
    mixing), knocks excluded."""
    projections = input_projections(cfg)
    params = sum(i * o for i, o in projections) + cfg.n_heads * cfg.head_dim * cfg.d_model
    if cfg.qkv_bias:  # MLA/GLA refuse biases
        params += sum(o for _, o in projections)
    if cfg.qk_norm:
        if cfg.n_latents:
            params += cfg.kv_lora_rank + (cfg.q_lora_rank or 0)
        else:
            params += 2 * cfg.head_dim  # GTA: query head + two key halves
    if cfg.variant == "talking":
        params += 2 * cfg.n_heads**2
    return params


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of one decoder layer over one sequence of ``seq_len`` tokens (paper convention)."""

    qkv: int
    scores: int
    output: int
    ffn: int
    knock: int

    @property
    def attention(self) -> int:
        """Eq. 10: Q/K/V projections + scores and attention-value products + output projection."""
        return self.qkv + self.scores + self.output

    @property
    def layer(self) -> int:
        """Eq. 11: the baseline layer (attention + FFN), the denominator of the paper's 0.55 %."""
        return self.attention + self.ffn

    @property
    def knock_share_of_layer(self) -> float:
        return self.knock / self.layer

    @property
    def knock_share_of_attention(self) -> float:
        return self.knock / self.attention

    def training(self) -> int:
        """Forward + backward FLOPs of the knocked layer (3x the one-pass count)."""
        return 3 * (self.layer + self.knock)


def layer_flops(cfg: AttentionConfig, seq_len: int, d_ff: int | None = None) -> LayerFlops:
    """Per-layer FLOPs for attention ``cfg`` (any variant, any knock) with a SwiGLU FFN.

    ``d_ff`` defaults to ``3 * d_model`` as in the paper's eq. 11. ``qkv`` counts every projection from
    the input to Q, K, V (MLA/GLA: down- and up-projections, all positions); ``scores`` counts QK^T over
    the query-key width (``head_dim + rope_head_dim`` for MLA/GLA) and the weights times V, plus the two
    head-mixing matmuls of talking-heads attention.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    d, hd, n = cfg.d_model, cfg.head_dim, cfg.n_heads
    d_ff = 3 * d if d_ff is None else d_ff
    per_matrix = MATRICES_PER_KNOCK[cfg.knock]
    qk_dim = hd + (cfg.rope_head_dim if cfg.n_latents else 0)
    scores = 2 * n * seq_len**2 * (qk_dim + hd)
    if cfg.variant == "talking":
        scores += 2 * 2 * seq_len**2 * n**2
    return LayerFlops(
        qkv=2 * seq_len * sum(i * o for i, o in input_projections(cfg)),
        scores=scores,
        output=2 * seq_len * n * hd * d,
        ffn=3 * 2 * seq_len * d * d_ff,
        knock=sum(2 * seq_len * heads_of(cfg, t) * cfg.knock_dim(t) ** 2 * per_matrix for t in cfg.knock_targets),
    )


def paper_example() -> dict[str, LayerFlops]:
    """The paper's section 3.4 example (L=2048, d=1024, n=32) for KHA-Linear (QKV) and KHA-MLP (V)."""
    return {
        knock: layer_flops(AttentionConfig(d_model=1024, n_heads=32, knock=knock), seq_len=2048)
        for knock in ("linear", "mlp")
    }


def model_flops_per_token(cfg, seq_len: int) -> int:
    """Training FLOPs per token of a :class:`kha.config.ModelConfig` (forward + backward, 3x one pass).

    ``6 x`` the activated parameters that take part in matmuls (the tied LM head included, the embedding
    lookup not; knocks excluded), plus per layer the knocks (applied once per head, eq. 12) and the
    attention scores and attention-value products over the full ``seq_len`` window (eq. 10 convention).
    """
    from .model import count_parameters

    attn = cfg.attention
    params = count_parameters(cfg)["activated"] - cfg.n_layers * knock_params(attn)
    if not cfg.tie_embeddings:
        params -= cfg.vocab_size * cfg.d_model
    per_layer = layer_flops(attn, seq_len)
    return 6 * params + 3 * cfg.n_layers * (per_layer.knock + per_layer.scores) // seq_len


# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s).
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device) -> float | None:
    """Peak bf16 FLOP/s of a known CUDA GPU (None when unknown), for MFU."""
    import torch

    if getattr(device, "type", device) != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16.items() if key in name), None)
