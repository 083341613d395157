"""Hugging Face ecosystem: KHA as a transformers model, retrofit from and export to stock checkpoints.

``import kha.hf`` registers ``KHAConfig`` (model_type ``"kha"``) and ``KHAForCausalLM`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads KHA folders without
``trust_remote_code``. Needs ``pip install 'kha[hf-models]'`` (transformers >= 5).

- ``config.py``: ``KHAConfig`` <-> ``kha.config.ModelConfig``.
- ``modeling.py``: ``KHAForCausalLM`` (``DecoderLM`` inside; ``generate()`` with transformers' KV cache).
- ``stock.py``: ``retrofit`` (Qwen3/Llama -> KHA, identical logits), ``export`` (KHA-Linear -> stock Qwen3/Llama).
- ``runs.py``: ``kha train`` outputs <-> HF folders (``from_training_run``, ``to_decoder_lm``, ``save_training_run``).
- ``kha/hf_cli.py`` (outside, so the ``kha`` command does not import transformers): ``kha retrofit``,
  ``kha export``, ``kha hf-convert``.
"""

from importlib.util import find_spec

if find_spec("transformers") is None:

    def __getattr__(name: str):
        raise ImportError(f"kha.hf.{name} needs transformers>=5: pip install 'kha[hf-models]'")

else:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import KHAConfig
    from .modeling import KHAForCausalLM
    from .runs import from_training_run, hf_tokenizer, save_training_run, to_decoder_lm
    from .stock import export, retrofit

    AutoConfig.register(KHAConfig.model_type, KHAConfig, exist_ok=True)
    AutoModelForCausalLM.register(KHAConfig, KHAForCausalLM, exist_ok=True)

    __all__ = ["KHAConfig", "KHAForCausalLM", "export", "from_training_run", "hf_tokenizer", "retrofit",
               "save_training_run", "to_decoder_lm"]
