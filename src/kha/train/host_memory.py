"""Host memory for training on a CPU: keep freed memory in the process.

glibc's ``malloc`` serves large blocks from fresh memory mappings (from 128 KiB, a threshold it raises as such
blocks are freed, to at most 32 MiB) and gives freed memory at the top of its heap back to the system. A
training step allocates and frees the same large buffers every step (activations, their gradients, the
logits), so every step the kernel maps those pages in again, one fault and one zeroed page at a time. Kept in
the process (no mappings: ``M_MMAP_MAX`` 0; no trimming under 2 GiB: ``M_TRIM_THRESHOLD``), each step reuses
the pages of the one before (tests/test_host_memory.py counts the faults): ``kha train`` steps on a 2-core CPU
took 0.78-0.90x the time (docs/benchmarks.md, section n). The price: the process keeps the memory of its
largest step until it exits, as a caching allocator does (torch's CUDA allocator keeps GPU memory the same way).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's malloc.h
_INT_MAX = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Keep freed memory in this process from now on (glibc only): whether it could be set. For the whole
    process, and not undone: memory freed from then on stays for reuse."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): their allocators are left as they are
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
