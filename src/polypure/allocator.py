"""Keep freed memory in the process: large CPU tensors without the kernel zeroing fresh pages for each one.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves every block above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when it is freed, so the
next block of that size is new memory again, which the kernel must fault in and zero page by page. polypure's
engines allocate such blocks in every batch (an ablation pass of 512 rows of EfficientNet-Lite0's
``block_4`` holds tensors of 45 to 270 MB), and on a 2-core CPU the kernel's work came to as much as the
computation: the selectivity ablation of 4 neurons at ``block_4`` took 32.6 s wall, 29.3 s user and 33.8 s
system time with glibc's defaults, and 14.8 s wall, 29.1 s user and 0.1 s system time with mmap left out
and freed memory kept (``benchmarks/allocator_speed.py``).

:func:`keep_freed_memory` makes that change for the process with glibc's ``mallopt``: no block from
``mmap`` (``M_MMAP_MAX = 0``; threads' own arenas still fall back to it where they must) and freed memory
kept on the heap until 2 GiB of it lies unused at its top (``M_TRIM_THRESHOLD``). The process's resident
memory then stays near its peak until it ends, which a batch run does not mind; since PyTorch asks for aligned
blocks, a freed block is reused for one of the same size only once it has merged with a free neighbour, so the
heap holds a few blocks more than the peak needs (``tests/test_allocator.py``: at most 8 blocks of 64 MiB).
:class:`~polypure.Experiment` calls it once per process, and so do Ray's workers; ``POLYPURE_KEEP_FREED_MEMORY=0``
in the environment leaves the allocator as it is. Where the C library is not glibc (macOS, musl) nothing changes.

Example
-------
>>> from polypure.allocator import keep_freed_memory
>>> keep_freed_memory() is keep_freed_memory()     # decided once per process
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: Freed memory at the heap's top above this is still given back (``mallopt`` takes an ``int``).
TRIM_THRESHOLD = 2**31 - 1
#: The environment variable that turns it off (``0``).
ENVIRONMENT = "POLYPURE_KEEP_FREED_MEMORY"

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of mapping and zeroing fresh pages (once per process).

    Returns
    -------
    bool
        Whether the allocator of this process keeps freed memory now: False where the C library is not
        glibc, where ``mallopt`` refused, or where ``POLYPURE_KEEP_FREED_MEMORY=0``.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENVIRONMENT, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return _applied
    # glibc only: musl's mallopt does nothing, other C libraries give the parameters other meanings
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return _applied
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the trim threshold first, so that a refusal of the second changes little
    _applied = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(M_MMAP_MAX, 0))
    return _applied
