"""glibc's allocator told to keep the memory a training step frees, so that the next step reuses pages
that are already mapped instead of faulting in fresh ones.

By default glibc gives memory back to the kernel as soon as more than a threshold of it is free at the top
of the heap (``M_TRIM_THRESHOLD``, twice the mmap threshold, which glibc raises to the largest block freed so
far, at most 32 MiB) and serves larger blocks by ``mmap``, unmapped again on free. A training step
allocates and frees hundreds of MB of activations and gradients, so a step can fault in again, one 4 KiB
page at a time, what the previous one gave back. Measured on the SmolLM2-135M shape (batch 8, 128 tokens):
in one process (``benchmarks/allocator.py``) a LoRA step took 24,000-38,000 page faults and a CoRA step
0-5,000 (how many depends on the adaptive threshold's history), the frozen LLM's none; under ZeRO-3 at one
rank (``benchmarks/injection.py --zero3 1``) a CoRA step took 98,000-115,000, for DeepSpeed's flat buffers
of the paper generator, which are above 32 MiB and so mapped afresh whatever the threshold. On a virtual
machine a fault also costs the host's first touch.

``keep_freed_memory`` sets, for the rest of the process: every block comes from the heap (no ``mmap`` per
block), and the heap is trimmed only past 2 GiB free. The resident set then stays at its peak (it already did on this path: the
planner's allocator factor). A thread's arena still maps a block above its 64 MiB heap (glibc's fallback).
``run.keep_freed_memory`` (default true) applies it in every trainer worker.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -2, -3, -4
"""mallopt's parameter numbers (glibc's malloc.h)."""

SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, (1 << 31) - 1), (M_TOP_PAD, 64 << 20))
"""(parameter, value): serve blocks from the heap (up to 32 MiB by the threshold, larger ones because no
block may be mapped), trim it only past 2 GiB free, and grow it 64 MiB at a time (fewer brk calls; pages
are mapped only when touched)."""


def keep_freed_memory() -> bool:
    """Apply ``SETTINGS`` with glibc's ``mallopt``; False (nothing changed) where the C library is not glibc
    or refuses a setting."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)        # the C library this process already runs on
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
