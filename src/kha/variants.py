"""Attention variants beyond MHA/GQA/MQA, and the factory that builds any of them from a config."""

from __future__ import annotations

from torch import nn

from .attention import Attention, AttentionConfig


def build_attention(cfg: AttentionConfig) -> nn.Module:
    """The attention module for ``cfg.variant``; every one shares ``Attention``'s forward signature."""
    if cfg.variant == "gqa":
        return Attention(cfg)
    raise AssertionError(f"unhandled variant {cfg.variant!r}")  # AttentionConfig validates the name
