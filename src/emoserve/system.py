"""Facts about this machine and process, from the operating system: physical cores, the CPU's flags, the
process's age and resident memory, and giving freed memory back to the system.

Giving freed memory back, in a long-running process (glibc; elsewhere nothing is done).

With ONNX Runtime's arena off (onnx_backend.py) every model call allocates its activations - up to ~1 GB
for 8 long clips of the large model - and frees them. glibc does not hand all of that back:
- it raises its mmap threshold to the largest block freed so far (up to 32 MiB), after which blocks
  that size come from the heap, which keeps them: under the soak a server's RSS at rest rose ~330 MB in
  its first minutes and stayed, and its peak stayed at the largest batch's. `return_freed_memory()`
  fixes the threshold at glibc's initial 128 KiB, when a Recognizer is made (the pages handed back are
  faulted in again by the next call: benchmarks/allocator.py read 1.08x call time in one run, within
  this machine's run-to-run noise; repeated single shapes read no difference);
- the smaller blocks still come from the heap, and freed pages between live ones stay resident until
  `trim()` (malloc_trim, ~0.3 ms), which Recognizer.predict_batch calls after each model call.
Both serve the library's long runs as much as the server: `predict --segments` on 3 and 30 minutes read
a peak RSS of 189 and 272 MB without them (docs/benchmarks.md section 13).
Section 6 of docs/benchmarks.md has the soak with and without them.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import time

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


@functools.cache
def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads slow matrix work down, not up)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            physical = ""
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
    except OSError:
        pass
    return max(1, min(logical, len(cores) or logical))


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (`flags` of the first processor in /proc/cpuinfo: avx512_bf16, amx_bf16, ...);
    empty where the file is not there (not Linux) or lists none."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as lines:
            for line in lines:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def process_age_s() -> float:
    """Seconds since this process started: from /proc on Linux (10 ms resolution), else since import."""
    try:
        with open("/proc/self/stat", encoding="ascii", errors="replace") as stat:
            # fields after "(comm)" start at field 3; starttime is field 22, in clock ticks since boot
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as uptime:
            since_boot_s = float(uptime.read().split()[0])
        return max(0.0, since_boot_s - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()
PROCESS_STARTED_AT = time.monotonic() - process_age_s()  # on the time.monotonic() clock


def resident_memory_bytes() -> int | None:
    """Current RSS from /proc (Linux); elsewhere the peak RSS that getrusage reports."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
