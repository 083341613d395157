"""Runs that cannot be lost or poisoned: non-finite stops, the run-folder lock, verified pickle-free checkpoints,
data checksums, crash-safe metrics, a full disk, and loss-spike events."""

import errno
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kha.cli import main
from kha.data.loader import verify_shards
from kha.errors import RunStopped
from kha.train import TrainConfig, train
from kha.train.callbacks import MetricsLog, SpikeDetector, count_spike_events, read_metrics
from kha.train.checkpoint import (
    NonFiniteError,
    latest_checkpoint,
    read_model_state,
    save_checkpoint,
)
from kha.train.distributed import Runtime
from kha.train.runlock import RunLock, RunLockedError
from kha.train.stopsignal import StopOnSignal

from conftest import fails, losses, small_run


def ckpts(run_dir) -> list[str]:
    return sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step_*"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at steps 3 and 6) to compare resumed runs with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(small_run(data_dir, out))
    return out


# ------------------------------------------------------------------------------------------ 1. non-finite


def test_huge_lr_nan_gradients_stop_before_the_update_and_no_checkpoint_holds_nan(data_dir, tmp_path):
    """lr 1e6: step 3's loss is still finite but its gradients are NaN (measured); the run must stop there."""
    out = tmp_path / "huge"
    cfg = small_run(data_dir, out, lr=1e6, warmup_frac=0.0, ckpt_every=1, eval_every=100, keep_checkpoints=5)
    with pytest.raises(NonFiniteError, match=r"^the gradient norm is nan at step 3; .*step_0000002"):
        train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert ckpts(out) == ["step_0000001", "step_0000002"]
    for name in ckpts(out):  # every tensor of every checkpoint (weights, optimizer moments) is finite
        tensors = load_file(out / "checkpoints" / name / "rank00000.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()), name
    assert not (out / ".lock").exists()  # released on the exception


def fresh_model_and_optimizer():
    """The tiny preset (vocabulary 64) and its optimizer, as one process builds them."""
    from kha.config import get_preset
    from kha.model import DecoderLM
    from kha.train.optim import build_optimizer

    model = DecoderLM(replace(get_preset("tiny"), vocab_size=64))
    return model, build_optimizer(model, TrainConfig())


def tiny_checkpoint(folder: Path):
    """A tiny model and its optimizer after one step with LR 1.25e-3, saved as checkpoint 1 in ``folder`` by one
    CPU process."""
    model, opt = fresh_model_and_optimizer()
    model(torch.randint(0, 64, (2, 8)))[0].float().square().mean().backward()
    opt.step()
    for group in opt.param_groups:
        group["lr"] = 1.25e-3
    meta = {"data": {"epoch": 0, "step": 1, "seed": 0, "seq_len": 8, "global_batch": 2, "split": "train",
                     "data_sha256": "0" * 64}, "callbacks": {"spikes": SpikeDetector(50, 4.0).state_dict()}}
    save_checkpoint(folder, 1, model, opt, meta, Runtime(0, 1, torch.device("cpu")), keep=2)
    return model, opt


def test_save_refuses_non_finite_weights(tmp_path):
    model, opt = fresh_model_and_optimizer()
    rt = Runtime(0, 1, torch.device("cpu"))
    save_checkpoint(tmp_path, 1, model, opt, {}, rt, keep=2)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN or infinite values after step 2; refusing to save"):
        save_checkpoint(tmp_path, 2, model, opt, {}, rt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000001"]
    assert (tmp_path / "latest").read_text() == "step_0000001"


def test_a_resume_keeps_how_this_run_steps_its_optimizer(tmp_path):
    """AdamW is fused in one process and not under FSDP (``build_optimizer``): a checkpoint written by one kind of
    run and resumed by the other keeps the resuming run's ``fused`` (and ``foreach``), while the optimizer's state
    and hyperparameters come from the checkpoint."""
    from kha.train.checkpoint import load_checkpoint

    _, opt = tiny_checkpoint(tmp_path)
    assert opt.param_groups[0]["fused"] is True
    model, resumed = fresh_model_and_optimizer()
    for group in resumed.param_groups:
        group["fused"], group["foreach"] = None, False  # as under FSDP
    load_checkpoint(tmp_path / "step_0000001", model, resumed, Runtime(0, 1, torch.device("cpu")))
    assert all(g["fused"] is None and g["foreach"] is False and g["lr"] == 1.25e-3 for g in resumed.param_groups)
    saved, loaded = opt.optimizers[0].state_dict()["state"], resumed.optimizers[0].state_dict()["state"]
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)


def test_a_checkpoint_written_on_a_cpu_resumes_on_a_gpu(tmp_path, monkeypatch):
    """A CPU run's checkpoint holds no CUDA RNG state; resuming it on a GPU keeps the GPU's seeded state instead
    of failing on the missing key (the model stays on the CPU here: only the RNG step differs by device)."""
    from kha.train.checkpoint import load_checkpoint

    tiny_checkpoint(tmp_path)
    model, opt = fresh_model_and_optimizer()
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda *a: pytest.fail("no CUDA RNG state to restore"))
    meta = load_checkpoint(tmp_path / "step_0000001", model, opt, Runtime(0, 1, torch.device("cuda")))
    assert meta["step"] == 1 and all(g["lr"] == 1.25e-3 for g in opt.param_groups)


# ------------------------------------------------------------------------------------------ 2. the run lock


_HOLD = """
import sys, time
from kha.train.runlock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline() == "held\n"
        with pytest.raises(RunLockedError, match=rf"in use by process {live.pid} on {socket.gethostname()}"):
            train(small_run(data_dir, out, steps=1))
        assert json.loads((out / ".lock").read_text())["pid"] == live.pid  # the holder's lock is untouched
        assert not (out / "metrics.jsonl").exists()
    finally:
        live.kill()
        live.wait()
    # the holder died without removing its lock: the next run takes it over, says so, and removes it at the end
    train(small_run(data_dir, out, steps=1, eval_every=1))
    assert f"taking over the lock {out / '.lock'} left by process {live.pid}" in capsys.readouterr().out
    assert not (out / ".lock").exists() and [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]


def test_lock_is_exclusive_within_a_host(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockedError, match=rf"process {os.getpid()} "):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}


def test_an_old_run_is_refused_without_resume_and_replaced_with_overwrite(data_dir, tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    with pytest.raises(ValueError, match=r"already holds a run .*pass --resume to continue it, --overwrite"):
        train(small_run(data_dir, out, steps=3))
    assert losses(out) == losses(reference) and ckpts(out) == ["step_0000003", "step_0000006"]  # untouched
    train(small_run(data_dir, out, steps=3, overwrite=True))
    assert losses(out) == losses(reference)[:3]  # a fresh 3-step run: the first 3 losses of the same seed
    assert ckpts(out) == ["step_0000003"]  # the old step-6 checkpoint is gone
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        small_run(data_dir, out, resume=True, overwrite=True)


@pytest.mark.parametrize("text", ["garbage", "[1]", "{}", '{"pid": "1234", "host": "HOST"}', ""])
def test_a_lock_file_nobody_holds_is_stale_whatever_it_says(tmp_path, text):
    """No process holds a flock on it: a string or garbage pid, or nothing, is taken over at once."""
    (tmp_path / ".lock").write_text(text.replace("HOST", socket.gethostname()))
    said = []
    with RunLock(tmp_path, log=said.append):
        assert json.loads((tmp_path / ".lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    assert len(said) == (1 if text else 0) and not (tmp_path / ".lock").exists()
    if text.startswith('{"pid"'):
        assert "left by process 1234, which no longer holds it" in said[0]


_CONTEND = """
import sys, time
from pathlib import Path
import kha.train.runlock as runlock

real = runlock.RunLock._holder

def slow(self, *args):  # the delay between reading the lock and writing it that broke the old takeover
    holder = real(self, *args)
    time.sleep(0.5)
    return holder

runlock.RunLock._holder = slow
print("ready", flush=True)
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
try:
    runlock.RunLock(sys.argv[1], log=lambda msg: None).acquire()
except runlock.RunLockedError as err:
    print("lost", err, flush=True)
else:
    print("won", flush=True)
    time.sleep(2)  # hold it while the other contender finishes trying
"""


def test_two_processes_taking_over_a_stale_lock_with_a_delay_exactly_one_wins(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CONTEND, str(tmp_path), str(go)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2  # imported; both start within ~5 ms of go
    go.touch()
    results = sorted(p.communicate(timeout=60)[0].split()[0] for p in procs)
    assert results == ["lost", "won"], results


def test_resume_with_steps_below_the_checkpoint_is_an_error_and_equal_steps_say_so(data_dir, tmp_path, reference,
                                                                                     capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    saved = (out / "train_config.json").read_text()
    flags = ["--preset", "tiny", "--data", data_dir, "--seq-len", "32", "--batch-size", "4", "--eval-every", "3",
             "--eval-batches", "2", "--ckpt-every", "3", "--no-progress", "--out", out, "--resume"]
    capsys.readouterr()
    assert main(["train", *map(str, flags), "--steps", "3"]) == 2  # used to train nothing and exit 0
    err = capsys.readouterr().err
    assert "--steps 3 is below the checkpoint's step 6: nothing would be trained" in err and "Traceback" not in err
    assert (out / "train_config.json").read_text() == saved  # not rewritten with steps 3
    assert losses(out) == losses(reference) and ckpts(out) == ckpts(reference)
    assert main(["train", *map(str, flags), "--steps", "6"]) == 0
    assert "is already at --steps 6: nothing left to train" in capsys.readouterr().out
    assert losses(out) == losses(reference)


def test_a_copy_of_a_checkpoint_folder_is_not_taken_for_one(data_dir, tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    backup = out / "checkpoints" / "step_0000006.bak"
    shutil.copytree(out / "checkpoints" / "step_0000006", backup)
    capsys.readouterr()
    train(small_run(data_dir, out, resume=True, steps=9))  # used to fail: invalid literal for int(): '0000006.bak'
    assert f"resumed from {out / 'checkpoints' / 'step_0000006'} (step 6)" in capsys.readouterr().out
    assert backup.is_dir() and ckpts(out) == ["step_0000006", "step_0000006.bak", "step_0000009"]  # kept, not rotated


def test_sigterm_is_recorded_while_active_and_a_later_one_reaches_the_previous_handler(monkeypatch):
    import kha.train.stopsignal

    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with StopOnSignal() as stop:
            assert stop.agreed(torch.device("cpu")) is False
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.agreed(torch.device("cpu")) is True and stop.signum == signal.SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)  # within REPEAT_GRACE_S: the same stop arriving twice
            assert received == []  # recorded, not acted on
            monkeypatch.setattr(kha.train.stopsignal, "REPEAT_GRACE_S", -1.0)  # as if the window had passed
            os.kill(os.getpid(), signal.SIGTERM)  # acts at once: here, through the handler installed before
            assert received == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)  # outside the block the previous handler is back
        assert received == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_nested_stops_share_the_outermost_and_an_ignored_signal_stays_ignored():
    with StopOnSignal() as outer:
        with StopOnSignal() as inner:
            assert inner is outer
        os.kill(os.getpid(), signal.SIGTERM)  # after the inner block: its exit must have left the handler
        assert outer.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == 0 and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_when(monkeypatch, module, name, when=lambda *args: True):
    """Patch ``module.name`` so that calling it sends this process SIGTERM first (when ``when(*args)``)."""
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_sigterm_mid_run_saves_that_step_and_resume_reproduces_the_run(data_dir, tmp_path, reference, monkeypatch):
    import kha.train.loop

    out = tmp_path / "run"
    _sigterm_when(monkeypatch, kha.train.loop, "lr_at", lambda step, cfg: step == 4)  # during step 5 of 6
    with pytest.raises(RunStopped, match=r"^stopped by SIGTERM after step 5 of 6; saved .*step_0000005; continue"):
        train(small_run(data_dir, out))
    assert ckpts(out) == ["step_0000003", "step_0000005"]  # 5: the stop's own; 3: the regular one
    assert not (out / ".lock").exists() and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    train(small_run(data_dir, out, resume=True))
    assert losses(out) == losses(reference)
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_in_the_last_step_finishes_the_run_then_reports_the_stop(data_dir, tmp_path, monkeypatch):
    import kha.train.loop

    out = tmp_path / "run"
    _sigterm_when(monkeypatch, kha.train.loop, "lr_at", lambda step, cfg: step == 5)
    with pytest.raises(RunStopped, match="^stopped by SIGTERM as the run finished; it is complete"):
        train(small_run(data_dir, out))
    assert (out / "model.safetensors").exists() and ckpts(out)[-1] == "step_0000006"


def test_sigterm_while_starting_stops_before_the_first_step(data_dir, tmp_path, monkeypatch):
    import kha.train.loop

    out = tmp_path / "run"
    _sigterm_when(monkeypatch, kha.train.loop, "build_optimizer")
    with pytest.raises(RunStopped, match=r"^stopped by SIGTERM before step 1; nothing was trained"):
        train(small_run(data_dir, out))
    assert ckpts(out) == [] and not (out / "metrics.jsonl").read_text() and not (out / ".lock").exists()


def test_sigterm_between_two_runs_stops_the_grid(data_dir, tmp_path, monkeypatch):
    import kha.experiments

    calls = []
    _sigterm_when(monkeypatch, kha.experiments, "run_state", lambda cfg: calls.append(cfg) or len(calls) == 2)
    base = small_run(data_dir, tmp_path / "unused", steps=2, eval_every=2, ckpt_every=2)
    with pytest.raises(RunStopped, match="^stopped by SIGTERM between two runs"):
        kha.experiments.run_grid("table2", tmp_path / "grid", seeds=1, base=base, only=["baseline", "linear-q"],
                                 log=lambda msg: None)
    assert (tmp_path / "grid" / "runs" / "baseline" / "seed_0" / "model.safetensors").exists()
    assert not (tmp_path / "grid" / "runs" / "linear-q").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the grid


STOP_ONE_RANK = """
import os, signal, sys
import kha.train.loop as loop
from kha.errors import RunStopped
from kha.train import TrainConfig, train

real = loop.lr_at

def lr_at(step, cfg):  # rank 1 alone is signalled, during step 3
    if step == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return real(step, cfg)

loop.lr_at = lr_at
try:
    train(TrainConfig(out=sys.argv[1], data=sys.argv[2], preset="tiny", seq_len=32, batch_size=4, steps=6,
                      eval_every=3, eval_batches=2, ckpt_every=6, progress=False))
except RunStopped as err:
    print(f"rank {os.environ['RANK']}: {err}", flush=True)
"""


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(data_dir, tmp_path):
    script, out = tmp_path / "stop_one_rank.py", tmp_path / "run"
    script.write_text(STOP_ONE_RANK)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), str(out), str(data_dir)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # two processes share the pipe: find each rank's report wherever its write landed
    reports = sorted(re.findall(r"rank (\d): (stopped by SIGTERM after step \d+ of \d+)", result.stdout))
    assert reports == [("0", "stopped by SIGTERM after step 3 of 6"), ("1", "stopped by SIGTERM after step 3 of 6")], (
        result.stdout[-3000:] + result.stderr[-3000:])
    ckpt = out / "checkpoints" / "step_0000003"  # the stop's checkpoint (regular ones: every 6 steps)
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("rank")) == [
        "rank00000.json", "rank00000.safetensors", "rank00001.json", "rank00001.safetensors"]
    assert ckpts(out) == ["step_0000003"] and not (out / ".lock").exists()


# ------------------------------------------------------------------------------------------ 3. verified checkpoints


def _damage(ckpt: Path, how: str) -> str:
    if how == "flip a byte":
        path = ckpt / "rank00000.safetensors"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        return "damaged (rank00000.safetensors does not match its SHA-256 in checksums.json)"
    if how == "file removed":
        (ckpt / "rank00000.json").unlink()
        return "damaged (rank00000.json is missing)"
    if how == "no checksums":
        (ckpt / "checksums.json").unlink()
        return "incomplete (no readable checksums.json"
    shutil.rmtree(ckpt)  # the `latest` pointer now names a missing folder
    return "names step_0000006, which is missing"


@pytest.mark.parametrize("how", ["flip a byte", "file removed", "no checksums", "folder removed"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(data_dir, tmp_path, reference, capsys,
                                                                         how):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    reason = _damage(out / "checkpoints" / "step_0000006", how)
    capsys.readouterr()
    train(small_run(data_dir, out, resume=True))
    said = capsys.readouterr().out
    assert reason in said and f"resumed from {out / 'checkpoints' / 'step_0000003'} (step 3)" in said
    assert losses(out) == losses(reference)  # steps 4-6 redone from step 3: the same run, bit for bit
    last = [read_metrics(run / "metrics.jsonl")[-1] for run in (out, reference)]
    assert last[0]["val_loss"] == last[1]["val_loss"]


def test_checksums_cover_every_file_and_no_intact_checkpoint_is_an_error(data_dir, tmp_path, reference):
    ckpt = reference / "checkpoints" / "step_0000006"
    sums = json.loads((ckpt / "checksums.json").read_text())["sha256"]
    files = sorted(p.name for p in ckpt.iterdir() if p.name != "checksums.json")
    assert sorted(sums) == files == ["meta.json", "rank00000.json", "rank00000.safetensors"]
    assert all(hashlib.sha256((ckpt / n).read_bytes()).hexdigest() == sums[n] for n in files)
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ckpts(out):
        _damage(out / "checkpoints" / name, "flip a byte")
    with pytest.raises(ValueError, match=r"holds checkpoints but none is complete and intact"):
        train(small_run(data_dir, out, resume=True))


# ------------------------------------------------------------------------------------------ 4. no pickle


def test_checkpoint_files_are_safetensors_and_json_only(reference):
    folders = list((reference / "checkpoints").glob("step_*"))
    assert len(folders) == 2
    for ckpt in folders:
        for path in ckpt.iterdir():
            data = path.read_bytes()
            assert not data.startswith(b"\x80"), path  # pickle protocol >= 2 starts with PROTO (0x80)
            if path.suffix == ".safetensors":  # 8-byte little-endian header length, then a JSON header
                (n,) = struct.unpack("<Q", data[:8])
                json.loads(data[8:8 + n])
            else:
                assert path.suffix == ".json"
                json.loads(data)


def test_resume_never_unpickles(data_dir, tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "checkpoints" / "step_0000006")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while resuming")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    train(small_run(data_dir, out, resume=True))
    assert losses(out) == losses(reference)


def test_checkpoint_model_state_matches_the_final_weights(reference):
    state = read_model_state(reference / "checkpoints" / "step_0000006")
    final = load_file(reference / "model.safetensors")
    assert set(final) <= set(state) and all(torch.equal(state[k], final[k]) for k in final)


@pytest.mark.slow
def test_fsdp_two_processes_resume_from_their_sharded_checkpoint(data_dir, tmp_path):
    """2 FSDP2 processes: stopped at step 3 and resumed == the uninterrupted 6 steps, bit for bit; the sharded
    checkpoint reassembles to the final weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, steps, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "kha.cli", "train", "--preset", "tiny-moe", "--knock", "mlp", "--data", str(data_dir), "--seq-len",
               "32", "--batch-size", "4", "--steps", str(steps), "--ckpt-every", "3", "--eval-every", "3",
               "--eval-batches", "2", "--no-progress", "--out", str(out), *extra]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]

    run(tmp_path / "full", 6)
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000006")  # as if killed after step 3's checkpoint
    run(tmp_path / "resumed", 6, "--resume")
    full, resumed = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("full", "resumed"))
    for key in ("loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in full], key
    ckpt = tmp_path / "full" / "checkpoints" / "step_0000006"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checksums.json", "meta.json", "rank00000.json",
                                                       "rank00000.safetensors", "rank00001.json",
                                                       "rank00001.safetensors"]
    state, final = read_model_state(ckpt), load_file(tmp_path / "full" / "model.safetensors")
    assert all(torch.equal(state[k], final[k]) for k in final)


@pytest.mark.parametrize("saved_dim", [None, 0, 1], ids=["saved-whole", "saved-rows", "saved-columns"])
def test_a_resharded_piece_is_torch_chunk_of_the_whole(tmp_path, saved_dim):
    """The piece a process reads when resharding (``_piece_here`` then ``_read_part``) is ``torch.chunk`` of the
    whole tensor along FSDP2's dimension, exactly, for 1-4 and 11 processes on 10 rows (uneven chunks, and
    processes left with an empty piece), whether the writers kept the tensor whole, split its rows or its
    columns (two writers of 5 rows or 2 and 1 columns); a layout the shards do not match, or a model whose tensor
    has another shape, is refused."""
    from contextlib import ExitStack
    from types import SimpleNamespace

    from safetensors import safe_open
    from safetensors.torch import save_file
    from torch.distributed.tensor import Shard

    from kha.train.checkpoint import _piece_here, _read_part

    whole = torch.arange(30.0).view(10, 3)
    shards = [whole] if saved_dim is None else list(whole.tensor_split([5] if saved_dim == 0 else [2], saved_dim))
    for rank, shard in enumerate(shards):
        save_file({"w": shard.contiguous()}, str(tmp_path / f"rank{rank}.safetensors"))
    info = None if saved_dim is None else {"global_shape": [10, 3], "shard_dims": [saved_dim]}
    with ExitStack() as opened:
        files = [opened.enter_context(safe_open(str(tmp_path / f"rank{r}.safetensors"), "pt"))
                 for r in range(len(shards))]
        assert torch.equal(_read_part(tmp_path, "w", files, info, None), whole)
        for world in (1, 2, 3, 4, 11):
            expected = whole.chunk(world)
            for rank in range(world):
                mesh = SimpleNamespace(size=lambda world=world: world, get_local_rank=lambda rank=rank: rank)
                leaf = SimpleNamespace(placements=(Shard(0),), device_mesh=mesh, shape=whole.shape)
                piece = _read_part(tmp_path, "w", files, info, _piece_here("w", leaf))
                assert torch.equal(piece, expected[rank] if rank < len(expected) else whole[:0]), (world, rank)
        if info is not None:  # shards that do not make the layout's global shape, or a 2-D mesh: refused, named
            with pytest.raises(ValueError, match=r"the shards of w make \[10, 3\], not its global shape \[11, 3\]"):
                _read_part(tmp_path, "w", files, {**info, "global_shape": [11, 3]}, None)
            with pytest.raises(ValueError, match=r"w is sharded over a 2-D mesh; only 1-D \(FSDP2\) sharding"):
                _read_part(tmp_path, "w", files, {**info, "shard_dims": [0, 1]}, None)
        with pytest.raises(ValueError, match=r"tensor 'w' is \[10, 3\] in the checkpoint but \[8, 3\] in this model"):
            _read_part(tmp_path, "w", files, info, (0, 0, 4), shape=[8, 3])  # a piece would fit: the whole must


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_number_of_processes(data_dir, tmp_path):
    """Stopped after step 3 and resumed on another number of processes with the global batch kept (2 x 4 and
    1 x 8, both ways), a run goes on as the uninterrupted run of the processes that wrote the checkpoint: the
    FSDP2 shards of the model and of AdamW's state reassembled and cut again. Tolerance as between 1 and 2
    processes (tests/test_train.py): relative 1e-5 on losses, 1e-4 on gradient norms."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out, processes, *extra):
        launch = (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if processes == 2 else [])
        cmd = [sys.executable, *launch, "-m", "kha.cli", "train", "--preset", "tiny-moe", "--knock", "mlp",
               "--data", str(data_dir), "--seq-len", "32", "--batch-size", str(8 // processes), "--steps", "6",
               "--ckpt-every", "3", "--eval-every", "3", "--eval-batches", "2", "--no-progress", "--out", str(out),
               *extra]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    for wrote, resumes in ((2, 1), (1, 2)):
        full, resumed = tmp_path / f"full{wrote}", tmp_path / f"from{wrote}on{resumes}"
        run(full, wrote)
        shutil.copytree(full, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_0000006")  # as if stopped after step 3's checkpoint
        assert "(step 3)" in run(resumed, resumes, "--resume")
        a, b = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
        assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
        for key, rel in (("loss", 1e-5), ("val_loss", 1e-5), ("grad_norm", 1e-4)):
            x, y = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
            assert len(x) == len(y) > 0 and y == pytest.approx(x, rel=rel), (wrote, resumes, key)
        state = read_model_state(resumed / "checkpoints" / "step_0000006")
        final = load_file(resumed / "model.safetensors")
        assert all(torch.equal(state[k], final[k]) for k in final)


# ------------------------------------------------------------------------------------------ 5. data integrity


def test_a_zeroed_or_changed_shard_is_refused(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    assert [p.name for p in verify_shards(data)] == ["tokenizer.json", "train.bin", "val.bin"]
    assert main(["data", "verify", str(data)]) == 0 and f"ok: {data / 'val.bin'}" in capsys.readouterr().out
    train_bin = data / "train.bin"
    original = train_bin.read_bytes()
    train_bin.write_bytes(bytes(len(original)))  # same size, all zeros: the size check alone passes
    with pytest.raises(ValueError, match=rf"{train_bin} is all zeros; rebuild the folder with `kha data prepare`"):
        train(small_run(data, tmp_path / "run", steps=1))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    changed = np.frombuffer(original, dtype=np.uint8).copy()
    changed[100] ^= 1
    train_bin.write_bytes(changed.tobytes())
    assert main(["data", "verify", str(data)]) == 2
    assert f"{train_bin} does not match the SHA-256 in its manifest" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 6. metrics, full disk


def test_metrics_tolerate_a_torn_last_line_and_resume_rewrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    path.write_text(whole + '{"step": 4, "lo')  # killed in the middle of writing step 4
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    import kha.train.checkpoint as ckpt_mod

    def crash(*args):
        raise KeyboardInterrupt("killed during the rewrite")

    monkeypatch.setattr(ckpt_mod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, resume_step=2)
    assert path.read_text() == whole + '{"step": 4, "lo'  # a crash mid-rewrite leaves the old file whole
    monkeypatch.undo()
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": 0.5})
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.5}]
    path.write_text(whole.replace('{"step": 2', '{"step": 2,,'))
    with pytest.raises(ValueError, match=r"line 2 is not JSON"):
        read_metrics(path)


@pytest.mark.parametrize("raised", ["OSError", "SafetensorError"])
def test_a_full_disk_names_the_checkpoint_and_keeps_the_last_good_one(data_dir, tmp_path, monkeypatch, raised):
    import safetensors.torch

    real, calls = safetensors.torch.save_file, {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            if raised == "OSError":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            # what safetensors' Rust writer really raises on a full disk (seen on a small tmpfs)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "run"
    tmp_ckpt = out / "checkpoints" / ".tmp_step_0000004"
    with pytest.raises(OSError, match=rf"No space left on device while writing checkpoint {tmp_ckpt}"):
        train(small_run(data_dir, out, ckpt_every=2))
    assert ckpts(out) == ["step_0000002"] and not tmp_ckpt.exists() and not (out / ".lock").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step_0000002"


# ------------------------------------------------------------------------------------------ 7. loss-spike events


def _noise(n: int, seed: int = 0, sd: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(0, sd) for _ in range(n)]


def _run(losses: list[float], det: SpikeDetector | None = None, first_step: int = 1) -> list[bool]:
    det = det or SpikeDetector(window=50, threshold=4.0)
    return [det.update(first_step + i, x) for i, x in enumerate(losses)]


def test_a_spike_decaying_over_40_steps_is_one_event_starting_where_the_definition_says():
    noise = _noise(300)
    losses = [3.0 + noise[i] + (0.8 * math.exp(-(i - 100) / 8) if 100 <= i < 140 else 0.0) for i in range(300)]
    det = SpikeDetector(window=50, threshold=4.0)
    flags = _run(losses, det)
    # independent: the first step whose loss exceeds the previous 50 losses' mean by more than 4 of their sd
    first = next(i for i in range(50, 300)
                 if losses[i] > statistics.mean(losses[i - 50:i]) + 4 * statistics.stdev(losses[i - 50:i]))
    assert first == 100 and det.spikes == [101] and flags.index(True) == 100 and sum(flags) == 1
    assert sum(1 for i in range(100, 140) if losses[i] > 3.0 + 4 * 0.01) > 15  # it did stay high for a while


def test_a_permanent_level_shift_is_at_most_one_event_and_later_noise_is_not_flagged():
    noise = _noise(500, seed=1)
    losses = [3.0 + noise[i] + (0.2 if i >= 100 else 0.0) for i in range(500)]
    det = SpikeDetector(window=50, threshold=4.0)
    flags = _run(losses, det)
    assert det.spikes == [101] and sum(flags) == 1
    assert not det.in_event  # the window moved to the new level and the event ended
    assert statistics.mean(det.history) == pytest.approx(3.2, abs=0.01)
    # a later ordinary excursion of 2.5 sd at the new level is not flagged, a real spike is
    assert _run([3.2 + 0.025], det, 501) == [False] and _run([3.6], det, 502) == [True]


def test_two_separated_spikes_are_two_events_and_old_files_count_runs():
    noise = _noise(400, seed=2)
    bumps = {120: 0.5, 121: 0.3, 122: 0.1, 260: 0.6, 261: 0.2}
    losses = [3.0 + noise[i] + bumps.get(i, 0.0) for i in range(400)]
    det = SpikeDetector(window=50, threshold=4.0)
    flags = _run(losses, det)
    assert det.spikes == [121, 261] and sum(flags) == 2
    records = [{"step": i + 1, "spike": f} for i, f in enumerate(flags)]
    assert count_spike_events(records) == 2
    # a file from the older per-step detector: consecutive flags are one event
    old = [{"step": s, "spike": s in (5, 6, 7, 20, 30, 31)} for s in range(1, 40)]
    assert count_spike_events(old) == 3


def test_spike_state_round_trips_mid_event():
    noise = _noise(300, seed=3)
    losses = [3.0 + noise[i] + (0.8 * math.exp(-(i - 100) / 8) if 100 <= i < 140 else 0.0) for i in range(300)]
    whole = SpikeDetector(window=50, threshold=4.0)
    flags = _run(losses, whole)
    first = SpikeDetector(window=50, threshold=4.0)
    _run(losses[:105], first)
    assert first.in_event and first.high_run > 0  # really in the middle of an event
    resumed = SpikeDetector(window=50, threshold=4.0)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # JSON, as in meta.json
    assert _run(losses[105:], resumed, 106) == flags[105:] and resumed.spikes == whole.spikes


def test_training_restores_the_spike_detector_on_resume(data_dir, tmp_path):
    """A detector sensitive enough to fire on a tiny run: flags and counts equal with and without a resume."""
    common = dict(spike_window=2, spike_threshold=0.3, steps=12, ckpt_every=6, eval_every=100)
    full = train(small_run(data_dir, tmp_path / "full", **common))
    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step_0000012")  # as if killed after step 6's checkpoint
    resumed = train(small_run(data_dir, tmp_path / "resumed", **common, resume=True))
    flags = [r["spike"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert any(flags[6:]), "pick a more sensitive detector: nothing to compare after the resume"
    assert [r["spike"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl")] == flags
    assert full["spikes"] == resumed["spikes"] == sum(flags) == count_spike_events(
        read_metrics(tmp_path / "full" / "metrics.jsonl"))


# ------------------------------------------------------------------------------------------ 8. handed folders: links

STUDY = Path(__file__).resolve().parents[1] / "docs" / "results" / "study"


def _victim(tmp_path) -> Path:
    """A file outside every folder kha is given: it must never change."""
    victim = tmp_path / "outside" / "victim.sh"
    victim.parent.mkdir(exist_ok=True)
    victim.write_text("echo precious\n")
    return victim


def _study(tmp_path) -> Path:
    study = tmp_path / "study"
    shutil.copytree(STUDY, study, ignore=shutil.ignore_patterns("*.png", "report.md"))
    return study


def test_report_refuses_a_linked_report_md_and_leaves_its_target(tmp_path, capsys):
    victim, study = _victim(tmp_path), _study(tmp_path)
    (study / "report.md").symlink_to(victim)
    fails(["report", study], capsys, f"{study / 'report.md'} is a symbolic link (to {victim})")
    assert victim.read_text() == "echo precious\n" and (study / "report.md").is_symlink()
    assert not [p for p in study.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    (study / "report.md").unlink()
    assert main(["report", str(study)]) == 0 and (study / "report.md").read_text().startswith("# study:")


@pytest.mark.parametrize("edit,expected", [
    (lambda g: {**g, "grid": "study\ntouch MARK"}, r"grid.json: grid 'study\ntouch MARK' holds the control character"),
    (lambda g: {**g, "variants": [{**g["variants"][0], "group": "a\rb"}, *g["variants"][1:]]}, "'\\r'"),
    (lambda g: {**g, "variants": [{**g["variants"][0], "name": "../../outside"}]}, "is not a folder name"),
], ids=["newline in grid", "carriage return in a group", "variant name leaves the folder"])
def test_report_refuses_json_names_that_would_inject_lines_or_paths(tmp_path, capsys, edit, expected):
    study = _study(tmp_path)
    grid = json.loads((study / "grid.json").read_text())
    (study / "grid.json").write_text(json.dumps(edit(grid)))
    fails(["report", study], capsys, str(study / "grid.json"), expected)
    assert not (study / "report.md").exists()


def test_report_does_not_read_a_run_through_a_link_out_of_the_study(tmp_path, capsys):
    study, elsewhere = _study(tmp_path), tmp_path / "elsewhere"
    run = study / "runs" / "baseline" / "seed_0"
    shutil.move(run, elsewhere)
    run.symlink_to(elsewhere)
    fails(["report", study], capsys, f"{run} leads out of {study}")


def test_plot_refuses_a_linked_png_and_leaves_its_target(tmp_path, capsys):
    victim, run = _victim(tmp_path), tmp_path / "run"
    shutil.copytree(STUDY / "runs" / "baseline" / "seed_0", run)
    (run / "loss_curves.png").symlink_to(victim)
    fails(["plot", run], capsys, f"{run / 'loss_curves.png'} is a symbolic link")
    assert victim.read_text() == "echo precious\n"
    (run / "loss_curves.png").unlink()
    assert main(["plot", str(run)]) == 0 and (run / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("mode", ["fresh", "resume", "overwrite"])
@pytest.mark.parametrize("name", ["model_config.json", "train_config.json", "metrics.jsonl", "knocks.safetensors",
                                  "checkpoints"])
def test_train_refuses_run_files_that_are_links_before_writing_anything(data_dir, tmp_path, reference, mode, name):
    """Fresh, --resume or --overwrite: a linked output (a file elsewhere, or another run's checkpoints/) is a
    one-line error before anything is written, deleted or pruned; the link's target is untouched."""
    out = tmp_path / "run"
    if mode == "fresh":
        out.mkdir()
    else:
        shutil.copytree(reference, out)
        if (out / name).is_dir():
            shutil.rmtree(out / name)
        (out / name).unlink(missing_ok=True)
    if name == "checkpoints":  # another run's checkpoints
        target = tmp_path / "other"
        shutil.copytree(reference / "checkpoints", target)
    else:
        target = _victim(tmp_path)
    before = {p: p.read_bytes() for p in ([target] if target.is_file() else sorted(target.rglob("*"))) if p.is_file()}
    (out / name).symlink_to(target)
    cfg = small_run(data_dir, out, resume=mode == "resume", overwrite=mode == "overwrite", keep_checkpoints=1)
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert str(err.value).startswith(f"{out / name} is a symbolic link (to {target})") and "\n" not in str(err.value)
    assert before == {p: p.read_bytes() for p in before} and len(before) == (1 if target.is_file() else 9)
    assert not (out / ".lock").exists()


def test_a_linked_step_folder_is_passed_over_and_never_pruned(tmp_path, reference):
    root, other = tmp_path / "checkpoints", tmp_path / "other"
    shutil.copytree(reference / "checkpoints", root)
    shutil.copytree(reference / "checkpoints", other)
    shutil.rmtree(root / "step_0000006")
    (root / "step_0000006").symlink_to(other / "step_0000006")
    said = []
    assert latest_checkpoint(root, verify=True, log=said.append) == root / "step_0000003"
    assert said == [f"using {root / 'step_0000003'}: step_0000006 is a symbolic link (kha reads no checkpoint "
                    "through a link)"]
    from kha.safe_io import LinkError, remove_tree

    with pytest.raises(LinkError, match="step_0000006 is a symbolic link"):
        remove_tree(root / "step_0000006", root)  # what pruning (--keep-checkpoints) calls
    assert sorted(p.name for p in (other / "step_0000006").iterdir()) == ["checksums.json", "meta.json",
                                                                          "rank00000.json", "rank00000.safetensors"]


def _texts(tmp_path) -> Path:
    src = tmp_path / "texts"
    src.mkdir()
    for i in range(4):
        (src / f"doc{i}.txt").write_text(f"document {i}: the cat sat on the mat and the dog ran. " * 20)
    return src


@pytest.mark.parametrize("name,expected", [("tokenizer.json", "is a symbolic link"),
                                           ("train.bin", "is a symbolic link"),
                                           ("manifest.json", "leads out of")])  # the old manifest is read first
def test_data_prepare_refuses_linked_outputs(tmp_path, name, expected):
    from kha.data.prepare import prepare

    victim, out = _victim(tmp_path), tmp_path / "data"
    out.mkdir()
    (out / name).symlink_to(victim)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out / name))} {expected}"):
        prepare([str(_texts(tmp_path))], out, vocab_size=300, verbose=False)
    assert victim.read_text() == "echo precious\n"


@pytest.mark.parametrize("how", ["shard linked out", "manifest names a file outside"])
def test_a_data_folder_is_not_read_through_links_or_names_leading_out(data_dir, tmp_path, how):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shutil.move(data / "train.bin", tmp_path / "train.bin")  # the same bytes: only where they lie differs
    if how == "shard linked out":
        (data / "train.bin").symlink_to(tmp_path / "train.bin")
        expected = f"{data / 'train.bin'} leads out of {data}"
    else:
        manifest = json.loads((data / "manifest.json").read_text())
        manifest["splits"]["train"]["file"] = "../train.bin"
        (data / "manifest.json").write_text(json.dumps(manifest))
        expected = f"{data / '../train.bin'} leads out of {data}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        verify_shards(data)


def test_hf_convert_refuses_a_linked_file_in_its_output(tmp_path, reference, capsys):
    victim, out = _victim(tmp_path), tmp_path / "hf"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    fails(["hf-convert", "--from", reference, "--out", out], capsys, f"{out / 'config.json'} is a symbolic")
    assert victim.read_text() == "echo precious\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # nothing moved in, the stage removed


def test_export_does_not_copy_a_tokenizer_json_linked_out_of_its_folder(tmp_path, capsys):
    from kha.attention import AttentionConfig
    from kha.config import ModelConfig
    from kha.hf import KHAConfig, KHAForCausalLM

    attn = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, knock="linear")
    cfg = ModelConfig(attention=attn, n_layers=1, d_ff=64, vocab_size=97)
    src, out, secret = tmp_path / "kha", tmp_path / "out", _victim(tmp_path)
    KHAForCausalLM(KHAConfig.from_model_config(cfg)).save_pretrained(src)
    (src / "tokenizer.json").symlink_to(secret)
    fails(["export", "--from", src, "--out", out], capsys, f"{src / 'tokenizer.json'} leads out of {src}")
    assert not (out / "tokenizer.json").exists() and not (out / "config.json").exists()
    (src / "tokenizer.json").unlink()
    shutil.copy(secret, src / "tokenizer.json")  # a real file in the folder is copied as before
    assert main(["export", "--from", str(src), "--out", str(out)]) == 0
    assert (out / "tokenizer.json").read_text() == "echo precious\n" and (out / "config.json").is_file()


# ------------------------------------------------------------------------------------------ 9. checkpoint metadata


def _rehash(ckpt: Path, drop: str | None = None) -> None:
    """Recompute checksums.json over the files it lists (minus ``drop``), as someone editing a checkpoint would."""
    manifest = json.loads((ckpt / "checksums.json").read_text())
    names = [n for n in manifest["sha256"] if n != drop]
    manifest["sha256"] = {n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest() for n in names}
    (ckpt / "checksums.json").write_text(json.dumps(manifest))


def _edit_meta(ckpt: Path, change) -> None:
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps(change(meta)))
    _rehash(ckpt)


def _edit_tensors(ckpt: Path, change) -> None:
    from safetensors.torch import save_file

    tensors = load_file(ckpt / "rank00000.safetensors")
    change(tensors)
    save_file(tensors, ckpt / "rank00000.safetensors")
    _rehash(ckpt)


def _edit_header(ckpt: Path, change) -> None:
    data = (ckpt / "rank00000.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    raw = change(header, data[8 + n:])
    (ckpt / "rank00000.safetensors").write_bytes(raw)
    _rehash(ckpt)


def _overlap(header, body) -> bytes:
    first, second = [k for k in header if k != "__metadata__"][:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _nan_weight(tensors) -> None:
    key = next(k for k in tensors if k.startswith("model/") and tensors[k].is_floating_point())
    tensors[key].view(-1)[0] = float("nan")


BAD_CHECKPOINTS = {
    "unlisted file": (lambda c: (c / "extra.safetensors").write_bytes(b"x"),
                      "extra.safetensors is not listed in checksums.json"),
    "unlisted corrupted tensor file": (lambda c: (_rehash(c, drop="rank00000.safetensors"),
                                                  (c / "rank00000.safetensors").write_bytes(b"\0" * 64)),
                                       "rank00000.safetensors is not listed in checksums.json"),
    "step 10^12": (lambda c: _edit_meta(c, lambda m: {**m, "step": 10**12}),
                   "step 1000000000000 is not a whole number in [0, 1000000000]"),
    "negative step": (lambda c: _edit_meta(c, lambda m: {**m, "step": -1}), "step -1 is not a whole number"),
    "step disagrees with folder": (lambda c: _edit_meta(c, lambda m: {**m, "step": 5}),
                                   "step 5 disagrees with its folder step_0000006"),
    "float step": (lambda c: _edit_meta(c, lambda m: {**m, "step": 6.0}), "step 6.0 is not a whole number"),
    "meta not a dict": (lambda c: _edit_meta(c, lambda m: [m]), "meta.json: not a JSON object"),
    "no callbacks": (lambda c: _edit_meta(c, lambda m: {k: v for k, v in m.items() if k != "callbacks"}),
                     "'callbacks' lacks the spike detector's state"),
    "binary meta": (lambda c: ((c / "meta.json").write_bytes(b"\xff\xfe\x00"), _rehash(c)), "not valid JSON"),
    "checksums not a dict": (lambda c: (c / "checksums.json").write_text("[]"),
                             "checksums.json is not a table of file names and SHA-256 digests"),
    "rank json not a dict": (lambda c: ((c / "rank00000.json").write_text("[]"), _rehash(c)), "not a rank file"),
    "wrong-sized RNG state": (lambda c: _edit_tensors(c, lambda t: t.update({"rng/cpu": t["rng/cpu"][:100]})),
                              "rng/cpu is (100,) torch.uint8, not an RNG state"),
    "huge safetensors header": (lambda c: _edit_header(c, lambda h, b: struct.pack("<Q", 2**40) + json.dumps(h)
                                                       .encode() + b), "not a readable safetensors file"),
    "overlapping safetensors header": (lambda c: _edit_header(c, _overlap), "not a readable safetensors file"),
    "NaN weights": (lambda c: _edit_tensors(c, _nan_weight), "holds NaN or infinite weights"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_malformed_checkpoint_metadata_falls_back_to_the_newest_intact_one(tmp_path, reference, case):
    """Each edit (re-hashed, so the checksums pass) makes step 6 unusable: one line names the file and what is
    wrong, and the newest intact checkpoint (step 3) is used instead."""
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    edit, reason = BAD_CHECKPOINTS[case]
    edit(root / "step_0000006")
    said = []
    assert latest_checkpoint(root, verify=True, log=said.append) == root / "step_0000003"
    assert len(said) == 1 and "\n" not in said[0] and said[0].startswith(f"using {root / 'step_0000003'}: "
                                                                         "step_0000006 is "), said
    assert reason in said[0], said


def test_a_non_finite_checkpoint_is_never_named_the_last_good_one(tmp_path, reference):
    from kha.train.loop import _stop_non_finite

    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    _edit_tensors(root / "step_0000006", _nan_weight)
    err = _stop_non_finite("loss", float("nan"), 6, root, Runtime(0, 1, torch.device("cpu")))
    assert f"The last good checkpoint is {root / 'step_0000003'};" in str(err)


def test_a_binary_latest_pointer_is_named_and_the_newest_checkpoint_used(tmp_path, reference):
    root = tmp_path / "checkpoints"
    shutil.copytree(reference / "checkpoints", root)
    (root / "latest").write_bytes(b"\xff\xfe\x00step")
    said = []
    assert latest_checkpoint(root, verify=True, log=said.append) == root / "step_0000006"
    assert said == [f"{root / 'latest'} does not name a checkpoint folder (step_N); looking for the newest "
                    "complete checkpoint"]


@pytest.mark.parametrize("case", ["step 10^12", "NaN weights"])
def test_resume_passes_over_an_edited_checkpoint_and_reproduces_the_run(data_dir, tmp_path, reference, capsys,
                                                                       case):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    edit, reason = BAD_CHECKPOINTS[case]
    edit(out / "checkpoints" / "step_0000006")
    capsys.readouterr()
    train(small_run(data_dir, out, resume=True))
    said = capsys.readouterr().out
    assert reason in said and f"resumed from {out / 'checkpoints' / 'step_0000003'} (step 3)" in said
    assert losses(out) == losses(reference)


def test_read_meta_errors_name_the_file_in_one_line(tmp_path, reference):
    from kha.train.checkpoint import CheckpointError, read_meta

    ckpt = tmp_path / "step_0000006"
    shutil.copytree(reference / "checkpoints" / "step_0000006", ckpt)
    (ckpt / "meta.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(ckpt / 'meta.json'))}: not a JSON object$"):
        read_meta(ckpt)


# ------------------------------------------------------------------------------------------ 10. metrics lines


@pytest.mark.parametrize("line,expected", [
    ("[1, 2]", "line 2 is a JSON list, not an object"),
    ('{"loss": 1.0}', "line 2 has no step"),
    ('{"step": "2", "loss": 1.0}', "line 2 has step '2', not a whole number"),
    ('{"step": true}', "line 2 has step True, not a whole number"),
    ('{"step": 1, "loss": 1.0}', "line 2 has step 1, not after the previous line's 1"),
    ('{"step": 2, "val_loss": "low"}', "line 2 has val_loss 'low', not a number"),
    ('{"step": 2, "spike": 1}', "line 2 has spike 1, not true or false"),
])
def test_malformed_metrics_lines_are_one_line_errors_naming_file_and_line(tmp_path, capsys, line, expected):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n' + line + '\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: {re.escape(expected)}; the file is damaged"):
        read_metrics(path)
    study = _study(tmp_path)  # the same line in a study: `kha report` says it in one line
    bad = study / "runs" / "baseline" / "seed_0" / "metrics.jsonl"
    bad.write_text(path.read_text())
    fails(["report", study], capsys, f"{bad}: {expected}")


def test_a_binary_metrics_file_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 12\)"):
        read_metrics(path)


def test_ablate_does_not_train_into_a_linked_runs_folder(data_dir, tmp_path):
    from kha.experiments import run_grid

    out, elsewhere = tmp_path / "grid", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "runs").symlink_to(elsewhere)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out / 'runs'))} is a symbolic link"):
        run_grid("study", out, seeds=1, base=small_run(data_dir, out, steps=1), log=lambda msg: None)
    assert list(elsewhere.iterdir()) == []


SLOW_STEP = """
import signal, sys, time
import kha.train.loop as loop, kha.train.stopsignal as stopsignal
from kha.train import TrainConfig, train

stopsignal.STOP_BOUND_S, stopsignal.REPEAT_GRACE_S, stopsignal.ANSWER_S = 1.0, 0.5, 0.5
real = loop.lr_at

def lr_at(step, cfg):  # step 2 never finishes: asleep in Python, or stuck in C as in a hung collective
    if step == 1:
        print("slow step", file=sys.stderr, flush=True)
        if sys.argv[3] == "stuck":  # SIGTERM blocked here: delivered to another thread, no Python handler runs
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        time.sleep(3600)
    return real(step, cfg)

loop.lr_at = lr_at
train(TrainConfig(out=sys.argv[1], data=sys.argv[2], preset="tiny", seq_len=32, batch_size=4, steps=6, lr=3e-3,
                  eval_every=3, eval_batches=2, ckpt_every=1, progress=False))
"""


def test_a_stop_that_hangs_says_so_and_a_second_sigterm_ends_it_then_resume_reproduces_the_run(
        data_dir, tmp_path, reference):
    """A step that does not finish after SIGTERM: the message naming how to stop at once comes within the bound
    (1 s here), and a second SIGTERM ends the process promptly although no Python handler can run (the main thread
    is made unreachable as in a hung collective: SIGTERM blocked there, so it lands on another thread); the
    checkpoints written before stay usable, and the resumed run is the uninterrupted one, bit for bit."""
    import queue
    import threading
    import time

    script, out = tmp_path / "slow_step.py", tmp_path / "run"
    script.write_text(SLOW_STEP)
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(data_dir), "stuck"], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()

    def wait_for(text: str, within: float) -> tuple[float, str]:
        start = time.monotonic()
        while (left := start + within - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
                if text in line:
                    return time.monotonic() - start, line
            except queue.Empty:
                break
        proc.kill()
        pytest.fail(f"no {text!r} within {within} s")

    try:
        wait_for("slow step", 120)
        os.kill(proc.pid, signal.SIGTERM)
        waited, line = wait_for("still stopping 1 s after SIGTERM", 10)
        assert 0.9 <= waited <= 5, waited
        assert f"send SIGTERM again (kill -TERM {proc.pid}) or press Ctrl-C, or kill -9 {proc.pid}" in line, line
        os.kill(proc.pid, signal.SIGTERM)  # > REPEAT_GRACE_S after the first
        rc = proc.wait(timeout=10)
    finally:
        proc.kill()
    assert rc == 128 + signal.SIGTERM, rc  # os._exit from the watcher: no Python handler could run
    assert ckpts(out) == ["step_0000001"] and (out / ".lock").exists()  # what the stop at once leaves
    train(small_run(data_dir, out, resume=True))  # takes the stale lock over
    assert losses(out) == losses(reference)
