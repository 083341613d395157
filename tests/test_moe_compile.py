"""MoE without host syncs: the expert forms against the per-expert loop, ``torch.compile(fullgraph=True)`` over MoE
models with every knock, the compiled layer's routing (``index_copy``) against eager's in fp32, no recompilation
while the routing changes, ``kha train --compile`` on an MoE preset, and the block compile scope."""

from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from kha.attention import AttentionConfig
from kha.cli import main
from kha.config import ModelConfig, MoEConfig
from kha.model import (
    DecoderLM,
    MoE,
    expert_counts,
    padded_layout,
    run_experts_grouped,
    run_experts_loop,
    run_experts_padded,
)

FP32 = dict(rtol=1e-5, atol=1e-5)
COUNTS = [5, 0, 17, 1, 9, 0, 32, 4]  # uneven, two experts without tokens


def moe_config(knock: str = "none") -> ModelConfig:
    attn = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, knock=knock)
    return ModelConfig(attention=attn, n_layers=1, d_ff=64, vocab_size=97,
                       moe=MoEConfig(n_experts=8, top_k=2, d_expert=16))


def test_padded_layout_aligns_every_group_and_keeps_the_rows_in_order():
    counts = torch.tensor(COUNTS)
    position, ends, size = padded_layout(counts, sum(COUNTS), 8)
    assert size == 72 + 8 * 7 and size % 8 == 0  # static: the rows plus the most padding 8 experts can need
    starts = torch.cat([ends.new_zeros(1), ends[:-1]]).long()
    assert ends.dtype == torch.int32 and ends[-1] == size and bool((starts % 8 == 0).all())
    first = torch.cumsum(counts, 0) - counts
    for e, n in enumerate(COUNTS):  # expert e's rows fill its group from its start, in order
        assert position[first[e]:first[e] + n].tolist() == list(range(starts[e], starts[e] + n))
        assert starts[e] + n <= ends[e]


@pytest.mark.parametrize("form", ["grouped", "padded-8", "padded-16", "padded-default"])
def test_expert_forms_equal_the_loop_forward_and_gradients(form):
    """fp32, 1e-5: outputs and every gradient, with two experts that receive no token."""
    if form == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    torch.manual_seed(1)
    x = torch.randn(sum(COUNTS), 16, requires_grad=True)
    weights = [(0.3 * torch.randn(8, *s)).requires_grad_() for s in ((16, 32), (16, 32), (32, 16))]
    upstream = torch.randn(sum(COUNTS), 16)
    ref = run_experts_loop(x, COUNTS, *weights)
    ref_grads = torch.autograd.grad(ref, [x, *weights], upstream)
    counts = torch.tensor(COUNTS)
    if form == "grouped":
        out = run_experts_grouped(x, counts, *weights)
    else:
        block = None if form == "padded-default" else int(form.split("-")[1])
        out = run_experts_padded(x, counts, *weights, block=block)
    torch.testing.assert_close(out, ref, **FP32)
    for g, r in zip(torch.autograd.grad(out, [x, *weights], upstream), ref_grads, strict=True):
        torch.testing.assert_close(g, r, **FP32)


def test_expert_counts_have_a_static_size():
    chosen = torch.tensor([[0, 3], [3, 1], [0, 3]])
    assert expert_counts(chosen, 6).tolist() == [2, 1, 0, 3, 0, 0]


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, targets=ids).loss
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.slow
@pytest.mark.parametrize("knock", ["none", "linear", "mlp", "gate"])
def test_fullgraph_compile_of_an_moe_model_equals_eager_under_bf16_autocast(knock):
    """``fullgraph=True`` fails on any graph break (a ``.tolist()``, a Python ``max`` over counts); forward and
    backward under CPU bf16 autocast. Tolerance: bf16 rounding (the compiled graph fuses and orders ops
    differently); the same routing, so the loss differs by rounding only."""
    torch.manual_seed(0)
    model = DecoderLM(moe_config(knock)).train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    eager_loss, eager_grads = _loss_and_grads(model, ids)
    compiled_loss, compiled_grads = _loss_and_grads(torch.compile(model, fullgraph=True), ids)
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-2)
    assert (compiled_grads - eager_grads).norm() <= 5e-2 * eager_grads.norm()


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_compiled_moe_layer_equals_eager_in_fp32(top_k):
    """Compiled for a CPU, the MoE layer routes its rows by ``index_copy`` (no atomic adds), eagerly by gathers
    and ``index_add_``: the same function, so in fp32 output and every gradient agree to rounding."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(n_experts=8, top_k=top_k, d_expert=16))
    for p in (moe.w_gate, moe.w_up, moe.w_down):
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 40, 32, requires_grad=True)
    probe = torch.randn(3, 40, 32)
    params = [x, *moe.parameters()]
    eager = torch.autograd.grad((moe(x) * probe).sum(), params)
    compiled = torch.autograd.grad((torch.compile(moe, fullgraph=True)(x) * probe).sum(), params)
    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, **FP32)


@pytest.mark.slow
def test_training_steps_with_changing_routing_compile_once():
    """12 AdamW steps on new batches with the balancing update after each: the routing changes every step (the
    token counts per expert differ), and after the first step (the warm-up: forward and backward graphs compiled
    once) nothing compiles again, under CPU bf16 autocast."""
    torch.manual_seed(0)
    model = DecoderLM(moe_config("mlp")).train()
    compiled = torch.compile(model, fullgraph=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    router = model.layers[0].ffn.router
    generator = torch.Generator().manual_seed(1)
    loads, graphs = [], None
    try:
        for step in range(12):
            ids = torch.randint(0, 97, (4, 16), generator=generator)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = compiled(ids, targets=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loads.append(router.tokens_per_expert.clone())
            metrics = model.update_moe_biases()
            assert metrics[0]["tokens"].item() == 4 * 16 * 2
            if step == 0:
                graphs = counters["stats"]["unique_graphs"]
                torch._dynamo.config.error_on_recompile = True  # any recompilation from here on raises
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert counters["stats"]["unique_graphs"] == graphs
    assert len({tuple(load.tolist()) for load in loads}) >= 10  # the routing really changed
    assert router.expert_bias.abs().sum() > 0  # and the balancing bias moved


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_kha_train_compile_on_an_moe_preset(scope, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny-moe", "--data", str(data_dir), "--out", str(out), "--compile",
                 "--compile-scope", scope, "--steps", "3", "--seq-len", "32", "--batch-size", "4", "--eval-every", "3",
                 "--eval-batches", "1", "--no-progress", "--precision", "bf16"]) == 0
    assert "step 3: loss" in capsys.readouterr().out
    assert (out / "model.safetensors").exists()


@pytest.mark.slow
def test_a_compiled_model_takes_a_second_sequence_length_as_a_dynamic_shape():
    """A second length makes dynamo recompile with the length symbolic (automatic dynamic shapes): attention must
    still pass SDPA a Python bool for ``is_causal``, and the losses stay eager's (fp32, 1e-5)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DecoderLM(moe_config("mlp")).train()
    compiled = torch.compile(model, fullgraph=True)
    for length in (16, 24, 32):
        ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
        torch.testing.assert_close(compiled(ids, targets=ids).loss, model(ids, targets=ids).loss, **FP32)


@pytest.mark.slow
def test_blocks_scope_compiles_each_block_and_equals_eager_in_fp32():
    """``compile_scope = "blocks"``: every block compiled on its own, the model itself not; one block's code
    compiles once for all layers (dynamo's graph count does not grow with depth); loss and every gradient equal
    eager's to fp32 rounding."""
    from kha.train.distributed import Runtime, parallelize

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = DecoderLM(replace(moe_config("mlp"), n_layers=3)).train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, targets=ids).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    eager_loss, eager_grads = loss_and_grads()
    counters.clear()
    parallelize(model, Runtime(0, 1, torch.device("cpu")), compile=True, scope="blocks")
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert model._compiled_call_impl is None
    compiled_loss, compiled_grads = loss_and_grads()
    assert counters["stats"]["unique_graphs"] == 1  # the first block's graph, reused by the other two
    torch.testing.assert_close(compiled_loss, eager_loss, **FP32)
    torch.testing.assert_close(compiled_grads, eager_grads, rtol=1e-4, atol=1e-5)
