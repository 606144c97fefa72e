"""The CLI and benchmarks tune the CPU allocator without overriding a user's choice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from graphs.allocator import (
    USER_MALLOC_VARIABLES,
    VARIABLE,
    enable_transparent_hugepages,
    keep_freed_memory,
)


def test_sets_the_variable_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VARIABLE, raising=False)
    assert enable_transparent_hugepages() is True
    assert os.environ[VARIABLE] == "1"


def test_keeps_the_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "0")
    assert enable_transparent_hugepages() is False
    assert os.environ[VARIABLE] == "0"


@pytest.mark.parametrize("name", USER_MALLOC_VARIABLES)
def test_keeps_the_users_malloc_settings(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "65536")
    assert keep_freed_memory() is False


# Allocates, touches and frees a 96 MB block five times through glibc's malloc and prints the page
# faults of the last four rounds: with glibc's defaults every round maps fresh pages (98,000 faults
# here, in 4 kB pages); with freed memory kept in the heap the later rounds reuse the first round's.
_ROUNDS = textwrap.dedent(
    """
    import ctypes, ctypes.util, resource, sys
    sys.path.insert(0, sys.argv[1])
    if sys.argv[2] == "keep":
        from graphs.allocator import keep_freed_memory
        assert keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 96 << 20
    faults = 0
    for round in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        faults += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) if round else 0
    print(faults)
    """
)


def _faults(mode: str) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in USER_MALLOC_VARIABLES}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, root, mode], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again() -> None:
    default, kept = _faults("default"), _faults("keep")
    assert default >= 4 * 48  # 96 MB faulted in four times, even in 2 MB pages (the premise of the test)
    assert kept < default / 20
