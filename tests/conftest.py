import sysconfig
from pathlib import Path

import pytest
import torch

from kha import Attention, AttentionConfig

# name -> (n_heads, n_kv_heads); d_model 48 and head_dim 16 keep head_dim independent of d_model / n_heads.
HEAD_LAYOUTS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}
KNOCK_SETTINGS = [
    (knock, targets)
    for knock in ("linear", "mlp", "gate")
    for targets in ("q", "k", "v", "qk", "qkv")
]


def attention_config(layout: str, **kwargs) -> AttentionConfig:
    n_heads, n_kv = HEAD_LAYOUTS[layout]
    return AttentionConfig(d_model=48, n_heads=n_heads, n_kv_heads=n_kv, head_dim=16, **kwargs)


def knocked_twin(base: Attention, knock: str, targets) -> Attention:
    """A knocked module carrying ``base``'s weights (only the knock parameters are its own)."""
    cfg = base.cfg
    twin = Attention(AttentionConfig(
        d_model=cfg.d_model, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
        qk_norm=cfg.qk_norm, rope=cfg.rope, qkv_bias=cfg.qkv_bias, knock=knock, knock_targets=targets,
    ))
    result = twin.load_state_dict(base.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(key.startswith("knocks.") for key in result.missing_keys)
    return twin


def perturb(module: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Move every parameter (norm weights and knocks included) away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def assert_same_outputs_and_input_grads(base, other, x: torch.Tensor) -> None:
    """``other`` computes ``base``'s outputs and input gradients, within 1e-6 (fp32 identity-at-init)."""
    x_base, x_other = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_base, y_other = base(x_base), other(x_other)
    torch.testing.assert_close(y_other, y_base, rtol=0, atol=1e-6)
    upstream = torch.randn_like(y_base)
    y_base.backward(upstream)
    y_other.backward(upstream)
    torch.testing.assert_close(x_other.grad, x_base.grad, rtol=0, atol=1e-6)


def assert_sdpa_matches_eager(module, d_model: int, with_mask: bool) -> None:
    """SDPA and the eager kernel agree within 1e-5 (fp32), optionally with left and right padding."""
    x = torch.randn(3, 9, d_model)
    mask = None
    if with_mask:
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[1, :4] = False  # left padding
        mask[2, 7:] = False  # right padding
    with torch.no_grad():
        torch.testing.assert_close(module(x, attention_mask=mask), module(x, attention_mask=mask, impl="eager"),
                                   rtol=1e-5, atol=1e-5)


def small_run(data_dir, out, **overrides):
    """The training tests' run: the tiny preset on ``data_dir``, 6 steps of 4 x 32 tokens, checkpoints and
    evaluations every 3 steps; ``overrides`` replace any ``TrainConfig`` field."""
    from kha.train import TrainConfig

    values = dict(out=str(out), preset="tiny", data=str(data_dir), seq_len=32, batch_size=4, steps=6, lr=3e-3,
                  eval_every=3, eval_batches=2, ckpt_every=3, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def fails(argv, capsys, *expected: str) -> str:
    """``kha ARGV`` exits 2 with one ``kha ...`` line on stderr (other libraries' progress bars aside) that names
    the command and contains every ``expected`` text, and no traceback."""
    from kha.cli import main

    capsys.readouterr()  # what earlier steps printed
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.startswith("kha ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"kha {argv[0]}"), err
    for text in expected:
        assert text in lines[0], (text, err)
    return lines[0]


def losses(run_dir) -> list[float]:
    """The training losses of ``run_dir/metrics.jsonl``, step by step."""
    from kha.train.callbacks import read_metrics

    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small prepared corpus for training tests: 18 stdlib modules as documents, a 512-token BPE, shards."""
    from kha.data.prepare import prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    docs.mkdir()
    for path in sorted((stdlib / "json").glob("*.py")) + sorted((stdlib / "email").glob("*.py"))[:12]:
        (docs / f"{path.parent.name}_{path.stem}.txt").write_text(path.read_text())
    out = root / "data"
    prepare([str(docs)], out, vocab_size=512, val_fraction=0.15, seed=0, verbose=False)
    return out
