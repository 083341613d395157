"""kha: Knocking-Heads Attention (Zhou et al., 2025) in PyTorch."""

__version__ = "0.1.0"  # first: modules read it while the package initialises

from .attention import Attention, AttentionConfig, KVCache
from .knock import fold_knocks

__all__ = ["Attention", "AttentionConfig", "KVCache", "fold_knocks"]
