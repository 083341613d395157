"""How many training windows of a prepared corpus cross a document boundary (study v2, docs/results.md).

``kha.data.loader.TokenBatches`` cuts each split into non-overlapping windows of ``seq_len + 1`` tokens. A
window crosses a boundary when an end-of-document token is among its ``seq_len`` inputs: without a document
mask, the tokens after it attend to the end of another document. Also printed: the share of input tokens
whose context reaches back into an earlier document, and the windows of the evaluated validation batches.

Usage: python docs/results/study2/boundaries.py DATA_DIR SEQ_LEN [EVAL_WINDOWS]
"""

import sys
from pathlib import Path

import numpy as np

from kha.data.prepare import read_manifest


def main(data: str, seq_len: int, eval_windows: int | None) -> None:
    manifest = read_manifest(data)
    eos = manifest["tokenizer"]["eos_id"]
    for split, info in manifest["splits"].items():
        tokens = np.memmap(Path(data) / info["file"], dtype=manifest["dtype"], mode="r")
        n = len(tokens) // (seq_len + 1)
        if split == "val" and eval_windows:
            n = min(n, eval_windows)  # validation evaluates the first windows, in order
        inputs = np.asarray(tokens[: n * (seq_len + 1)]).reshape(n, seq_len + 1)[:, :seq_len]
        is_eos = inputs == eos
        crossing = is_eos.any(axis=1)
        first = np.where(crossing, is_eos.argmax(axis=1), seq_len - 1)
        across = int((seq_len - 1 - first).sum())  # inputs after the first boundary of their window
        print(f"{split}: {info['num_documents']:,} documents, {len(tokens):,} tokens; {n:,} windows of {seq_len} "
              f"inputs; {int(crossing.sum()):,} cross a document boundary ({crossing.mean():.1%}); "
              f"{across / inputs.size:.1%} of input tokens see an earlier document")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
