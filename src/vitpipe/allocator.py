"""Keep freed tensor memory in the process instead of handing it back to the OS (glibc only).

PyTorch's CPU tensors come from malloc. glibc serves a block above its mmap threshold (128 KiB at
first, raised to at most 32 MiB as such blocks are freed) with a fresh mmap and gives a heap top
above its trim threshold back to the OS, so a ViT's activations, tens of MiB a batch, are fresh
pages on every step: each 4 KiB page faults on first touch. On Fashion-MNIST's ViT-Ti/4 extraction
(batch 256, bf16) that was 1.2-4 million page faults per 5,120 images and 405-521 against 662
images/s; on MAE's train step 217 against 247 (benchmarks/RESULTS.md, "Page faults"). PyTorch's CPU
tuning guide answers this with jemalloc or tcmalloc through LD_PRELOAD, which must be set before
the process starts; glibc's own settings reach the same pages from inside it.

The price: up to TRIM_THRESHOLD of freed memory stays in the process (counted in its RSS) until
it exits or reuses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""mallopt parameters (glibc's malloc.h)."""
MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap (32 MiB: the largest glibc accepts on 64-bit)."""
TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap's top kept before any is returned to the OS."""


def keep_freed_memory() -> bool:
    """Set glibc's malloc to reuse freed blocks of up to MMAP_THRESHOLD and keep up to
    TRIM_THRESHOLD free; for this process and the DataLoader workers it forks afterwards. True when
    glibc took both settings; False elsewhere (macOS, musl, Windows: their allocators differ and
    are left alone)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
