"""What ``kha train`` leaves in a run folder, read without transformers (``kha generate``, ``kha.hf.runs``).

A finished run holds ``model.safetensors`` (``DecoderLM`` keys; a tied LM head stored once) and
``model_config.json`` (``dataclasses.asdict`` of the ``ModelConfig``); ``train_config.json`` names its data folder,
whose ``tokenizer.json`` encoded the training text.

- ``model_config_from_dict``: the inverse of ``asdict(ModelConfig)``.
- ``load_safetensors``, ``load_state_into``: tensors from a file (a damaged one named), loaded strictly.
- ``load_run_model(run_dir)``: the run's final ``DecoderLM``.
- ``run_tokenizer(run_dir)``: the tokenizer of the data the run trained on, if still there.
- ``code_version()``: which code trained a stretch of a run (``train_config.json``'s ``trained_on``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import __version__, safe_io
from .attention import AttentionConfig
from .config import ModelConfig, MoEConfig
from .errors import UserError, read_json
from .model import DecoderLM

WEIGHTS, CONFIG = "model.safetensors", "model_config.json"


def model_config_from_dict(d: dict) -> ModelConfig:
    """The inverse of ``dataclasses.asdict(ModelConfig)`` (as written to ``model_config.json``)."""
    d = dict(d)
    attention = AttentionConfig(**d.pop("attention"))
    moe = d.pop("moe", None)
    return ModelConfig(attention=attention, moe=None if moe is None else MoEConfig(**moe), **d)


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


def load_state_into(model: DecoderLM, state: dict[str, torch.Tensor], source: str, may_miss=()) -> None:
    """Load ``state`` strictly, except a tied LM head (stored once, as the embedding) and the keys ``may_miss``."""
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - set(may_miss) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"{source} does not match its config: missing {sorted(missing)}, "
                         f"unexpected {sorted(result.unexpected_keys)}")


def read_model_config(run: Path) -> ModelConfig:
    """``run/model_config.json`` as a ``ModelConfig``, after checking that the run has its final weights too."""
    if not (run / CONFIG).exists() or not (run / WEIGHTS).exists():
        raise FileNotFoundError(f"{run}: no {WEIGHTS} + {CONFIG}; is it the --out folder of a finished `kha train`?")
    try:
        return model_config_from_dict(read_json(safe_io.inside(run / CONFIG, run)))
    except (TypeError, KeyError, AttributeError) as err:
        raise UserError(f"{run / CONFIG}: not a kha model config ({err})") from err


def load_run_model(run_dir: str | os.PathLike) -> DecoderLM:
    """The final weights of a ``kha train`` run as a ``DecoderLM`` (fp32, CPU, eval mode)."""
    run = Path(run_dir)
    cfg = read_model_config(run)
    model = DecoderLM(cfg)  # built for real, not on the meta device: its buffers (RoPE tables) are not stored
    load_state_into(model, load_safetensors(safe_io.inside(run / WEIGHTS, run)), str(run / WEIGHTS))
    return model.eval()


def run_tokenizer(run_dir: str | os.PathLike) -> Path | None:
    """The ``tokenizer.json`` of the data a run trained on (from its ``train_config.json``), if still there."""
    train_cfg = Path(run_dir) / "train_config.json"
    if not train_cfg.exists():
        return None
    data = read_json(safe_io.inside(train_cfg, run_dir)).get("data")
    path = Path(data) / "tokenizer.json" if data else None
    return path if path is not None and path.exists() else None


PACKAGE_DIR = Path(__file__).resolve().parent


def code_version(package: Path = PACKAGE_DIR, *also: Path) -> str:
    """kha's version and, when ``package`` is tracked in a git checkout, its commit: ``0.1.0+g<12 hex>``, with
    ``.dirty`` where tracked files in ``package`` (or in ``also``, paths of the same checkout) differ from that
    commit. A change of code that computes the same function still rounds differently, so a run records the code
    of each stretch it trained. Just the version where git, the checkout or the file is missing (an installed
    package), or an ``also`` path lies outside the checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:  # no optional locks: never blocks a commit running beside
        return subprocess.run(["git", "--no-optional-locks", "-C", str(package), *args], capture_output=True,
                              text=True, timeout=10)

    try:
        tracked = git("ls-files", "--error-unmatch", "--", "__init__.py")
        head = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      *(str(Path(path).resolve()) for path in also))
    except (OSError, subprocess.SubprocessError):
        return __version__
    if tracked.returncode or head.returncode or changed.returncode:  # not a checkout of kha, or a path outside it
        return __version__
    return f"{__version__}+g{head.stdout.strip()}{'.dirty' if changed.stdout.strip() else ''}"
