"""Hugging Face integration: KHAForCausalLM (init, save/load, generate), retrofit from stock Qwen3/Llama, export to
stock checkpoints, training-run conversion and lm_eval's HF interface. Everything offline, fp32, tiny shapes."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here; read by huggingface_hub at import
transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from kha import AttentionConfig  # noqa: E402
from kha.cli import main  # noqa: E402
from kha.config import ModelConfig, MoEConfig  # noqa: E402
from kha.hf import (  # noqa: E402
    KHAConfig,
    KHAForCausalLM,
    export,
    from_training_run,
    retrofit,
    save_training_run,
    to_decoder_lm,
)
from kha.knock import GateKnock, LinearKnock, MLPKnock  # noqa: E402
from kha.model import DecoderLM  # noqa: E402

from conftest import perturb  # noqa: E402

EQUIV = dict(rtol=0, atol=1e-5)  # fp32 logits of two implementations of the same function (max |diff|)
EXACT = dict(rtol=0, atol=0)  # the same tensors through a format round trip


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def small_config(knock="none", targets=None, variant="gqa", moe=None, tie=True, **attention) -> ModelConfig:
    if variant in ("mla", "gla"):
        attention = dict(kv_lora_rank=16, rope_head_dim=4, **attention)
    attn = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, variant=variant, knock=knock,
                           knock_targets=targets, **attention)
    return ModelConfig(attention=attn, n_layers=2, d_ff=64, vocab_size=97, moe=moe, tie_embeddings=tie)


CONFIGS = {
    "gqa-mlp": small_config("mlp"),
    "gqa-linear-untied": small_config("linear", tie=False),
    "gqa-mlp-plain-form": small_config("mlp", knock_form="plain"),
    "gta-mlp": small_config("mlp", variant="gta"),
    "mla-linear": small_config("linear", variant="mla"),
    "talking-gate": small_config("gate", variant="talking"),
    "moe-linear": small_config("linear", moe=MoEConfig(n_experts=4, top_k=2, d_expert=16)),
}


def trained_like(cfg: ModelConfig, seed: int = 0) -> KHAForCausalLM:
    """A KHA model with every parameter (knocks, norms, MoE biases) moved off its init."""
    torch.manual_seed(seed)
    model = KHAForCausalLM(KHAConfig.from_model_config(cfg))
    perturb(model, scale=0.1, seed=seed + 1)
    for buf_name, buf in model.named_buffers():
        if buf_name.endswith("expert_bias"):
            buf.copy_(0.05 * torch.randn(buf.shape))
    return model.eval()


def tokens(batch=2, length=7, vocab=97, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **EXACT, msg=k)


# --- config and init -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_json(name):
    cfg = CONFIGS[name]
    hf = KHAConfig.from_model_config(cfg)
    assert hf.to_model_config() == cfg
    assert KHAConfig.from_dict(json.loads(hf.to_json_string())).to_model_config() == cfg
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim,
            hf.intermediate_size, hf.vocab_size) == (2, 32, 4, 2, 8, 64, 97)


def test_invalid_config_fails_with_kha_message():
    with pytest.raises(ValueError, match="MLA supports knock='linear'"):
        KHAConfig(hidden_size=32, num_attention_heads=4, attention_variant="mla", knock="mlp")


@pytest.mark.parametrize("name", ["gqa-mlp", "gqa-linear-untied", "talking-gate", "moe-linear"])
def test_built_from_config_is_decoder_lm_init_with_identity_knocks(name):
    """post_init() re-initialises nothing: the weights are DecoderLM's under the same seed, knocks identity/zero."""
    cfg = CONFIGS[name]
    torch.manual_seed(3)
    model = KHAForCausalLM(KHAConfig.from_model_config(cfg))
    torch.manual_seed(3)
    reference = DecoderLM(cfg)
    assert_same_state(model.model.state_dict(), reference.state_dict())
    knocks = [m for m in model.modules() if isinstance(m, (LinearKnock, MLPKnock, GateKnock))]
    assert len(knocks) == 2 * len(cfg.attention.knock_targets)
    eye = torch.eye(8)
    for k in knocks:
        for p_name, p in k.named_parameters():
            torch.testing.assert_close(p.detach(), torch.zeros(8, 8) if p_name == "w_gate" else eye, **EXACT)
    if cfg.tie_embeddings:
        assert model.model.lm_head.weight is model.model.embed.weight


def test_knocks_missing_from_a_checkpoint_are_initialised_to_identity(tmp_path):
    """A baseline checkpoint loaded into a knocked config: _init_weights fills the knocks (identity/zero, through
    transformers' guarded init) and leaves every loaded weight alone, so the logits are the baseline's."""
    base = trained_like(small_config())
    base.save_pretrained(tmp_path)
    for knock in ("linear", "mlp", "gate"):
        cfg = KHAConfig.from_model_config(small_config(knock, targets="qkv"))
        knocked = KHAForCausalLM.from_pretrained(tmp_path, config=cfg).eval()
        for k in (m for m in knocked.modules() if isinstance(m, (LinearKnock, MLPKnock, GateKnock))):
            for p_name, p in k.named_parameters():
                torch.testing.assert_close(p.detach(), torch.zeros(8, 8) if p_name == "w_gate" else torch.eye(8),
                                           **EXACT)
        ids = tokens()
        with torch.no_grad():
            torch.testing.assert_close(knocked(ids).logits, base(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["gqa-mlp", "gqa-linear-untied", "moe-linear", "mla-linear"])
def test_save_and_auto_load_keep_trained_weights(name, tmp_path):
    model = trained_like(CONFIGS[name])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "kha"
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code: kha.hf registered
    assert isinstance(loaded, KHAForCausalLM)
    assert_same_state(loaded.model.state_dict(), model.model.state_dict())
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, **EXACT)


def test_labels_give_the_shifted_cross_entropy():
    model = trained_like(CONFIGS["gqa-mlp"])
    ids = tokens()
    targets = ids[:, 1:].clone()
    targets[0, :2] = -100
    labels = torch.cat((ids[:, :1], targets), dim=1)
    loss = model(ids, labels=labels).loss
    expected = model.model(ids[:, :-1], targets=targets).loss
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


# --- generate ----------------------------------------------------------------------------------------------------


def argmax_loop(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding by re-running the full forward on the whole sequence at every step (no cache)."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generate_greedy_equals_argmax_loop(name):
    model = trained_like(CONFIGS[name])
    ids = tokens(length=5)
    out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, argmax_loop(model, ids, 6))
    assert torch.equal(out, model.model.generate(ids, 6))  # kha's own cached decoding agrees too


def test_generate_left_padded_batch_equals_each_row_alone():
    model = trained_like(CONFIGS["gqa-mlp"])
    rows = [tokens(1, 6, seed=1)[0], tokens(1, 3, seed=2)[0]]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 6 - len(r):], mask[i, 6 - len(r):] = r, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(r[None], max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(out[i, 6:], alone[0, len(r):])


# --- retrofit and export -----------------------------------------------------------------------------------------


def stock_checkpoint(kind: str, folder: Path, tie: bool, seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny randomly initialised Qwen3ForCausalLM / LlamaForCausalLM (transformers' own classes), saved."""
    values = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie, max_position_embeddings=64,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5)
    values.update(overrides)
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**values))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values))
    perturb(model, scale=0.1, seed=seed + 1)  # norms off one, weights large enough to matter
    model.eval().save_pretrained(folder)
    return model


def max_logit_diff(a, b, ids) -> float:
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


@pytest.mark.parametrize("kind,tie", [("qwen3", True), ("qwen3", False), ("llama", True), ("llama", False)])
def test_retrofit_keeps_the_logits(kind, tie, tmp_path):
    stock = stock_checkpoint(kind, tmp_path / "stock", tie)
    (tmp_path / "stock" / "tokenizer.json").write_text("{}")  # side files travel with the weights
    assert main(["retrofit", "--from", str(tmp_path / "stock"), "--knock", "mlp", "--targets", "v",
                 "--out", str(tmp_path / "kha")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "kha").eval()
    assert isinstance(model, KHAForCausalLM) and model.config.knock == "mlp"
    assert model.config.qk_norm == (kind == "qwen3") and model.config.tie_word_embeddings == tie
    assert (tmp_path / "kha" / "tokenizer.json").exists()
    ids = tokens(2, 12)
    diff = max_logit_diff(model, stock, ids)
    print(f"retrofit {kind} tie={tie}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-5


def test_retrofit_attention_bias_needs_a_zero_output_bias(tmp_path):
    stock = stock_checkpoint("qwen3", tmp_path / "nonzero", tie=True, attention_bias=True)
    with pytest.raises(ValueError, match="o_proj.bias is not zero"):
        retrofit(tmp_path / "nonzero")
    with torch.no_grad():
        for layer in stock.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    stock.save_pretrained(tmp_path / "zero")
    model = retrofit(tmp_path / "zero", knock="linear").eval()
    assert model.config.attention_bias
    assert max_logit_diff(model, stock, tokens()) <= 1e-5


def test_retrofit_refuses_what_it_cannot_reproduce(tmp_path):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    llama3_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cases = {
        "rope": (transformers.LlamaConfig(**common, rope_parameters=llama3_rope), "RoPE scaling"),
        "moe": (transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
                "Qwen3-MoE is not handled"),
        "sliding": (transformers.Qwen3Config(**common, use_sliding_window=True, max_window_layers=0),
                    "sliding-window"),
        "mlp_bias": (transformers.LlamaConfig(**common, mlp_bias=True), "MLP biases"),
    }
    for name, (config, message) in cases.items():
        config.save_pretrained(tmp_path / name)  # the config is refused before any weight is read
        with pytest.raises(ValueError, match=message):
            retrofit(tmp_path / name)
    assert main(["retrofit", "--from", str(tmp_path / "rope"), "--out", str(tmp_path / "x")]) == 2


# Run in a fresh interpreter that never imports kha: plain transformers must load the exported folders.
_LOAD_STOCK = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
logits, names = {}, []
for i, folder in enumerate(sys.argv[3:]):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    names.append(type(model).__name__)
    with torch.no_grad():
        logits[str(i)] = model(ids).logits.contiguous()
assert not any(m == "kha" or m.startswith("kha.") for m in sys.modules), "kha was imported"
save_file(logits, sys.argv[2])
print(" ".join(names))
"""


def test_export_folds_linear_knocks_into_a_stock_checkpoint(tmp_path):
    """Stock -> KHA-Linear (knocks then moved off the identity, as training would) -> stock again, loaded by
    transformers alone: same logits as the KHA model."""
    cases = [("qwen3", True, {}), ("llama", False, {}), ("qwen3", False, {"attention_bias": True})]
    kha_models, exported = [], []
    for i, (kind, tie, extra) in enumerate(cases):
        stock = stock_checkpoint(kind, tmp_path / f"stock{i}", tie, seed=i, **extra)
        if extra:
            with torch.no_grad():
                for layer in stock.model.layers:
                    layer.self_attn.o_proj.bias.zero_()
            stock.save_pretrained(tmp_path / f"stock{i}")
        model = retrofit(tmp_path / f"stock{i}", knock="linear", targets="qkv")
        with torch.no_grad():
            for k in (m for m in model.modules() if isinstance(m, LinearKnock)):
                k.weight.add_(0.2 * torch.randn(k.weight.shape))
        model.eval().save_pretrained(tmp_path / f"kha{i}")
        assert main(["export", "--from", str(tmp_path / f"kha{i}"), "--out", str(tmp_path / f"out{i}")]) == 0
        stock_cfg = json.loads((tmp_path / f"out{i}" / "config.json").read_text())
        assert stock_cfg["model_type"] == kind and stock_cfg["tie_word_embeddings"] == tie
        kha_models.append(model)
        exported.append(str(tmp_path / f"out{i}"))
    ids = tokens(2, 12)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", _LOAD_STOCK, json.dumps(ids.tolist()), str(tmp_path / "logits.st"),
                          *exported], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM"]
    stock_logits = load_file(str(tmp_path / "logits.st"))
    for i, model in enumerate(kha_models):
        with torch.no_grad():
            diff = (stock_logits[str(i)] - model(ids).logits).abs().max().item()
        print(f"export {cases[i][0]} tie={cases[i][1]} {cases[i][2]}: max |logit diff| {diff:.2e}")
        assert diff <= 1e-5


@pytest.mark.parametrize("name,message", [("gqa-mlp", "non-linear"), ("talking-gate", "non-linear"), ("gta-mlp", "GTA"),
                                          ("mla-linear", "MLA"), ("moe-linear", "mixtures of experts")])
def test_export_refuses_models_without_a_stock_counterpart(name, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        export(trained_like(CONFIGS[name]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli_reports_the_reason(tmp_path, capsys):
    trained_like(CONFIGS["gqa-mlp"]).save_pretrained(tmp_path / "kha")
    assert main(["export", "--from", str(tmp_path / "kha"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot fold" in capsys.readouterr().err


# --- training runs <-> HF ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gqa-mlp", "gqa-linear-untied", "moe-linear"])
def test_training_run_round_trip(name, tmp_path):
    from types import SimpleNamespace

    from kha.train.loop import save_final_weights

    cfg = CONFIGS[name]
    lm = trained_like(cfg).model  # a DecoderLM as training leaves it
    (tmp_path / "run").mkdir()
    save_final_weights(lm, cfg, tmp_path / "run", SimpleNamespace(is_main=True))  # the trainer's own writer

    hf = from_training_run(tmp_path / "run").eval()
    assert hf.config.to_model_config() == cfg
    assert_same_state(hf.model.state_dict(), lm.state_dict())
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm(ids).logits, **EXACT)

    assert main(["hf-convert", "--from", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    back = to_decoder_lm(tmp_path / "hf")
    assert back.cfg == cfg
    assert_same_state(back.state_dict(), lm.state_dict())
    assert main(["hf-convert", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "run2")]) == 0
    assert_same_state(load_file(str(tmp_path / "run2" / "model.safetensors")),
                      load_file(str(tmp_path / "run" / "model.safetensors")))
    assert (json.loads((tmp_path / "run2" / "model_config.json").read_text())
            == json.loads((tmp_path / "run" / "model_config.json").read_text()))
    save_training_run(hf, tmp_path / "run3")
    assert_same_state(load_file(str(tmp_path / "run3" / "model.safetensors")),
                      load_file(str(tmp_path / "run" / "model.safetensors")))


def test_hf_convert_brings_the_run_tokenizer(tmp_path):
    """hf-convert finds the tokenizer of the data a run trained on and saves it as a transformers tokenizer."""
    from transformers import AutoTokenizer

    from kha.data.tokenizer import load_tokenizer, train_tokenizer

    (tmp_path / "data").mkdir()
    train_tokenizer(SENTENCES, vocab_size=300, path=tmp_path / "data" / "tokenizer.json")
    cfg = replace(CONFIGS["gqa-mlp"], vocab_size=300)
    save_training_run(DecoderLM(cfg), tmp_path / "run")
    (tmp_path / "run" / "train_config.json").write_text(json.dumps({"data": str(tmp_path / "data")}))
    assert main(["hf-convert", "--from", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the cat ran over the moon"
    assert tok.encode(text) == load_tokenizer(tmp_path / "data" / "tokenizer.json").encode(text).ids
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    # the config names it too, so transformers' generate() stops at the end of a document
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["pad_token_id"] == 0 and generation["eos_token_id"] == 0


# --- lm_eval ------------------------------------------------------------------------------------------------------

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the sun is hot and the moon is cold",
             "birds fly over the sea", "she reads a book at night", "we eat bread and cheese"]
MC_DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "sea", "bread"], "answer": 0},
    {"question": "Birds fly over the", "choices": ["night", "sea", "cat"], "answer": 1},
    {"question": "We eat bread and", "choices": ["moon", "park", "cheese"], "answer": 2},
    {"question": "The sun is", "choices": ["hot", "a book", "cold and the"], "answer": 0},
    {"question": "A dog ran in the", "choices": ["park", "mat"], "answer": 0},
]
TASK_YAML = """task: kha_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def continuation_logprob(model, tok, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenising as lm_eval does (the whole string, then split)."""
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), dim=-1)[0]
    positions = torch.arange(len(ctx) - 1, len(whole) - 1)
    return logp[positions, ids[0, len(ctx):]].sum().item()


def test_lm_eval_scores_a_saved_kha_model_on_a_local_task(tmp_path, monkeypatch):
    """lm_eval's HFLM loads a saved KHA folder through AutoModelForCausalLM and runs a local multiple-choice task;
    its per-choice log-likelihoods equal our own (1e-5) and its accuracy is the accuracy they imply."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))  # effective if datasets is not loaded yet
    lm_eval = pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from kha.data.tokenizer import train_tokenizer
    from kha.hf import hf_tokenizer

    train_tokenizer(SENTENCES * 4, vocab_size=300, path=tmp_path / "tokenizer.json")
    tok = hf_tokenizer(tmp_path / "tokenizer.json")
    model = trained_like(replace(CONFIGS["gqa-mlp"], vocab_size=len(tok)))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kha_tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "docs.jsonl"))

    lm = HFLM(pretrained=str(tmp_path / "model"), backend="causal", device="cpu", batch_size=4)
    assert isinstance(lm.model, KHAForCausalLM)
    tasks = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["kha_tiny_mc"], limit=len(MC_DOCS), log_samples=True,
                                  task_manager=tasks)
    samples = sorted(out["samples"]["kha_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC_DOCS)
    correct = []
    for doc, sample in zip(MC_DOCS, samples, strict=True):
        ours = [continuation_logprob(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        theirs = [ll for ll, _ in sample["filtered_resps"]]
        torch.testing.assert_close(torch.tensor(theirs), torch.tensor(ours), rtol=0, atol=1e-5)
        correct.append(float(max(range(len(ours)), key=ours.__getitem__) == doc["answer"]))
    assert out["results"]["kha_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct), abs=1e-12)
