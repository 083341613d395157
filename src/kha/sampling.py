"""Next-token sampling, the one implementation behind ``DecoderLM.generate`` and ``kha generate``.

``filter_logits(logits, top_k, top_p)``: keep the ``top_k`` most likely tokens, then the smallest set of
most likely tokens whose probability reaches ``top_p`` (nucleus sampling, Holtzman et al., 2020); the rest get
``-inf``. ``next_token(logits, temperature, top_k, top_p, generator)``: greedy at ``temperature=0``, else a draw
from ``softmax(filter(logits / temperature))``. ``check_sampling`` validates the settings with one-line errors.
"""

from __future__ import annotations

import math

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int | None) -> None:
    """One-line errors for bad settings; ``vocab_size`` None: not known yet (``top_k`` only checked >= 1)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and vocab_size is None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k}")
    if top_k is not None and vocab_size is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in 1..{vocab_size}, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits`` ``(B, V)`` with every token outside the top-k and the top-p nucleus set to ``-inf``.

    The nucleus keeps each token whose preceding (more likely) tokens hold less than ``top_p`` of the
    probability, so the most likely token always stays and ties at the boundary are resolved by sort order.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of ``logits`` ``(B, V)``, shape ``(B, 1)``."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
