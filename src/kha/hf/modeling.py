"""``KHAForCausalLM``: ``kha.model.DecoderLM`` as a transformers ``PreTrainedModel`` with ``generate()``.

- The model is the ``DecoderLM`` itself (``self.model``; every key is ``model.`` + the DecoderLM key), so
  training weights, HF weights and ``kha.hf.to_decoder_lm`` are the same tensors under one prefix.
- KV cache: transformers' own ``Cache`` (``DynamicCache``, built by ``generate()`` from the standard config
  names). Each layer sees its slot through :class:`CacheLayer`, which offers what a kha cache offers
  (``length``, ``update``); every kha cache kind (GQA K/V, GTA tied state + RoPE key, MLA latent + RoPE key)
  grows along dim -2, as transformers' cache layers do.
- Initialisation: a model built from a config has exactly ``DecoderLM(cfg)``'s weights (kha's init, same
  random stream) and ``post_init()`` leaves them alone. Weights missing from a checkpoint are initialised by
  ``_init_weights`` through transformers' guarded init functions, which never touch loaded tensors: knocks
  identity/zero, norms one, rotary frequencies recomputed.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..attention import RMSNorm, RotaryEmbedding
from ..knock import GateKnock, LinearKnock, MLPKnock
from ..model import DecoderLM, MoE, Router
from ..variants import TalkingHeadsAttention
from .config import KHAConfig

# the output's cache field: ``cache`` from transformers 5.24 on, ``past_key_values`` before
_CACHE_FIELD = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class CacheLayer:
    """Layer ``idx`` of a transformers ``Cache``, used where kha's attention expects its own cache."""

    def __init__(self, cache, idx: int):
        self.cache, self.idx = cache, idx

    @property
    def length(self) -> int:
        return self.cache.get_seq_length(self.idx)

    def update(self, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.cache.update(*states, self.idx)


class KHAPreTrainedModel(PreTrainedModel):
    config_class = KHAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, LinearKnock):
            init.eye_(module.weight)
        elif isinstance(module, MLPKnock):
            init.eye_(module.w_up)
            init.zeros_(module.w_gate)
            init.eye_(module.w_down)
        elif isinstance(module, GateKnock):
            init.zeros_(module.w_gate)
        elif isinstance(module, TalkingHeadsAttention):
            init.eye_(module.logits_mix)
            init.eye_(module.weights_mix)
        elif isinstance(module, MoE):
            for w in (module.w_gate, module.w_up, module.w_down):
                init.normal_(w, std=std)
        elif isinstance(module, Router):
            init.normal_(module.weight, std=std)
            init.zeros_(module.expert_bias)
            init.zeros_(module.tokens_per_expert)
        elif isinstance(module, RotaryEmbedding):
            fresh = RotaryEmbedding(2 * module.inv_freq.numel(), self.config.rope_theta).inv_freq
            init.copy_(module.inv_freq, fresh)


class KHAForCausalLM(KHAPreTrainedModel, GenerationMixin):
    """Causal LM on a :class:`kha.model.DecoderLM`; ``forward`` follows transformers' causal-LM conventions."""

    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # applied only if tie_word_embeddings

    def __init__(self, config: KHAConfig):
        super().__init__(config)
        self.model = DecoderLM(config.to_model_config())
        if self.model.embed.weight.device.type != "meta":  # meta: from_pretrained loads, then inits what is missing
            # kha's own init just ran (identity/zero knocks): mark it done so post_init() re-initialises nothing
            for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                tensor._is_hf_initialized = True
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``labels`` are the inputs (shifted here, -100 ignored); ``attention_mask`` is the 2-D
        ``(batch, cached + new)`` padding mask; ``logits_to_keep`` > 0 keeps only the last positions' logits."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        m = self.model
        x = m.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if past_key_values is None:  # transformers >= 5.24 names it ``cache``
            past_key_values = kwargs.get("cache")
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"KHA takes a 2-D (batch, cached + new tokens) attention_mask, got shape "
                                 f"{tuple(attention_mask.shape)}")
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: the causal fast path
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[0] != x.shape[0]:
            position_ids = position_ids.expand(x.shape[0], -1)
        impl = "eager" if self.config._attn_implementation == "eager" else None
        for i, layer in enumerate(m.layers):
            cache = None if past_key_values is None else CacheLayer(past_key_values, i)
            x = layer(x, position_ids, attention_mask, cache, impl)
        hidden = m.norm(x)
        logits = m.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values})
