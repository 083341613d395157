"""``kha generate FOLDER --prompt TEXT``: sample continuations from a trained model, streamed as they come.

- ``load_generator(folder)``: the model and tokenizer of a ``kha train`` run folder (its final
  ``model.safetensors`` + ``model_config.json``; a run without final weights is refused, naming its newest
  checkpoint) or of a Hugging Face KHA folder (``kha hf-convert``; needs transformers). The tokenizer is the
  folder's own ``tokenizer.json``, else (a run) the one of the data it trained on, or ``--tokenizer``.
- ``generate_text``: one prompt. The prompt is encoded after one ``<|endoftext|>`` (every training document
  follows one, so the prompt reads as the start of a document; an empty prompt samples a document from scratch),
  continued with ``DecoderLM.generate`` (KV cache, ``kha.sampling``) until ``<|endoftext|>`` or
  ``max_new_tokens``. Text is written as tokens arrive, held back while it ends inside a multi-byte character.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import safe_io
from .data.tokenizer import EOS, load_tokenizer
from .errors import UserError
from .model import DecoderLM
from .sampling import check_sampling

TOKENIZER = "tokenizer.json"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


@dataclass
class Sampling:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0


def _no_weights(folder: Path) -> UserError:
    ckpts = sorted((folder / "checkpoints").glob("step_*"))
    if ckpts:
        return UserError(f"{folder}: no final model.safetensors + model_config.json: the run has not finished "
                         f"(newest checkpoint {ckpts[-1].name}); finish it with `kha train ... --out {folder} "
                         "--resume`, then generate")
    return UserError(f"{folder}: no model weights (model.safetensors + model_config.json of a finished `kha train`, "
                     "or config.json of a Hugging Face KHA folder)")


def load_generator(folder: str, tokenizer: str | None = None):
    """``(DecoderLM in eval mode, tokenizers.Tokenizer)`` for a run folder or a Hugging Face KHA folder."""
    from .runfiles import CONFIG, WEIGHTS, load_run_model, run_tokenizer

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{folder}: {'is a file, not a folder' if path.exists() else 'no such folder'}; "
                        "kha generate reads a `kha train` run folder or a Hugging Face KHA folder")
    if (path / WEIGHTS).exists() and (path / CONFIG).exists():
        model = load_run_model(path)
    elif (path / "config.json").exists():
        from .hf.runs import load_kha_folder

        model = load_kha_folder(path, "generate").model.float().eval()
    else:
        raise _no_weights(path)
    own = path / TOKENIZER
    tok_path = Path(tokenizer) if tokenizer else safe_io.inside(own, path) if own.exists() else run_tokenizer(path)
    if tok_path is None:
        raise UserError(f"{folder}: no tokenizer.json here, and the data folder named in its train_config.json has "
                        "none (moved or deleted?); pass --tokenizer FILE (the data folder's tokenizer.json)")
    tok = load_tokenizer(tok_path)
    if tok.get_vocab_size() > model.cfg.vocab_size:
        raise UserError(f"{tok_path}: {tok.get_vocab_size()} token ids, more than the model's vocabulary of "
                        f"{model.cfg.vocab_size}: not the tokenizer this model was trained with")
    return model, tok


class TextStream:
    """Decodes a growing list of token ids and hands out only the new, complete text."""

    def __init__(self, tok, write: Callable[[str], object]):
        self.tok, self.write, self.ids, self.shown = tok, write, [], 0

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):  # a character whose bytes have not all arrived yet
            self._show(text)

    def close(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        self._show(text)
        return text

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)


def check_settings(s: Sampling, vocab_size: int | None) -> None:
    if s.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be a positive integer, got {s.max_new_tokens}")
    check_sampling(s.temperature, s.top_k, s.top_p, vocab_size)
    if not 0 <= s.seed <= MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, {MAX_SEED}] (2**64 - 1), got {s.seed}")


@torch.no_grad()
def generate_text(model: DecoderLM, tok, prompt: str, settings: Sampling,
                  write: Callable[[str], object] = lambda text: None) -> str:
    """The continuation of ``prompt`` (without the final ``<|endoftext|>``), written piece by piece to ``write``."""
    check_settings(settings, model.cfg.vocab_size)
    eos = tok.token_to_id(EOS)
    ids = [eos, *tok.encode(prompt, add_special_tokens=False).ids]
    limit = model.cfg.max_seq_len
    if len(ids) + settings.max_new_tokens > limit:
        raise UserError(f"the prompt ({len(ids)} tokens with the leading {EOS}) plus --max-new-tokens "
                        f"{settings.max_new_tokens} exceed the model's max_seq_len {limit}; shorten one of them")
    device = model.embed.weight.device
    generator = torch.Generator(device).manual_seed(settings.seed)
    stream = TextStream(tok, write)

    def on_token(token: torch.Tensor) -> None:
        if int(token) != eos:
            stream.add(int(token))

    model.generate(torch.tensor([ids], device=device), settings.max_new_tokens, settings.temperature,
                   settings.top_k, generator, settings.top_p, eos_token_id=eos, on_token=on_token)
    return stream.close()


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err})") from err
        found = [line for line in lines if line.strip()]
        if not found:
            raise UserError(f"{path}: no prompt in it (one prompt per line; blank lines are skipped)")
        prompts += found
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT (repeatable; '' samples from scratch) or --prompts-file FILE")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    settings = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    prompts = read_prompts(args)  # a bad prompt or setting fails before the model loads
    check_settings(settings, None)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available here; use --device cpu")
    model, tok = load_generator(args.folder, args.tokenizer)
    if args.device != "cpu":
        model = model.to(args.device)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    for i, prompt in enumerate(prompts):
        if i:
            write("\n\n")
        write(prompt)
        generate_text(model, tok, prompt, settings, write)
    write("\n")
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="sample continuations of prompts from a trained run or a Hugging Face KHA "
                       "folder, streamed", description="Print each prompt followed by the model's continuation, as "
                       "it is sampled (KV cache), until <|endoftext|> or --max-new-tokens.")
    p.add_argument("folder", metavar="RUN_OR_HF_DIR", help="a finished `kha train` run or a `kha hf-convert` folder")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeat for more)")
    p.add_argument("--prompts-file", default=None, metavar="FILE", help="one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens per continuation (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens holding probability P (default: 1, all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0); same seed, same text")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="tokenizer.json (default: the folder's own, else the run's data tokenizer)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    p.set_defaults(func=cmd_generate)
