"""Training outputs <-> Hugging Face folders.

A ``kha train`` run leaves ``model.safetensors`` (DecoderLM keys; a tied LM head stored once) and
``model_config.json`` (``dataclasses.asdict`` of the ModelConfig).

- ``from_training_run(run_dir)`` -> ``KHAForCausalLM`` (then ``save_pretrained``).
- ``to_decoder_lm(model_or_folder)`` -> the ``DecoderLM`` (its ``cfg`` is the ModelConfig).
- ``save_training_run(model, out)`` writes the training format back.
- ``hf_tokenizer(tokenizer_json)``: a ``PreTrainedTokenizerFast`` around a ``kha data`` tokenizer.
- ``local_folder``, ``load_kha_folder``: read what a user points at, with clear errors for a missing folder, a
  damaged file or a folder that holds another kind of model (run folders are read by ``kha.runfiles``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import save_file

from .. import safe_io
from ..data.tokenizer import EOS
from ..errors import UserError, read_json
from ..model import DecoderLM
from ..runfiles import (  # noqa: F401  (model_config_from_dict, run_tokenizer: part of this module's interface)
    CONFIG,
    WEIGHTS,
    load_safetensors,
    load_state_into,
    model_config_from_dict,
    read_model_config,
    run_tokenizer,
)
from .config import KHAConfig
from .modeling import KHAForCausalLM

STOCK_TYPES = ("qwen3", "llama")


def local_folder(path: str | os.PathLike, command: str) -> Path:
    """``path`` as an existing folder. Hub ids are not fetched (these commands read local folders)."""
    folder = Path(path)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise UserError(f"{path}: {what}; {command} reads a local model folder (a Hugging Face Hub model must be "
                        "downloaded first, which needs a network: `hf download ORG/NAME --local-dir DIR`)")
    return folder


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


def uninitialised_model(config: KHAConfig) -> KHAForCausalLM:
    """A ``KHAForCausalLM`` whose random inits are skipped (weights to be loaded next); knocks, norms and
    rotary frequencies are built exact, not drawn."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return KHAForCausalLM(config)


def from_training_run(run_dir: str | os.PathLike, **config_kwargs) -> KHAForCausalLM:
    """The final weights of a ``kha train`` run as a ``KHAForCausalLM`` (same tensors, same logits);
    ``config_kwargs`` add transformers config fields (``eos_token_id`` ...)."""
    run = Path(run_dir)
    cfg = read_model_config(run)
    model = uninitialised_model(KHAConfig.from_model_config(cfg, **config_kwargs))
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
