"""Ask PyTorch to back large CPU tensors with transparent huge pages.

Every method here allocates many large temporaries (CD-T's per-source MLP parts, EAP's delta
rows, batched masks). Each fresh allocation is faulted in page by page on first touch, and in a
virtual machine a 4 kB page fault costs microseconds: on the 2-core CI machine an element-wise op
on a fresh 12 MB tensor spent ~7 of its 9 ms in page faults. PyTorch's CPU allocator advises the
kernel to use 2 MB pages for allocations above 2 MB when ``THP_MEM_ALLOC_ENABLE=1``; it reads the
variable once, at its first large allocation, so this must run early (the CLI and the benchmark
scripts call it at start-up). A user's own setting of the variable is kept.
"""

from __future__ import annotations

import os

VARIABLE = "THP_MEM_ALLOC_ENABLE"


def enable_transparent_hugepages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the user set it; True when it is now enabled."""
    return os.environ.setdefault(VARIABLE, "1") == "1"
