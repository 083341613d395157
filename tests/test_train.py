"""End-to-end training: determinism, SIGKILL + resume, FSDP on 2 gloo processes, stopping on NaN."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kha
from kha.data.loader import read_manifest
from kha.errors import UserError
from kha.model import DecoderLM
from kha.runfiles import code_version
from kha.train import train
from kha.train.callbacks import read_metrics
from kha.train.checkpoint import NonFiniteError
from kha.train.loop import build_model_config

from conftest import losses, small_run


def test_same_seed_same_run_and_outputs(data_dir, tmp_path):
    a = train(small_run(data_dir, tmp_path / "a", knock="mlp"))
    b = train(small_run(data_dir, tmp_path / "b", knock="mlp"))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit on CPU
    assert a["val_loss"] == b["val_loss"]
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all({"step", "loss", "lr", "tokens", "grad_norm"} <= set(r) for r in records)
    assert [r["tokens"] for r in records] == [4 * 32 * s for s in range(1, 7)]
    assert "val_loss" in records[2] and "val_loss" in records[5] and "val_loss" not in records[0]
    # final weights as safetensors load into a fresh model of the run's config
    vocab = read_manifest(data_dir)["tokenizer"]["vocab_size"]
    model = DecoderLM(build_model_config(small_run(data_dir, tmp_path / "a", knock="mlp"), vocab))
    missing, unexpected = model.load_state_dict(load_file(tmp_path / "a" / "model.safetensors"), strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to embed.weight, stored once
    assert not torch.equal(model.layers[0].attn.knocks["v"].w_gate, torch.zeros(16, 16))  # knocks trained


def test_knocked_and_baseline_runs_start_from_the_same_weights(data_dir, tmp_path):
    base = train(small_run(data_dir, tmp_path / "base", steps=1, eval_every=1))
    kha = train(small_run(data_dir, tmp_path / "kha", steps=1, eval_every=1, knock="linear"))
    # identical first loss: same base weights, same batch, knocks at identity
    assert losses(tmp_path / "base")[0] == losses(tmp_path / "kha")[0]
    assert base["params"] < kha["params"]


def _train_cmd(data_dir, out, *extra):
    return [sys.executable, "-m", "kha.cli", "train", "--preset", "tiny-moe", "--knock", "mlp",
            "--data", str(data_dir), "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--steps", "24", "--ckpt-every", "4", "--eval-every", "6", "--eval-batches", "2",
            "--no-progress", *extra]


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The 24-step run of ``_train_cmd`` without interruption, to compare stopped and resumed runs with."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    subprocess.run(_train_cmd(data_dir, out), check=True, env=ONE_THREAD, capture_output=True)
    return out


def _start_and_signal(data_dir, out, sig, after_steps: int = 9):
    """Start ``_train_cmd`` in ``out`` and send ``sig`` once ``after_steps`` steps are logged; the exit code and
    stderr."""
    proc = subprocess.Popen(_train_cmd(data_dir, out), env=ONE_THREAD, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps:
            break
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, None, stderr)


def _assert_resume_reproduces(data_dir, out, full):
    subprocess.run(_train_cmd(data_dir, out, "--resume"), check=True, env=ONE_THREAD, capture_output=True)
    full_m, resumed = read_metrics(full / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 25))
    for key in ("loss", "grad_norm", "val_loss", "lr", "moe_max_over_mean"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in full_m], key  # bit for bit
    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("expert_bias") and a[k].abs().sum() > 0 for k in a)  # balancing ran


@pytest.mark.slow
def test_sigkill_and_resume_reproduces_the_uninterrupted_run(data_dir, tmp_path, uninterrupted):
    proc = _start_and_signal(data_dir, tmp_path / "killed", signal.SIGKILL)
    assert len(read_metrics(tmp_path / "killed" / "metrics.jsonl")) < 24, "the run finished before it was killed"
    assert proc.returncode == -signal.SIGKILL
    _assert_resume_reproduces(data_dir, tmp_path / "killed", uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_at_its_step_and_resume_reproduces_the_run(data_dir, tmp_path, uninterrupted):
    out = tmp_path / "stopped"
    proc = _start_and_signal(data_dir, out, signal.SIGTERM)
    stopped_at = len(read_metrics(out / "metrics.jsonl"))
    assert stopped_at < 24, "the run finished before it was stopped"
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert f"stopped by SIGTERM after step {stopped_at} of 24" in proc.stderr
    # the stop saved the step it finished (checkpoints are otherwise every 4 steps), and the lock is gone
    assert (out / "checkpoints" / f"step_{stopped_at:07d}" / "checksums.json").exists()
    assert not (out / ".lock").exists() and not (out / "model.safetensors").exists()
    _assert_resume_reproduces(data_dir, out, uninterrupted)


def test_partial_checkpoint_is_ignored_on_resume(data_dir, tmp_path):
    train(small_run(data_dir, tmp_path / "r", steps=3))
    ckpts = tmp_path / "r" / "checkpoints"
    broken = ckpts / ".tmp_step_0000006"  # a save that died before its rename
    broken.mkdir()
    (broken / "garbage").write_text("x")
    record = train(small_run(data_dir, tmp_path / "r", steps=6, resume=True))
    assert record["step"] == 6 and not broken.exists()
    assert [p.name for p in sorted(ckpts.glob("step_*"))] == ["step_0000003", "step_0000006"]


def test_a_run_in_slices_equals_the_straight_run(data_dir, tmp_path, capsys):
    """``stop_after`` ends a call at that step with a checkpoint (no final weights, a normal return); resumed slice
    by slice the run equals the straight one bit for bit (the schedule stays that of ``steps``)."""
    train(small_run(data_dir, tmp_path / "straight", steps=6))
    sliced = tmp_path / "sliced"
    record = train(small_run(data_dir, sliced, steps=6, stop_after=2))
    assert record["step"] == 2 and "stopped after step 2 of 6 as --stop-after asked" in capsys.readouterr().out
    assert not (sliced / "model.safetensors").exists()
    assert [p.name for p in sorted((sliced / "checkpoints").glob("step_*"))] == ["step_0000002"]
    assert train(small_run(data_dir, sliced, steps=6, stop_after=5, resume=True))["step"] == 5
    with pytest.raises(UserError, match="--stop-after 4 is not after the checkpoint's step 5"):
        train(small_run(data_dir, sliced, steps=6, stop_after=4, resume=True))
    assert train(small_run(data_dir, sliced, steps=6, resume=True))["step"] == 6
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(sliced / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in straight], key
    assert torch.equal(load_file(sliced / "model.safetensors")["embed.weight"],
                       load_file(tmp_path / "straight" / "model.safetensors")["embed.weight"])


@pytest.mark.parametrize("stop_after", [-1, 7])
def test_stop_after_outside_the_run_is_refused(data_dir, tmp_path, stop_after):
    with pytest.raises(ValueError, match=f"stop_after must be between 0 .* and steps \\(6\\), got {stop_after}"):
        small_run(data_dir, tmp_path / "r", steps=6, stop_after=stop_after)


def test_train_config_records_where_each_stretch_of_a_run_trained(data_dir, tmp_path):
    path = tmp_path / "r" / "train_config.json"
    train(small_run(data_dir, tmp_path / "r", steps=3))
    first = json.loads(path.read_text())["trained_on"]
    assert first == [{"first_step": 1, "device": "cpu", "processes": 1, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "kha": code_version()}]
    train(small_run(data_dir, tmp_path / "r", steps=6, resume=True))
    assert json.loads(path.read_text())["trained_on"] == [*first, {**first[0], "first_step": 4}]
    train(small_run(data_dir, tmp_path / "r", steps=6, resume=True))  # nothing left to train: nothing added
    assert json.loads(path.read_text())["trained_on"] == [*first, {**first[0], "first_step": 4}]
    # a tampered file: what is not a well-formed entry of an earlier step is dropped
    path.write_text(json.dumps({**json.loads(path.read_text()), "trained_on": [
        "x", {"first_step": "1", "device": "cpu"}, {"first_step": 2, "device": 3}, *first,
        {"first_step": 9, "device": "later"}]}))
    train(small_run(data_dir, tmp_path / "r", steps=9, resume=True))
    assert json.loads(path.read_text())["trained_on"] == [*first, {**first[0], "first_step": 7}]
    path.write_text(json.dumps({**json.loads(path.read_text()), "trained_on": "not a list"}))
    train(small_run(data_dir, tmp_path / "r", steps=12, resume=True))
    assert json.loads(path.read_text())["trained_on"] == [{**first[0], "first_step": 10}]


def test_code_version_names_the_commit_of_a_checkout_and_its_changes(tmp_path, monkeypatch):
    def git(*args, cwd=tmp_path / "repo"):
        return subprocess.run(["git", "-c", "user.name=k", "-c", "user.email=k@k", *args], cwd=cwd, check=True,
                              capture_output=True, text=True).stdout.strip()

    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    (tmp_path / "repo" / "other.txt").write_text("a\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "one")
    commit = git("rev-parse", "HEAD")
    clean = code_version(package)
    assert clean == f"{kha.__version__}+g{commit[:12]}"
    (tmp_path / "repo" / "other.txt").write_text("b\n")  # a change outside the package is not its code
    (package / "new.py").write_text("")  # nor is an untracked file
    assert code_version(package) == clean
    assert code_version(package, tmp_path / "repo" / "other.txt") == clean + ".dirty"  # unless named
    monkeypatch.chdir(tmp_path / "repo")
    assert code_version(package, Path("other.txt")) == clean + ".dirty"  # a relative path: from the working dir
    assert code_version(package, tmp_path) == kha.__version__  # a path outside the checkout: nothing to tell
    (package / "__init__.py").write_text("x = 2\n")
    assert code_version(package) == clean + ".dirty"
    untracked = tmp_path / "repo" / "untracked"  # a package inside a checkout that does not track it
    untracked.mkdir()
    (untracked / "__init__.py").write_text("")
    assert code_version(untracked) == kha.__version__
    outside = tmp_path / "outside"
    outside.mkdir()
    assert code_version(outside) == kha.__version__
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    assert code_version(package) == kha.__version__


def test_non_finite_loss_stops_and_keeps_last_checkpoint(data_dir, tmp_path, monkeypatch):
    import kha.model

    real = kha.model.F.cross_entropy
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(kha.model.F, "cross_entropy", flaky)
    cfg = small_run(data_dir, tmp_path / "nan", steps=8, eval_every=100, ckpt_every=2)
    with pytest.raises(NonFiniteError, match=r"loss is nan at step 5.*step_0000004"):
        train(cfg)
    assert [r["step"] for r in read_metrics(tmp_path / "nan" / "metrics.jsonl")] == [1, 2, 3, 4]
    monkeypatch.setattr(kha.model.F, "cross_entropy", real)
    assert train(small_run(data_dir, tmp_path / "nan", steps=8, eval_every=100, ckpt_every=2,
                           resume=True))["step"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_fsdp_two_gloo_processes_match_one_process(data_dir, tmp_path, compiled):
    """2 processes x batch 4 (FSDP2, gloo) == 1 process x batch 8: same global batches and updates, eager and
    with ``--compile`` (each block compiled on its own, as under FSDP; here MoE blocks, whose routing changes every
    step). Compiled, neither process recompiles while training: at most one recompilation each, the evaluation's
    (grad mode off), in dynamo's own log.

    Tolerance: relative 1e-5 on every loss, 1e-4 on the gradient norm: the sharded gradient reduction
    sums in another order (measured: losses within ~1e-6, grad norms within ~2e-5).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"TORCH_LOGS": "recompiles"} if compiled else {})}
    common = ["--preset", "tiny-moe", "--knock", "mlp", "--data", str(data_dir), "--seq-len", "32",
              "--steps", "6", "--ckpt-every", "3", "--eval-every", "3", "--eval-batches", "2", "--no-progress",
              *(["--compile", "--compile-scope", "blocks"] if compiled else [])]  # blocks: what FSDP compiles
    subprocess.run([sys.executable, "-m", "kha.cli", "train", *common, "--batch-size", "8",
                    "--out", str(tmp_path / "one")], check=True, env=env, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "kha.cli", "train", *common, "--batch-size", "4", "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    recompiles = [line for line in two.stderr.splitlines() if "Recompiling function" in line]
    assert len(recompiles) <= (2 if compiled else 0), "\n".join(recompiles)
    one_m, two_m = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["tokens"] for r in one_m] == [r["tokens"] for r in two_m]
    for key, rel in (("loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-4)):
        a = [r[key] for r in one_m if key in r]
        b = [r[key] for r in two_m if key in r]
        assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=rel), key
    # the checkpoint written by 2 processes resumes in 2 processes
    assert (tmp_path / "two" / "checkpoints" / "step_0000006" / "meta.json").exists()
