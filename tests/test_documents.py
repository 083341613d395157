"""Document masking of packed windows: document ids, the masks, every attention variant and the model against an
explicit per-document reference (each document run on its own), flex_attention's mask, and training with it.

Tolerances: fp32 paths that only reorder sums agree within 1e-5 (as tests/test_variants.py); under CPU bf16
autocast the packed and per-document runs round differently, so they agree within 3e-2 (bf16 spacing near 1 is
2^-7, a few roundings deep).
"""

from __future__ import annotations

import json

import pytest
import torch

from kha import AttentionConfig, cpu_kernels
from kha.attention import (
    DocumentMask,
    document_ids,
    document_positions,
    document_starts,
    eager_attention,
    same_document,
)
from kha.config import ModelConfig
from kha.model import DecoderLM
from kha.variants import build_attention

from conftest import HEAD_LAYOUTS, perturb

FP32 = dict(rtol=1e-5, atol=1e-5)
BF16 = dict(rtol=3e-2, atol=3e-2)
EOS = 0

# windows of 13 tokens, EOS marked by position: several documents with one of a single token (the EOS at 3 alone)
# and one ending at the window's last token; one whole window inside a document (begun before it, as a window cut
# mid-document is); one whose first token is a document's EOS (a one-token document at position 0).
EOS_AT = ([2, 3, 9], [], [0, 12])
LENGTH = 13

VARIANTS = {
    **{name: dict(n_heads=h, n_kv_heads=kv) for name, (h, kv) in HEAD_LAYOUTS.items()},
    "gqa-mlp": dict(n_heads=8, n_kv_heads=2, knock="mlp"),
    "gta": dict(variant="gta", n_heads=8, n_kv_heads=2),
    "mla": dict(variant="mla", n_heads=4, rope_head_dim=8, kv_lora_rank=32),
    "gla": dict(variant="gla", n_heads=8, n_kv_heads=4, rope_head_dim=8, kv_lora_rank=32, latent_groups=2),
    "talking": dict(variant="talking", n_heads=8, n_kv_heads=2),
}
CASES = [(name, impl) for name in VARIANTS for impl in ("sdpa", "eager") if not (name == "talking" and impl == "sdpa")]


def window_tokens(eos_at=EOS_AT, length=LENGTH, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (len(eos_at), length), generator=g)
    for row, places in enumerate(eos_at):
        tokens[row, places] = EOS
    return tokens


def segments(eos_at=EOS_AT, length=LENGTH) -> list[list[tuple[int, int]]]:
    """Per row, the documents as [start, end) from the EOS positions: written out independently of the code."""
    out = []
    for places in eos_at:
        bounds = [0] + [p + 1 for p in places if p + 1 < length] + [length]
        out.append(list(zip(bounds[:-1], bounds[1:], strict=True)))
    return out


def test_document_ids_starts_and_positions():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 0, 3], [0, 4, 4, 4, 4, 4, 0], [1, 2, 3, 4, 5, 6, 7]])
    ids = document_ids(tokens, EOS)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1], [0] * 7]
    starts = document_starts(ids)
    assert starts.tolist() == [[0, 0, 2, 2, 2, 5, 6], [0, 1, 1, 1, 1, 1, 1], [0] * 7]
    assert document_positions(starts).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5], list(range(7))]


def test_dense_mask_and_flex_mask_mod_are_block_diagonal_causal():
    """Query i may attend key j iff j <= i and both lie in the same document (from :func:`segments`)."""
    ids = document_ids(window_tokens(), EOS)
    expected = torch.zeros(len(EOS_AT), LENGTH, LENGTH, dtype=torch.bool)
    for row, docs in enumerate(segments()):
        for start, end in docs:
            expected[row, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(DocumentMask.build(ids, flex=False).dense()[:, 0], expected)
    index = torch.arange(LENGTH)
    rows = torch.arange(len(EOS_AT))[:, None, None]
    mod = same_document(ids)(rows, 0, index[None, :, None], index[None, None, :])
    assert torch.equal(mod, expected)


def test_flex_attention_matches_the_explicit_mask():
    """The CUDA path's kernel: compiled ``flex_attention`` with the block mask built from the document ids, run
    here on CPU (forward only: torch's flex_attention has no CPU backward), against the eager reference with the
    explicit mask; fp32 within 1e-5. Windows of 128 tokens: the block mask's blocks are 128 x 128."""
    tokens = window_tokens(([5, 6, 70, 127], [], [0, 64]), 128)
    ids = document_ids(tokens, EOS)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, 128, 16, generator=g)
    k, v = (torch.randn(3, 2, 128, 16, generator=g) for _ in range(2))
    flex = DocumentMask.build(ids, flex=True)
    assert flex.block_mask is not None
    from kha.attention import flex_attention

    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v, flex.block_mask),
                                   eager_attention(q, k, v, None, False, DocumentMask.build(ids)), **FP32)


def module_for(name: str, seed: int = 0):
    torch.manual_seed(seed)
    module = build_attention(AttentionConfig(d_model=48, head_dim=16, **VARIANTS[name]))
    perturb(module, seed=seed + 1)  # norms and knocks away from their start: every parameter matters
    return module


def packed_and_per_document(module, impl, x, restart: bool):
    """Outputs and gradients (input, every parameter) of the packed windows under the document mask, and of
    the same documents run one by one (RoPE positions from 0, or from their window index for ``continue``)."""
    ids = document_ids(window_tokens(), EOS)
    documents = DocumentMask.build(ids, flex=False)
    positions = document_positions(documents.starts) if restart else None
    upstream = torch.randn(x.shape[0], x.shape[1], module.cfg.d_model, generator=torch.Generator().manual_seed(7))
    params = list(module.parameters())

    def run(fn):
        xi = x.clone().requires_grad_()
        out = fn(xi)
        grads = torch.autograd.grad((out * upstream).sum(), [xi, *params])
        return out.detach(), grads

    packed = run(lambda xi: module(xi, positions=positions, impl=impl, documents=documents))

    def alone(xi):
        rows = []
        for row, docs in enumerate(segments()):
            parts = [module(xi[row:row + 1, s:e], positions=torch.arange(e - s) + (0 if restart else s), impl=impl)
                     for s, e in docs]
            rows.append(torch.cat(parts, dim=1))
        return torch.cat(rows)

    return packed, run(alone)


@pytest.mark.parametrize("name,impl", CASES)
@pytest.mark.parametrize("positions", ["restart", "continue"])
def test_every_variant_matches_documents_run_alone(name, impl, positions):
    """Forward and backward (input and parameter gradients), fp32, within 1e-5."""
    module = module_for(name)
    x = torch.randn(len(EOS_AT), LENGTH, 48, generator=torch.Generator().manual_seed(3))
    (out, grads), (ref_out, ref_grads) = packed_and_per_document(module, impl, x, positions == "restart")
    torch.testing.assert_close(out, ref_out, **FP32)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **FP32)


@pytest.mark.parametrize("name", ["gqa", "mla"])
def test_under_cpu_bf16_autocast(name):
    """The training precision's dtype path (SDPA with the explicit mask where kha's AMX kernel does not run)."""
    module = module_for(name)
    x = torch.randn(len(EOS_AT), LENGTH, 48, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (out, grads), (ref_out, ref_grads) = packed_and_per_document(module, "sdpa", x, True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out.float(), **BF16)
    torch.testing.assert_close(grads[0].float(), ref_grads[0].float(), **BF16)


def tiny_model(n_layers: int = 2) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(attention=AttentionConfig(d_model=48, n_heads=4, n_kv_heads=2, head_dim=16),
                      n_layers=n_layers, d_ff=64, vocab_size=50, max_seq_len=64)
    model = DecoderLM(cfg)
    perturb(model, scale=0.05)
    return model


def test_model_matches_documents_run_alone_and_positions_options_agree():
    """Logits of the doc-masked model == each document alone (fp32, 1e-5); the ``continue`` positions give the
    same logits up to rounding (RoPE sees only differences within a document); without the mask they differ."""
    model = tiny_model()
    tokens = window_tokens()
    ids = document_ids(tokens, EOS)
    with torch.no_grad():
        logits = model(tokens, doc_ids=ids).logits
        alone = torch.cat([torch.cat([model(tokens[r:r + 1, s:e]).logits for s, e in docs], 1)
                           for r, docs in enumerate(segments())])
        torch.testing.assert_close(logits, alone, **FP32)
        torch.testing.assert_close(model(tokens, doc_ids=ids, doc_positions="continue").logits, logits, **FP32)
        assert (model(tokens).logits - logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="doc_positions"):
        model(tokens, doc_ids=ids, doc_positions="reset")


def test_compiles_fullgraph_with_the_mask():
    """``torch.compile(fullgraph=True)`` of the model with document ids: loss and gradients as eager (1e-5)."""
    model = tiny_model(n_layers=1)
    tokens = window_tokens()
    ids = document_ids(tokens, EOS)

    def step(fn):
        model.zero_grad()
        loss = fn(tokens, targets=tokens, doc_ids=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step(model)
    compiled_loss, compiled_grads = step(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled_loss, loss, **FP32)
    for got, want in zip(compiled_grads, grads, strict=True):
        torch.testing.assert_close(got, want, **FP32)


def test_mask_refused_with_cache_or_padding():
    model = tiny_model()
    tokens = window_tokens()
    with pytest.raises(ValueError, match="document mask"):
        model(tokens, doc_ids=document_ids(tokens, EOS), caches=model.new_caches())
    with pytest.raises(ValueError, match="doc_ids has shape"):
        model(tokens, doc_ids=document_ids(tokens, EOS)[:, :-1])


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """A corpus of many short documents, so that most windows of 32 tokens cross a document boundary."""
    import random

    from kha.data.prepare import prepare

    root = tmp_path_factory.mktemp("short_docs")
    docs = root / "docs"
    docs.mkdir()
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree red blue and or then".split()
    for i in range(160):
        (docs / f"d{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(2, 25))))
    out = root / "data"
    prepare([str(docs)], out, vocab_size=300, val_fraction=0.2, seed=0, verbose=False)
    return out


def test_cli_train_with_doc_mask_records_it_and_evaluates_with_it(short_docs, tmp_path, capsys):
    """``kha train --doc-mask``: the setting is in train_config.json, the logged validation loss is the
    final weights' loss with the mask (1e-5) and not the one without it; resuming without the mask is refused."""
    from safetensors.torch import load_file

    from kha.cli import main
    from kha.data.loader import TokenBatches
    from kha.data.prepare import read_manifest
    from kha.hf.runs import load_state_into, model_config_from_dict

    out = tmp_path / "run"
    common = ["train", "--preset", "tiny", "--data", str(short_docs), "--out", str(out), "--seq-len", "32",
              "--batch-size", "4", "--eval-every", "4", "--eval-batches", "2", "--ckpt-every", "2",
              "--precision", "fp32", "--no-progress"]
    assert main([*common, "--steps", "4", "--doc-mask"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["doc_mask"] is True and saved["doc_positions"] == "restart"
    val_loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    model = DecoderLM(model_config_from_dict(json.loads((out / "model_config.json").read_text())))
    load_state_into(model, load_file(str(out / "model.safetensors")), "final weights")
    eos = read_manifest(short_docs)["tokenizer"]["eos_id"]
    masked, plain = [], []
    with torch.no_grad():
        for inputs, targets in TokenBatches(short_docs, "val", 4, 32).val_batches(2):
            assert (inputs == eos).any()
            masked.append(model(inputs, targets=targets, doc_ids=document_ids(inputs, eos)).loss)
            plain.append(model(inputs, targets=targets).loss)
    assert val_loss == pytest.approx(torch.stack(masked).mean().item(), abs=1e-5)
    assert abs(val_loss - torch.stack(plain).mean().item()) > 1e-3
    capsys.readouterr()
    assert main([*common, "--steps", "6", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "doc_mask=True" in err and "--doc-mask" in err


# ------------------------------------------------------------------------------ kha's attention kernel

amx = pytest.mark.skipif(not cpu_kernels.prepare(), reason="no AVX512-BF16 CPU or no C++ compiler")

# batch, heads, KV heads, length, head_dim; per row the first tokens of its documents after the first (what
# follows each EOS). Cases: a one-token document (5) and a boundary on a block edge (64); query block 2 whose
# documents start at 130, so key blocks 0 and 1 are skipped; a window inside one document (plain causal); a
# first document of one token and one of one token at the end; dQ taken over two chunks of 8 key blocks with the
# first chunk partly or wholly skipped; MQA and MHA.
KERNEL_CASES = [
    (2, 4, 2, 192, 32, ([5, 6, 64, 130], [])),
    (2, 2, 2, 128, 64, ([1, 63, 127], [64])),
    (1, 4, 1, 640, 32, ([300, 301, 520],)),
    (1, 2, 2, 576, 48, ([70, 512, 575],)),
]


def starts_of(bounds, length: int) -> torch.Tensor:
    """Per row, each query's first key: the last document start at or before it."""
    rows = []
    for row in bounds:
        firsts = torch.tensor([0, *row])
        rows.append(firsts[torch.searchsorted(firsts, torch.arange(length), right=True) - 1])
    return torch.stack(rows).int()


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@amx
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_amx_kernel_with_documents_matches_reference(case, two_threads):
    """Output and gradients of the kernel with per-row document starts against fp32 SDPA with the explicit
    block-diagonal causal mask on the same bf16 inputs, within tests/test_cpu_kernels.py's bound (1.5x torch's
    own bf16 SDPA error with that mask, plus 1e-3; below 2 % of the reference's largest entry)."""
    from test_cpu_kernels import inputs, within_bf16_error

    *dims, bounds = case
    batch, heads, kv_heads, length, head_dim = dims
    starts = starts_of(bounds, length)
    mask = DocumentMask(starts).dense()
    q, k, v, grad = inputs(*dims)
    bf16 = [x.bfloat16() for x in (q, k, v)]

    def grads(fn, *xs, upstream):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs)
        return out.detach(), torch.autograd.grad(out, xs, upstream.to(out.dtype))

    def sdpa(q_, k_, v_):
        return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask,
                                                                enable_gqa=heads != kv_heads)

    ref_out, ref = grads(sdpa, *(x.float() for x in bf16), upstream=grad.bfloat16().float())
    torch_out, torch_bf16 = grads(sdpa, *bf16, upstream=grad)
    out, ours = grads(lambda *xs: cpu_kernels.attention(*xs, True, starts), *bf16, upstream=grad)
    within_bf16_error("out", out, torch_out, ref_out)
    for name, g, t, r in zip("qkv", ours, torch_bf16, ref, strict=True):
        within_bf16_error(f"d{name}", g, t, r)


@amx
def test_amx_kernel_runs_the_model_path_and_refuses_bad_starts(two_threads, monkeypatch):
    """``sdpa_attention`` with a document mask takes the kernel under CPU bf16 autocast (the same numbers as
    calling it directly); starts that are not a document mask's (past their query, decreasing) are refused."""
    from kha.attention import sdpa_attention
    from test_cpu_kernels import count_calls, inputs

    q, k, v, grad = inputs(2, 4, 2, 128, 32)
    documents = DocumentMask(starts_of(([5, 64], [100]), 128))
    calls = count_calls(monkeypatch)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_attention(*leaves, None, True, documents)
    monkeypatch.undo()
    assert calls == [1]
    direct = cpu_kernels.attention(*(x.bfloat16() for x in (q, k, v)), True, documents.starts)
    assert torch.equal(out, direct)
    bad = documents.starts.clone()
    bad[0, 10] = 11
    with pytest.raises(RuntimeError, match="document starts"):
        cpu_kernels.attention(*(x.bfloat16() for x in (q, k, v)), True, bad)
