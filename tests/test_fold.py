"""Folding linear knocks into the projections (eq. 8)."""

import pytest
import torch

from kha import Attention, KVCache, fold_knocks

from conftest import HEAD_LAYOUTS, attention_config, knocked_twin

# Folding reassociates fp32 matmuls ((x W^T) T vs x (T^T W)^T): agreement within 1e-5 (DESIGN: ~1e-5).
FOLD = dict(rtol=1e-5, atol=1e-5)


def train_knocks(module: Attention, steps: int = 10) -> None:
    """A few AdamW steps on every parameter, knocks included, so the knocks leave the identity."""
    opt = torch.optim.AdamW(module.parameters(), lr=2e-2)
    x, target = torch.randn(4, 12, 48), torch.randn(4, 12, 48)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(x), target).backward()
        opt.step()


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("targets", ["q", "k", "v", "qkv"])
@pytest.mark.parametrize("bias", [False, True])
def test_folded_equals_unfolded_after_training(layout, targets, bias):
    base = Attention(attention_config(layout, qkv_bias=bias))
    module = knocked_twin(base, "linear", targets)
    train_knocks(module)
    for knock in module.knocks.values():
        assert (knock.weight - torch.eye(16)).abs().max() > 0.05  # really moved away from the identity
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        expected = module(x)
        fold_knocks(module)
        torch.testing.assert_close(module(x), expected, **FOLD)
        # decoding from a folded module still matches
        cache = KVCache()
        steps = torch.cat([module(x[:, i:i + 1], cache=cache) for i in range(9)], dim=1)
        torch.testing.assert_close(steps, expected, **FOLD)
    assert module.cfg.knock == "none"
    # exactly the baseline's parameters: same names, same shapes, a baseline module loads them strictly
    assert {k: v.shape for k, v in module.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    base.load_state_dict(module.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(base(x), expected, **FOLD)


def test_fold_walks_nested_modules():
    stack = torch.nn.Sequential(*[Attention(attention_config("gqa", knock="linear")) for _ in range(3)])
    fold_knocks(stack)
    assert all(len(layer.knocks) == 0 for layer in stack)


@pytest.mark.parametrize("knock,name", [("mlp", "MLPKnock"), ("gate", "GateKnock")])
def test_nonlinear_knocks_refuse_to_fold(knock, name):
    module = Attention(attention_config("gqa", knock=knock))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=rf"cannot fold the {name} on 'v': only linear knocks fold"):
        fold_knocks(module)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())  # nothing changed
