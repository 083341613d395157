"""FLOP and parameter accounting against the paper's closed forms and torch's FLOP counter."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kha import Attention, AttentionConfig
from kha.cli import main
from kha.flops import attention_params, knock_params, layer_flops, paper_example

from conftest import attention_config


def test_paper_example_percentages():
    """Section 3.4: L=2048, d=1024, n=32 -> 0.55 % of the layer and 1.17 % of MHA, for both variants."""
    for flops in paper_example().values():
        assert round(100 * flops.knock_share_of_layer, 2) == 0.55
        assert round(100 * flops.knock_share_of_attention, 2) == 1.17


@pytest.mark.parametrize("L,d,n", [(2048, 1024, 32), (4096, 1536, 12), (512, 256, 4)])
def test_closed_forms_eq_10_to_12(L, d, n):
    for knock in ("linear", "mlp"):
        f = layer_flops(AttentionConfig(d_model=d, n_heads=n, knock=knock), seq_len=L)
        assert f.attention == 8 * L * d**2 + 4 * L**2 * d  # eq. 10
        assert f.layer == 26 * L * d**2 + 4 * L**2 * d  # eq. 11
        assert f.knock * n == 6 * L * d**2  # eq. 12


@pytest.mark.parametrize("layout", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("knock,targets", [("linear", "qkv"), ("linear", "k"), ("mlp", "v"), ("mlp", "q"),
                                           ("gate", "v")])
def test_matmul_flops_match_torch_flop_counter(layout, knock, targets):
    """Projection and knock FLOPs equal what torch counts on the real module (2 per multiply-add), the knocks in
    the plain form, whose matmuls run inside the knock modules, as eq. 12 counts them."""
    cfg = attention_config(layout, knock=knock, knock_targets=targets, qk_norm=False, rope=False, knock_form="plain")
    seq = 10
    with FlopCounterMode(display=False) as counter:
        Attention(cfg)(torch.randn(1, seq, 48))
    counts = counter.get_flop_counts()
    f = layer_flops(cfg, seq)
    knock_counted = sum(sum(v.values()) for k, v in counts.items() if ".knocks." in k)
    proj_counted = sum(sum(v.values()) for k, v in counts.items() if k.endswith("_proj"))
    assert knock_counted == f.knock
    assert proj_counted == f.qkv + f.output


@pytest.mark.parametrize("layout", ["mha", "gqa", "mqa"])
@pytest.mark.parametrize("knock,targets", [("none", None), ("linear", "qkv"), ("mlp", "v"), ("gate", "qk")])
@pytest.mark.parametrize("bias", [False, True])
def test_parameter_counts_match_module(layout, knock, targets, bias):
    cfg = attention_config(layout, knock=knock, knock_targets=targets, qkv_bias=bias)
    module = Attention(cfg)
    knock_numel = sum(p.numel() for p in module.knocks.parameters())
    assert knock_params(cfg) == knock_numel
    assert attention_params(cfg) == sum(p.numel() for p in module.parameters()) - knock_numel


def test_cli_flops_json(capsys):
    assert main(["flops", "--knock", "mlp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert round(100 * out["knock_share_of_layer"], 2) == 0.55
    assert out["knock"] * 32 == 6 * 2048 * 1024**2


def test_cli_flops_table_and_errors(capsys):
    assert main(["flops"]) == 0
    table = capsys.readouterr().out
    assert "0.551%" in table and "1.172%" in table
    assert main(["flops", "--n-kv-heads", "5"]) == 2
    assert "n_kv_heads=5 does not divide n_heads=32" in capsys.readouterr().err
    assert main(["flops", "--knock", "linear", "--targets", "x"]) == 2
    assert "unknown knock target" in capsys.readouterr().err
