"""Stock transformers checkpoints <-> KHA: retrofit (Qwen3/Llama -> KHA) and export (KHA-Linear -> Qwen3/Llama).

- ``retrofit(src, knock, targets)``: a dense ``Qwen3ForCausalLM`` or ``LlamaForCausalLM`` folder (safetensors)
  becomes a ``KHAForCausalLM`` with the same weights plus knocks at their identity init, so its logits are
  the original's. Qwen3 has QK RMSNorm, Llama none (``qk_norm=False``); both use rotate-half RoPE as kha.
  Refused, with the reason: other model types (Qwen3-MoE included), RoPE scaling, sliding windows,
  activations other than SiLU, MLP biases, and an attention output bias that is not zero.
- ``export(src, out)``: a KHA model whose knocks are linear (or absent) is folded (eq. 8) and written as a
  stock checkpoint that plain transformers loads: Qwen3 with QK-norm, Llama without. Non-linear knocks
  (MLP, gate), MoE FFNs and attention variants other than MHA/GQA/MQA have no stock counterpart: errors.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import safe_io
from ..errors import UserError, read_json
from ..knock import fold_knocks
from .config import KHAConfig
from .modeling import KHAForCausalLM
from .runs import STOCK_TYPES, load_kha_folder, load_safetensors, load_state_into, local_folder, uninitialised_model

# stock name (inside model.layers.N.) -> DecoderLM name (inside layers.N.)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    **{f"self_attn.{p}_proj.{w}": f"attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.{p}_proj.weight": f"ffn.{p}_proj.weight" for p in ("gate", "up", "down")},
}
_TOP_NAMES = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}
# files copied along with the weights (tokenizer and generation defaults)
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
               "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")


def _rename(name: str, layer_names: dict[str, str], top_names: dict[str, str], src_layer: str, dst_layer: str):
    if name in top_names:
        return top_names[name]
    m = re.fullmatch(rf"{re.escape(src_layer)}(\d+)\.(.+)", name)
    if m and m.group(2) in layer_names:
        return f"{dst_layer}{m.group(1)}.{layer_names[m.group(2)]}"
    return None


def read_safetensors(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint folder. Pickle checkpoints are refused."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or sharded index); only safetensors checkpoints "
                                "are read (pickle .bin files are never loaded)")
    state = {}
    for f in files:
        state.update(load_safetensors(safe_io.inside(folder / f, folder)))  # a name or link out of it: refused
    return state


def copy_side_files(src: str | os.PathLike, out: str | os.PathLike) -> None:
    """Copy the tokenizer and generation-config files of ``src`` (those present) into ``out``; a link leading out
    of ``src`` (say ``tokenizer.json`` to a private file) is refused, and none in ``out`` is written through."""
    src, out = Path(src), Path(out)
    for name in _SIDE_FILES:
        if (src / name).exists() and src.resolve() != out.resolve():
            safe_io.copy_file(src / name, src, out / name, out)


def _stock_config_to_kha(c, knock: str, targets) -> KHAConfig:
    kind = c.model_type
    if kind not in STOCK_TYPES:
        extra = " (Qwen3-MoE is not handled: only dense Qwen3 and Llama)" if "moe" in kind else ""
        raise ValueError(f"retrofit reads dense Qwen3 or Llama checkpoints (model_type qwen3 or llama), "
                         f"got model_type {kind!r}{extra}")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"the checkpoint uses RoPE scaling {rope!r}; kha implements plain RoPE (rope_type "
                         "'default', whole head), so the logits would differ: not supported")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"the checkpoint's FFN activation is {c.hidden_act!r}; kha's SwiGLU uses silu")
    if getattr(c, "mlp_bias", False):
        raise ValueError("the checkpoint has MLP biases (mlp_bias=True); kha's SwiGLU has none")
    layer_types = getattr(c, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"the checkpoint uses sliding-window attention (layer_types {layer_types}); "
                         "kha attends to the whole context: not supported")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    tokens = {k: getattr(c, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return KHAConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_theta=float(theta), tie_word_embeddings=bool(c.tie_word_embeddings),
        initializer_range=c.initializer_range, max_position_embeddings=c.max_position_embeddings,
        attention_bias=bool(getattr(c, "attention_bias", False)), qk_norm=kind == "qwen3",
        knock=knock, knock_targets=targets, **tokens,
    )


def retrofit(src: str | os.PathLike, knock: str = "mlp", targets=None) -> KHAForCausalLM:
    """A KHA model from a stock Qwen3/Llama folder: same weights (in their dtype), knocks at identity."""
    from transformers import AutoConfig

    if not (local_folder(src, "retrofit") / "config.json").exists():
        raise UserError(f"{src}: no config.json; retrofit reads a transformers checkpoint folder (save_pretrained)")
    config = _stock_config_to_kha(AutoConfig.from_pretrained(src), knock, targets)
    state, mapped, unknown = read_safetensors(src), {}, []
    for name, tensor in state.items():
        if name.endswith("self_attn.o_proj.bias"):
            if torch.count_nonzero(tensor):
                raise ValueError(f"{name} is not zero: kha's attention output projection has no bias")
            continue
        new = _rename(name, _LAYER_NAMES, _TOP_NAMES, "model.layers.", "layers.")
        if new is None:
            if "rotary_emb.inv_freq" not in name:
                unknown.append(name)
            continue
        mapped[new] = tensor
    if unknown:
        raise ValueError(f"{src}: tensors with no KHA counterpart: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    model = uninitialised_model(config)  # knocks built exact (identity/zero), everything else loaded
    knock_keys = [k for k in model.model.state_dict() if ".knocks." in k]
    load_state_into(model.model, mapped, str(src), may_miss=knock_keys)
    return model.to(mapped["embed.weight"].dtype)


def export_problems(config: KHAConfig) -> list[str]:
    """Why a KHA model cannot become a stock Qwen3/Llama checkpoint (empty when it can)."""
    problems = []
    if config.moe is not None:
        problems.append("its FFNs are mixtures of experts: the export target is a dense stock model "
                        "(Qwen3-MoE is not handled: its router differs from kha's loss-free-balanced one)")
    if config.attention_variant != "gqa":
        problems.append(f"its attention is {config.attention_variant.upper()}: stock Qwen3/Llama implement only "
                        "MHA/GQA/MQA (kha variant 'gqa')")
    if config.knock in ("mlp", "gate"):
        problems.append(f"its {config.knock} knock on {','.join(config.knock_targets)} is non-linear in the head "
                        "features, so it cannot fold into the projections (only KHA-Linear folds, eq. 8) and no "
                        "stock architecture computes it; keep it as a KHA model (save_pretrained)")
    if not config.rope:
        problems.append("it has no RoPE (rope=False), which stock Qwen3/Llama always apply")
    if config.qk_norm and config.qk_norm_eps != config.rms_norm_eps:
        problems.append(f"its QK-norm epsilon ({config.qk_norm_eps}) differs from rms_norm_eps "
                        f"({config.rms_norm_eps}); Qwen3 uses one epsilon for both")
    return problems


def _stock_config(config: KHAConfig, dtype: torch.dtype):
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.attention_bias, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, dtype=dtype,
    )
    if config.qk_norm:
        cfg = Qwen3Config(**common)
        cfg.architectures = ["Qwen3ForCausalLM"]
    else:
        cfg = LlamaConfig(**common)
        cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def export(src: KHAForCausalLM | str | os.PathLike, out: str | os.PathLike) -> str:
    """Fold the linear knocks of a KHA model (object or folder) and write a stock checkpoint to ``out``.

    Returns the stock model type written (``"qwen3"`` with QK-norm, ``"llama"`` without).
    """
    model = src if isinstance(src, KHAForCausalLM) else load_kha_folder(src, "export")
    problems = export_problems(model.config)
    if problems:
        raise ValueError("cannot export to a stock transformers checkpoint: " + "; ".join(problems))
    dtype = model.model.embed.weight.dtype
    lm = fold_knocks(copy.deepcopy(model.model).float())  # fold in fp32, store in the model's dtype
    tensors = {}
    for name, tensor in lm.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        stock = _rename(name, {v: k for k, v in _LAYER_NAMES.items()}, {v: k for k, v in _TOP_NAMES.items()},
                        "layers.", "model.layers.")
        if stock is None:
            raise ValueError(f"{name} has no counterpart in a stock checkpoint")
        tensors[stock] = tensor.to(dtype).contiguous()
        if stock.endswith("self_attn.q_proj.bias"):  # stock attention_bias also biases o_proj: zero adds nothing
            tensors[stock.replace("q_proj", "o_proj")] = torch.zeros(model.config.hidden_size, dtype=dtype)
    out = Path(out)
    stock_cfg = _stock_config(model.config, dtype)
    with safe_io.staged_folder(out) as stage:  # moved into out file by file, never through a link there
        stock_cfg.save_pretrained(stage)
        save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
        if not isinstance(src, KHAForCausalLM):
            copy_side_files(Path(src), stage)  # a refused side file leaves out untouched
    return stock_cfg.model_type
