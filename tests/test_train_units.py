"""Training pieces in isolation: schedule, parameter groups, spike detector, config and CLI errors."""

import math

import pytest
import torch

from kha.config import get_preset
from kha.model import DecoderLM
from kha.train.callbacks import SpikeDetector
from kha.train.config import TrainConfig, load_config, parse_train_args
from kha.train.optim import build_optimizer, lr_at, param_groups


def test_schedule_warmup_then_cosine_to_ten_percent():
    cfg = TrainConfig(steps=200, lr=1e-3, warmup_frac=0.05, min_lr_frac=0.1)
    lrs = [lr_at(s, cfg) for s in range(200)]
    # 10 warmup steps, linear from lr/10 up to lr
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)], rel=1e-12)
    # cosine from the peak at step 10 to 10 % at the last step, against the closed form
    for s in range(10, 200):
        progress = (s - 10) / (200 - 10 - 1)
        assert lrs[s] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-12)
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


@pytest.mark.parametrize("decay_knocks", [False, True])
def test_knocks_excluded_from_weight_decay_by_default(decay_knocks):
    model = DecoderLM(get_preset("tiny", knock="mlp"))
    buckets = param_groups(model, TrainConfig(decay_knocks=decay_knocks))
    decay, no_decay = buckets["adamw", "decay"], buckets["adamw", "none"]
    assert not any(buckets[k] for k in buckets if k[0] == "muon" or k[1] == "identity")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay}
    plain = {names[id(p)] for p in no_decay}
    knock_names = {n for n in names.values() if ".knocks." in n}
    assert knock_names and (knock_names <= decayed) == decay_knocks and (knock_names <= plain) != decay_knocks
    assert all("norm" not in n for n in decayed)  # norms never decay
    assert "embed.weight" in decayed
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1, decay_knocks=decay_knocks))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert opt.optimizers[0].defaults["betas"] == (0.9, 0.95)


def test_spike_detector_definition_and_state():
    det = SpikeDetector(window=5, threshold=3.0)
    losses = [2.0, 2.1, 1.9, 2.0, 2.05, 2.02, 5.0, 2.01, 9.0, 1.98]
    flags = [det.update(i + 1, x) for i, x in enumerate(losses)]
    assert flags == [False] * 6 + [True, False, True, False]
    assert det.spikes == [7, 9]
    # resumed detector continues identically
    det2 = SpikeDetector(window=5, threshold=3.0)
    for i, x in enumerate(losses[:7]):
        det2.update(i + 1, x)
    det3 = SpikeDetector(window=5, threshold=3.0)
    det3.load_state_dict(det2.state_dict())
    assert [det3.update(i + 1, x) for i, x in enumerate(losses[7:], start=7)] == flags[7:]
    assert det3.spikes == det.spikes


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match=r"unknown knock 'big'; valid are none, linear, mlp, gate"):
        TrainConfig(knock="big")
    with pytest.raises(ValueError, match=r"unknown preset 'huge'"):
        TrainConfig(preset="huge")
    bad = tmp_path / "bad.toml"
    bad.write_text('steps = 5\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\] in .*bad.toml; valid keys are"):
        load_config(str(bad))
    with pytest.raises(ValueError, match=r"neither a TOML file nor a preset"):
        load_config("nothing-like-this")


def test_cli_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny-moe"\nsteps = 50\nlr = 0.002\n')
    cfg = parse_train_args(["--config", str(toml), "--steps", "7", "--knock", "mlp", "--resume",
                            "--ckpt-every", "3", "--out", str(tmp_path / "run")])
    assert (cfg.preset, cfg.steps, cfg.lr, cfg.knock, cfg.resume, cfg.ckpt_every) == ("tiny-moe", 7, 0.002, "mlp",
                                                                                      True, 3)
    with pytest.raises(SystemExit):
        parse_train_args(["--config", str(toml), "--no-such-flag", "1"])
    with pytest.raises(SystemExit):
        parse_train_args(["--steps", "many"])


def test_shipped_tiny_config_loads():
    cfg = load_config("configs/tiny.toml")
    assert cfg.preset == "tiny"


@pytest.mark.parametrize("knock,targets", [("none", None), ("linear", "qkv"), ("mlp", "v")])
def test_model_flops_per_token_is_6n_plus_attention_plus_knocks(knock, targets):
    from kha.flops import model_flops_per_token
    from kha.model import count_parameters

    cfg = get_preset("dense-0.6b", knock=knock, knock_targets=targets)
    n = count_parameters(get_preset("dense-0.6b"))["activated"]  # the baseline's parameters
    heads = {"none": 0, "linear": 32 + 4 + 4, "mlp": 3 * 4}[knock]  # head-matrix products per layer
    # per token, per layer: scores + AV 4*32*128*T, knocks 2*128^2 per head-matrix; all x3 for training
    expected = 6 * n + 3 * 24 * (4 * 32 * 128 * 4096 + 2 * 128**2 * heads)
    assert model_flops_per_token(cfg, 4096) == expected


@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clipped", "below-the-limit"])
def test_clip_gradients_equals_clip_grad_norm(max_norm):
    """The same norm and bit for bit the same gradients as ``torch.nn.utils.clip_grad_norm_``, whether the
    gradients are scaled (norm above the limit) or left alone (below it)."""
    from kha.train.optim import clip_gradients

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(32, 8)
    for model in models:
        model(x).square().sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm).item()
    assert clip_gradients(models[1], max_norm) == expected
    assert (expected > max_norm) == (max_norm == 0.5)  # both branches are exercised
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
