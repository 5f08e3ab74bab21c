"""Peak resident memory of the worker process, per stage and per job.

On Linux the kernel's high-water mark (VmHWM in /proc/self/status) is reset at each stage start by
writing "5" to /proc/self/clear_refs, so each stage's peak is its own, not the process lifetime's;
elsewhere (or where the reset is not allowed) the lifetime maximum from getrusage is reported,
which is an upper bound. A CUDA worker also records torch.cuda.max_memory_allocated per stage.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: blocks above this come from mmap and go back to the kernel when freed; the trim threshold the same
ALLOCATOR_THRESHOLD_BYTES = 128 * 1024

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (as MALLOC_MMAP_THRESHOLD_ would).

    By default glibc raises its mmap threshold up to 32 MB after freeing a large block, so the
    layer pass's many mid-sized temporaries land on the heap, fragment it, and stay resident after
    they are freed: an 8B-shaped RTN job kept 2.4 GiB after its layer pass (BENCHMARKS.md, Scale).
    False where the C library is not glibc (nothing changed)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, ALLOCATOR_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLD_BYTES)
    )


def _vm_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


def _cuda():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda
    return None


class PeakMemory:
    """`start(stage)` / `stop(stage)` around each stage; `summary()` for the job result."""

    def __init__(self) -> None:
        self.by_stage: dict[str, int] = {}
        self.gpu_by_stage: dict[str, int] = {}
        self.resettable = _reset_hwm()
        self.exact = self.resettable and _vm_kib("VmHWM") is not None

    def start(self, stage: str) -> None:
        if self.resettable:
            _reset_hwm()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()

    def stop(self, stage: str) -> None:
        hwm = _vm_kib("VmHWM") if self.exact else None
        if hwm is None:  # ru_maxrss is KiB on Linux, bytes on macOS
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.by_stage[stage] = peak if sys.platform == "darwin" else peak * 1024
        else:
            self.by_stage[stage] = hwm * 1024
        cuda = _cuda()
        if cuda is not None:
            self.gpu_by_stage[stage] = int(cuda.max_memory_allocated())

    def summary(self) -> dict[str, object]:
        data: dict[str, object] = {
            "peak_rss_bytes": max(self.by_stage.values(), default=0),
            "peak_rss_by_stage": dict(self.by_stage),
            "per_stage_reset": self.exact,
        }
        if self.gpu_by_stage:
            data["peak_gpu_bytes"] = max(self.gpu_by_stage.values())
            data["peak_gpu_by_stage"] = dict(self.gpu_by_stage)
        return data
