"""Tune the process's CPU memory allocation for the large, short-lived tensors every method makes.

Every method here allocates many large temporaries (CD-T's per-source MLP parts, EAP's delta
rows and per-slot gradients, batched masks), frees them and allocates the same sizes again on the
next batch or call. Two defaults make each such allocation fault its pages in afresh, and in a
virtual machine a page fault costs microseconds:

* PyTorch backs tensors with 4 kB pages. With ``THP_MEM_ALLOC_ENABLE=1`` its CPU allocator advises
  the kernel to use 2 MB pages for allocations above 2 MB (on the 2-core CI machine an element-wise
  op on a fresh 12 MB tensor spent ~7 of its 9 ms in page faults without them). PyTorch reads the
  variable once, at its first large allocation, so this must run early.
* glibc serves every allocation above its mmap threshold (at most 32 MB by default) with a fresh
  ``mmap`` and returns it to the kernel on free, so the next allocation of that size faults again.
  EAP on SmolLM2-135M with 32 prompts allocates a 40 MB per-slot gradient per layer and two 444 MB
  sender buffers per call: 50-70 thousand faults and 2-3 CPU-seconds in the kernel per call, where
  the plain HF forward + backward it is compared with faults nothing. ``keep_freed_memory`` raises
  glibc's mmap and trim thresholds (``mallopt``) so freed blocks stay in the heap and are reused;
  peak memory is unchanged (measured: EAP and EAP-IG at batch 32, docs/scale.md).

These are process-wide settings, so only entry points apply them (the CLI and the benchmark
scripts, before any model is loaded); the library itself never does. A user's own
``THP_MEM_ALLOC_ENABLE`` is kept; ``keep_freed_memory`` does nothing where glibc is not the C
library or when ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` are set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

VARIABLE = "THP_MEM_ALLOC_ENABLE"
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
KEEP_BYTES = 1 << 30  # blocks below 1 GB come from the heap; up to 1 GB of freed top is kept

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


def enable_transparent_hugepages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the user set it; True when it is now enabled."""
    return os.environ.setdefault(VARIABLE, "1") == "1"


def keep_freed_memory(keep_bytes: int = KEEP_BYTES) -> bool:
    """Ask glibc to reuse freed blocks below ``keep_bytes`` instead of unmapping them; True when set."""
    if any(name in os.environ for name in USER_MALLOC_VARIABLES):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    value = min(keep_bytes, 2**31 - 1)
    return bool(mallopt(_M_MMAP_THRESHOLD, value)) and bool(mallopt(_M_TRIM_THRESHOLD, value))


def tune_cpu_allocator() -> None:
    """Both settings above; call once at an entry point, before the first model is loaded."""
    enable_transparent_hugepages()
    keep_freed_memory()
