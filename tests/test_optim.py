"""The optimizers: Muon's parameter groups and update against a reference, knock decay toward the identity,
and an exact resume of a Muon run."""

import math
import os
import signal
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from kha.config import get_preset
from kha.errors import RunStopped, UserError
from kha.model import DecoderLM
from kha.train import TrainConfig, train
from kha.train.optim import build_optimizer, param_groups

from conftest import losses, small_run

# Keller Jordan's quintic Newton-Schulz coefficients (kellerjordan.github.io/posts/muon), momentum and steps
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MOMENTUM, NS_STEPS = 0.95, 5


def _model(preset: str, knock: str = "mlp", targets: str | None = "v") -> DecoderLM:
    torch.manual_seed(0)
    return DecoderLM(replace(get_preset(preset, knock=knock, knock_targets=targets), vocab_size=64))


def _expected_bucket(name: str, param: torch.Tensor, cfg: TrainConfig) -> tuple[str, str]:
    """The placement the module docstring of kha.train.optim states, written out by parameter name."""
    last = name.split(".")[-1]
    if ".knocks." in name:
        decay = {"none": "none", "zero": "decay"}.get(cfg.knock_decay, "decay" if last == "w_gate" else "identity")
        return ("muon" if cfg.knock_optimizer == "muon" else "adamw"), decay
    if param.dim() == 1:
        return "adamw", "none"
    hidden = name.endswith("_proj.weight")  # attention and dense-FFN projections; not embed, router, experts
    return ("muon" if cfg.optimizer == "muon" and hidden else "adamw"), "decay"


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("knock_optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("knock_decay", ["none", "zero", "identity"])
def test_every_parameter_is_in_exactly_the_stated_group(preset, knock_optimizer, knock_decay):
    model = _model(preset)
    cfg = TrainConfig(optimizer="muon", knock_optimizer=knock_optimizer, knock_decay=knock_decay)
    buckets = param_groups(model, cfg)
    where = {}
    for key, params in buckets.items():
        for p in params:
            assert id(p) not in where, f"a parameter is in {where[id(p)]} and {key}"
            where[id(p)] = key
    named = dict(model.named_parameters())
    assert len(where) == len(named)
    for name, p in named.items():
        assert where[id(p)] == _expected_bucket(name, p, cfg), name
    assert any(".ffn.w_up" in n for n in named) == (preset == "tiny-moe")  # the 3-D experts were covered
    # the optimizers hold the same partition, each parameter once
    opt = build_optimizer(model, cfg)
    held = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(held) == sorted(where)
    muon = opt.optimizers[1]
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {i for i, k in where.items() if k[0] == "muon"}
    assert all(g["adjust_lr_fn"] == "match_rms_adamw" and g["momentum"] == MOMENTUM and g["nesterov"]
               and g["ns_steps"] == NS_STEPS for g in muon.param_groups)


def test_adamw_runs_keep_their_two_groups():
    model = _model("tiny")
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    assert len(opt.optimizers) == 1 and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all("identity_decay" not in g for g in opt.param_groups)


def _newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """Keller Jordan's quintic iteration, in fp64: ``X <- aX + (bA + cA^2)X`` with ``A = XX^T``, from
    ``X = G / ||G||_F`` (the wide orientation)."""
    a, b, c = NS_COEFFICIENTS
    tall = g.shape[0] > g.shape[1]
    x = (g.T if tall else g) / g.norm()
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def test_two_muon_steps_match_a_reference_implementation():
    model = _model("tiny")
    cfg = TrainConfig(optimizer="muon", weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    lr = 0.01
    for group in opt.param_groups:
        group["lr"] = lr
    muon_params = [p for g in opt.optimizers[1].param_groups for p in g["params"]]
    weights = [p.detach().double().clone() for p in muon_params]
    bufs = [torch.zeros_like(w) for w in weights]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        for i, p in enumerate(muon_params):
            g = p.grad.double()
            bufs[i] = MOMENTUM * bufs[i] + (1 - MOMENTUM) * g  # momentum as an EMA of the gradients
            nesterov = (1 - MOMENTUM) * g + MOMENTUM * bufs[i]
            scale = 0.2 * math.sqrt(max(p.shape))  # match_rms_adamw (Liu et al. 2025)
            update = lr * scale * _newton_schulz(nesterov)
            weights[i] = weights[i] * (1 - lr * cfg.weight_decay) - update
            # torch runs the iteration in bf16: within 2.5 % of the update (Frobenius norm; 1.6 % measured), and
            # the update is nearly orthogonal (singular values in about [0.5, 1.5] after 5 quintic steps)
            err = (p.detach().double() - weights[i]).norm() / update.norm()
            worst = max(worst, err.item())
            weights[i] = p.detach().double().clone()  # the next step starts from torch's weights
            sv = torch.linalg.svdvals(update / (lr * scale))
            assert 0.3 < sv.min() and sv.max() < 1.5
    assert worst < 0.025, worst


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_identity_decay_moves_a_knock_toward_the_identity_by_lr_wd_times_w_minus_i(optimizer):
    model = _model("tiny")
    cfg = TrainConfig(optimizer=optimizer, knock_optimizer=optimizer, knock_decay="identity", weight_decay=0.1)
    opt = build_optimizer(model, cfg)
    lr = 0.01
    for group in opt.param_groups:
        group["lr"] = lr
    knock = model.layers[0].attn.knocks["v"]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        knock.w_up.add_(0.05 * torch.randn(knock.w_up.shape, generator=gen))  # w_down stays exactly I
        knock.w_gate.add_(0.05 * torch.randn(knock.w_gate.shape, generator=gen))
    before = {n: p.detach().double().clone() for n, p in knock.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradients: only the decay moves the weights
    opt.step()
    eye = torch.eye(knock.w_up.shape[0], dtype=torch.float64)
    want_up = before["w_up"] - lr * cfg.weight_decay * (before["w_up"] - eye)
    torch.testing.assert_close(knock.w_up.detach().double(), want_up, rtol=0, atol=1e-7)  # fp32 rounding
    assert not torch.equal(knock.w_up.detach().double(), before["w_up"])
    assert torch.equal(knock.w_down.detach(), torch.eye(knock.w_down.shape[0]))  # the identity stays exact
    want_gate = before["w_gate"] * (1 - lr * cfg.weight_decay)  # zero-initialised: decays toward zero
    torch.testing.assert_close(knock.w_gate.detach().double(), want_gate, rtol=0, atol=1e-7)


def test_linear_knock_identity_decay_under_adamw():
    model = _model("tiny", knock="linear", targets="qkv")
    cfg = TrainConfig(knock_decay="identity", weight_decay=0.2)
    opt = build_optimizer(model, cfg)
    for group in opt.param_groups:
        group["lr"] = 0.05
    t = model.layers[1].attn.knocks["k"].weight
    with torch.no_grad():
        t.mul_(1.5)
    before = t.detach().double().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    eye = torch.eye(t.shape[0], dtype=torch.float64)
    torch.testing.assert_close(t.detach().double(), before - 0.05 * 0.2 * (before - eye), rtol=0, atol=1e-7)


def test_optimizer_option_errors(monkeypatch):
    with pytest.raises(ValueError, match="knock_optimizer = 'muon' needs optimizer = 'muon', not 'adamw'"):
        TrainConfig(knock_optimizer="muon")
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; valid are adamw, muon"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="unknown compile_scope 'layers'; valid are model, blocks"):
        TrainConfig(compile_scope="layers")
    with pytest.raises(ValueError, match="unknown knock_decay 'one'; valid are none, zero, identity"):
        TrainConfig(knock_decay="one")
    with pytest.raises(ValueError, match="decay_knocks .* contradicts knock_decay = 'identity'"):
        TrainConfig(decay_knocks=True, knock_decay="identity")
    # decay_knocks, the older flag, is knock_decay = "zero"
    model = _model("tiny")
    old = param_groups(model, TrainConfig(decay_knocks=True))
    assert [list(map(id, v)) for v in old.values()] == \
           [list(map(id, v)) for v in param_groups(model, TrainConfig(knock_decay="zero")).values()]
    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(UserError, match=r"optimizer = 'muon' needs torch.optim.Muon \(PyTorch 2.9 or newer\)"):
        build_optimizer(model, TrainConfig(optimizer="muon"))


def test_a_stopped_and_resumed_muon_run_equals_the_uninterrupted_one(data_dir, tmp_path, monkeypatch):
    import kha.train.loop

    settings = dict(knock="mlp", optimizer="muon", knock_decay="identity")
    full, out = tmp_path / "full", tmp_path / "stopped"
    train(small_run(data_dir, full, **settings))
    real = kha.train.loop.lr_at

    def stop_in_step_5(step, cfg):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, cfg)

    monkeypatch.setattr(kha.train.loop, "lr_at", stop_in_step_5)
    with pytest.raises(RunStopped, match="after step 5 of 6"):
        train(small_run(data_dir, out, **settings))
    monkeypatch.undo()
    train(small_run(data_dir, out, resume=True, **settings))
    assert losses(out) == losses(full)
    a, b = (load_file(d / "checkpoints" / "step_0000006" / "rank00000.safetensors") for d in (full, out))
    momentum = [k for k in a if k.endswith("momentum_buffer")]
    assert momentum and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_muon_under_fsdp_is_refused_at_start(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = _model("tiny")
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        assert type(model.embed.weight).__name__ == "DTensor"
        with pytest.raises(UserError, match=r"optimizer = 'muon' is not supported under FSDP .* train Muon in one "
                                            r"process, or use optimizer = 'adamw'"):
            build_optimizer(model, TrainConfig(optimizer="muon"))
        # AdamW takes the DTensors, and the identity decay works on them (the rows of I each process holds)
        opt = build_optimizer(model, TrainConfig(knock_decay="identity", weight_decay=0.1))
        w_up = model.layers[0].attn.knocks["v"].w_up
        with torch.no_grad():
            w_up.mul_(1.25)
        before = w_up.full_tensor().double()
        for group in opt.param_groups:
            group["lr"] = 0.01
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        eye = torch.eye(before.shape[0], dtype=torch.float64)
        torch.testing.assert_close(w_up.full_tensor().double(), before - 0.001 * (before - eye), rtol=0, atol=1e-7)
    finally:
        dist.destroy_process_group()
