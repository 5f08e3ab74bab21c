"""worker.resources.tune_allocator: freed mid-sized blocks go back to the kernel (glibc).

Without it, glibc's dynamic mmap threshold puts 4 MB blocks on the heap once an 8 MB block was
freed, and a live block above them keeps the heap from shrinking: the layer pass's temporaries
stayed resident (BENCHMARKS.md, Scale). Each case runs in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from worker.resources import _vm_kib, tune_allocator
if {tuned}:
    assert tune_allocator()
x = bytearray(8 << 20); del x
blocks = [bytearray(4 << 20) for _ in range(100)]
pin = bytearray(1024)
for b in blocks:
    b[::4096] = bytes(len(range(0, len(b), 4096)))
before = _vm_kib("VmRSS")
del blocks
print(before - _vm_kib("VmRSS"))
"""


def released_kib(tuned: bool) -> int:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=str(ROOT), tuned=tuned)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_freed_blocks_are_returned_only_with_the_tuned_allocator() -> None:
    assert released_kib(tuned=False) < 50 * 1024  # 400 MB freed, still resident
    assert released_kib(tuned=True) > 350 * 1024
