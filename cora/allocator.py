"""glibc's allocator told to keep the memory a training step frees, so that the next step reuses pages
that are already mapped instead of faulting in fresh ones.

By default glibc gives memory back to the kernel as soon as more than a threshold of it is free at the top
of the heap (``M_TRIM_THRESHOLD``, twice the mmap threshold, which glibc raises to the largest block freed so
far, at most 32 MiB) and serves larger blocks by ``mmap``, unmapped again on free. A training step
allocates and frees hundreds of MB of activations and gradients in blocks of a few MB, so every step
trims and then faults the same pages in again, one 4 KiB page at a time: measured on the SmolLM2-135M shape
in one process (``benchmarks/allocator.py``), a CoRA or LoRA step took 25,000-90,000 page faults (100-350 MB
of fresh pages), the frozen LLM's none. On a virtual machine a fault also costs the host's first touch.

``keep_freed_memory`` sets, for the rest of the process: every block comes from the heap (no ``mmap`` per
block; above 32 MiB glibc would otherwise map and unmap each one, whatever its threshold: DeepSpeed's
flat buffers of the paper generator under ZeRO-3 took 114,000 faults a step that way), and the heap is
trimmed only past 2 GiB free. The resident set then stays at its peak (it already did on this path: the
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
