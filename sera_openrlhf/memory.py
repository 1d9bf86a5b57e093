"""Process memory per phase: the peak resident set of each phase, and handing freed memory back to the OS.

Linux only for the RSS figures (VmHWM from /proc/self/status, its mark reset with clear_refs); elsewhere the
figures are None and the loop runs the same. CUDA peaks come from torch's allocator.
"""

from __future__ import annotations

import ctypes
import gc

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> None:
    """Start a new peak-RSS window at the current RSS (clear_refs 5 resets VmHWM) and a new CUDA peak."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def usage() -> dict:
    """{peak_rss_mb, rss_mb[, cuda_peak_mb]} since the last `reset_peak()` (None where /proc is missing)."""
    peak, now = _status_kib("VmHWM"), _status_kib("VmRSS")
    out = {"peak_rss_mb": None if peak is None else round(peak / 1024), "rss_mb": None if now is None else round(now / 1024)}
    if torch.cuda.is_available():
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def release() -> None:
    """Hand memory freed by a finished phase back to the OS: Python's garbage, CUDA's cache and glibc's heap.

    Without the trim, glibc keeps the freed arenas of one phase's models (hundreds of MB each, allocated from many
    threads) mapped, and the process's RSS only grows from phase to phase."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
