"""Keeping freed memory in the process (kha.train.host_memory): counted by the kernel's page-fault counter."""

import json
import platform
import subprocess
import sys

import pytest

import kha.train.loop
from kha.cli import main

# Allocates and fills a 64 MiB tensor (above glibc's largest mmap threshold) seven times and prints the page
# faults of the last four: each fresh mapping faults its 16,384 pages in again; kept memory, once the heap has
# grown to hold it, faults none.
FAULTS = """
import resource, sys, torch
from kha.train.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones(16 << 20)
before = faults()
for _ in range(4):
    torch.ones(16 << 20)
print(faults() - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_is_reused_without_page_faults():
    assert page_faults("default") >= 4 * 16_384 * 0.9  # each 64 MiB tensor mapped afresh: 16,384 pages of 4 KiB
    assert page_faults("keep") < 100


@pytest.mark.parametrize("flag", [None, "--no-keep-freed-memory"])
def test_kha_train_keeps_freed_memory_unless_told_not_to(flag, data_dir, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(kha.train.loop, "keep_freed_memory", lambda: calls.append(1) or True)
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--data", str(data_dir), "--out", str(out), "--steps", "1",
                 "--seq-len", "32", "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--no-progress",
                 "--device", "cpu", *([flag] if flag else [])]) == 0
    printed = "host memory: freed memory kept in the process" in capsys.readouterr().out
    recorded = json.loads((out / "train_config.json").read_text())["keep_freed_memory"]
    assert (len(calls), printed, recorded) == ((0, False, False) if flag else (1, True, True))
