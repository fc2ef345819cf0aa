"""Giving freed memory back to the system in a long-running process (glibc; elsewhere nothing is done).

With ONNX Runtime's arena off (onnx_backend.py) every model call allocates its activations - up to ~1 GB
for 8 long clips of the large model - and frees them. glibc does not hand all of that back:
- it raises its mmap threshold to the largest block freed so far (up to 32 MiB), after which blocks
  that size come from the heap, which keeps them: under the soak a server's RSS at rest rose ~330 MB in
  its first minutes and stayed, and its peak stayed at the largest batch's. `return_freed_memory()`
  fixes the threshold at glibc's initial 128 KiB, once per serving process (the pages handed back are
  faulted in again by the next call: benchmarks/allocator.py read 1.08x call time in one run, within
  this machine's run-to-run noise; repeated single shapes read no difference);
- the smaller blocks still come from the heap, and freed pages between live ones stay resident until
  `trim()` (malloc_trim, ~0.3 ms), which the engine calls after each model call.
Section 6 of docs/benchmarks.md has the soak with and without them.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, fixed


def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None) if os.confstr("CS_GNU_LIBC_VERSION") else None
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr
        return None


_LIBC = _glibc()


def return_freed_memory() -> None:
    """Blocks of 128 KiB and more get their own mapping, which goes back to the system when freed."""
    if _LIBC is None or _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.debug("the allocator's mmap threshold is left as it is (not glibc)")


def trim() -> None:
    """Give the free pages of the heap back to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
