"""Training outputs <-> Hugging Face folders.

A ``kha train`` run leaves ``model.safetensors`` (DecoderLM keys; a tied LM head stored once) and
``model_config.json`` (``dataclasses.asdict`` of the ModelConfig).

- ``from_training_run(run_dir)`` -> ``KHAForCausalLM`` (then ``save_pretrained``).
- ``to_decoder_lm(model_or_folder)`` -> the ``DecoderLM`` (its ``cfg`` is the ModelConfig).
- ``save_training_run(model, out)`` writes the training format back.
- ``hf_tokenizer(tokenizer_json)``: a ``PreTrainedTokenizerFast`` around a ``kha data`` tokenizer.
- ``local_folder``, ``load_safetensors``, ``load_kha_folder``: read what a user points at, with clear errors for a
  missing folder, a damaged file or a folder that holds another kind of model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .. import safe_io
from ..attention import AttentionConfig
from ..config import ModelConfig, MoEConfig
from ..data.tokenizer import EOS
from ..errors import UserError, read_json
from ..model import DecoderLM
from .config import KHAConfig
from .modeling import KHAForCausalLM

WEIGHTS, CONFIG = "model.safetensors", "model_config.json"
STOCK_TYPES = ("qwen3", "llama")


def local_folder(path: str | os.PathLike, command: str) -> Path:
    """``path`` as an existing folder. Hub ids are not fetched (these commands read local folders)."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise UserError(f"{path}: {what}; {command} reads a local model folder (a Hugging Face Hub model must be "
                        "downloaded first, which needs a network: `hf download ORG/NAME --local-dir DIR`)")
    return folder


def load_safetensors(path: str | os.PathLike, header_only: bool = False) -> dict[str, torch.Tensor] | None:
    """``safetensors.torch.load_file`` (``header_only``: just check the file); a truncated or corrupt file is an
    error naming it."""
    try:
        if header_only:
            with safe_open(str(path), "pt"):
                return None
        return load_file(str(path))
    except SafetensorError as err:
        raise UserError(f"{path}: damaged safetensors file ({err}); write or download it again") from err


def load_kha_folder(path: str | os.PathLike, command: str) -> KHAForCausalLM:
    """``KHAForCausalLM.from_pretrained`` of a local KHA folder, refusing stock and other models by name."""
    folder = local_folder(path, command)
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json; {command} reads a KHA folder written by save_pretrained "
                        "(kha retrofit, kha hf-convert)")
    kind = read_json(folder / "config.json").get("model_type")
    if kind in STOCK_TYPES:
        raise UserError(f"{folder} holds a stock {kind} model, not a KHA one: it already loads without kha, so there "
                        f"is nothing to {command}; `kha retrofit --from {folder}` turns it into a KHA model")
    if kind != KHAConfig.model_type:
        raise UserError(f"{folder}: model_type {kind!r}, not a KHA model (model_type 'kha')")
    for weights in folder.glob("*.safetensors"):  # a damaged file (or a link out) named here, not inside transformers
        load_safetensors(safe_io.inside(weights, folder), header_only=True)
    return KHAForCausalLM.from_pretrained(folder)


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
    try:
        cfg = model_config_from_dict(read_json(safe_io.inside(run / CONFIG, run)))
    except (TypeError, KeyError) as err:
        raise UserError(f"{run / CONFIG}: not a kha model config ({err})") from err
    model = uninitialised_model(KHAConfig.from_model_config(cfg))
    load_state_into(model.model, load_safetensors(safe_io.inside(run / WEIGHTS, run)), str(run / WEIGHTS))
    return model


def to_decoder_lm(model: KHAForCausalLM | str | os.PathLike) -> DecoderLM:
    """The ``DecoderLM`` inside a ``KHAForCausalLM`` (or a saved KHA folder): shares its parameters."""
    if not isinstance(model, KHAForCausalLM):
        model = load_kha_folder(model, "convert")
    return model.model


def save_training_run(model: KHAForCausalLM | DecoderLM, out: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``model_config.json`` as ``kha train`` does."""
    lm = model.model if isinstance(model, KHAForCausalLM) else model
    out = safe_io.make_dirs(out)
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()}
    if lm.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    with safe_io.atomic_output(out / WEIGHTS, out) as tmp:
        save_file(state, str(tmp))
    safe_io.write_text(out / CONFIG, json.dumps(asdict(lm.cfg), indent=1), out)
    return out


def hf_tokenizer(tokenizer_json: str | os.PathLike):
    """A ``PreTrainedTokenizerFast`` for a ``kha data`` tokenizer (``<|endoftext|>`` as EOS and padding)."""
    from transformers import PreTrainedTokenizerFast

    from ..data.tokenizer import load_tokenizer

    load_tokenizer(tokenizer_json)  # a file that is no tokenizer.json, or has no EOS, is named here
    return PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOS, pad_token=EOS)


def run_tokenizer(run_dir: str | os.PathLike) -> Path | None:
    """The ``tokenizer.json`` of the data a run trained on (from its ``train_config.json``), if still there."""
    train_cfg = Path(run_dir) / "train_config.json"
    if not train_cfg.exists():
        return None
    data = read_json(train_cfg).get("data")
    path = Path(data) / "tokenizer.json" if data else None
    return path if path is not None and path.exists() else None
