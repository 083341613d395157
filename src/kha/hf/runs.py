"""Training outputs <-> Hugging Face folders.

A ``kha train`` run leaves ``model.safetensors`` (DecoderLM keys; a tied LM head stored once) and
``model_config.json`` (``dataclasses.asdict`` of the ModelConfig).

- ``from_training_run(run_dir)`` -> ``KHAForCausalLM`` (then ``save_pretrained``).
- ``to_decoder_lm(model_or_folder)`` -> the ``DecoderLM`` (its ``cfg`` is the ModelConfig).
- ``save_training_run(model, out)`` writes the training format back.
- ``hf_tokenizer(tokenizer_json)``: a ``PreTrainedTokenizerFast`` around a ``kha data`` tokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..attention import AttentionConfig
from ..config import ModelConfig, MoEConfig
from ..data.tokenizer import EOS
from ..model import DecoderLM
from .config import KHAConfig
from .modeling import KHAForCausalLM

WEIGHTS, CONFIG = "model.safetensors", "model_config.json"


def model_config_from_dict(d: dict) -> ModelConfig:
    """The inverse of ``dataclasses.asdict(ModelConfig)`` (as written to ``model_config.json``)."""
    d = dict(d)
    attention = AttentionConfig(**d.pop("attention"))
    moe = d.pop("moe", None)
    return ModelConfig(attention=attention, moe=None if moe is None else MoEConfig(**moe), **d)


def load_state_into(model: DecoderLM, state: dict[str, torch.Tensor], source: str, may_miss=()) -> None:
    """Load ``state`` strictly, except a tied LM head (stored once, as the embedding) and the keys ``may_miss``."""
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - set(may_miss) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"{source} does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(result.unexpected_keys)}")


def uninitialised_model(config: KHAConfig) -> KHAForCausalLM:
    """A ``KHAForCausalLM`` whose random inits are skipped (weights to be loaded next); knocks, norms and
    rotary frequencies are built exact, not drawn."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return KHAForCausalLM(config)


def from_training_run(run_dir: str | os.PathLike) -> KHAForCausalLM:
    """The final weights of a ``kha train`` run as a ``KHAForCausalLM`` (same tensors, same logits)."""
    run = Path(run_dir)
    if not (run / CONFIG).exists() or not (run / WEIGHTS).exists():
        raise FileNotFoundError(f"{run}: no {WEIGHTS} + {CONFIG}; is it the --out folder of a finished `kha train`?")
    cfg = model_config_from_dict(json.loads((run / CONFIG).read_text()))
    model = uninitialised_model(KHAConfig.from_model_config(cfg))
    load_state_into(model.model, load_file(str(run / WEIGHTS)), str(run / WEIGHTS))
    return model


def to_decoder_lm(model: KHAForCausalLM | str | os.PathLike) -> DecoderLM:
    """The ``DecoderLM`` inside a ``KHAForCausalLM`` (or a saved KHA folder): shares its parameters."""
    if not isinstance(model, KHAForCausalLM):
        model = KHAForCausalLM.from_pretrained(model)
    return model.model


def save_training_run(model: KHAForCausalLM | DecoderLM, out: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``model_config.json`` as ``kha train`` does."""
    lm = model.model if isinstance(model, KHAForCausalLM) else model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    if lm.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(asdict(lm.cfg), indent=1))
    return out


def hf_tokenizer(tokenizer_json: str | os.PathLike):
    """A ``PreTrainedTokenizerFast`` for a ``kha data`` tokenizer (``<|endoftext|>`` as EOS and padding)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOS, pad_token=EOS)


def run_tokenizer(run_dir: str | os.PathLike) -> Path | None:
    """The ``tokenizer.json`` of the data a run trained on (from its ``train_config.json``), if still there."""
    train_cfg = Path(run_dir) / "train_config.json"
    if not train_cfg.exists():
        return None
    data = json.loads(train_cfg.read_text()).get("data")
    path = Path(data) / "tokenizer.json" if data else None
    return path if path is not None and path.exists() else None
