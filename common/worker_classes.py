"""The worker fleet's classes (``TAQ_WORKER_CLASSES``, ``name=device:memory,…``): their parsing
and the memory notation they use. ``common.settings.Settings`` validates and resolves them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, cast

WORKER_CLASS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_MEMORY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)$", re.IGNORECASE)
_MEMORY_UNITS = {
    "b": 1,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
DEFAULT_WORKER_CLASS = "default"
QUEUE_PREFIX = "quantize"


@dataclass(frozen=True)
class WorkerClass:
    """A kind of worker in the fleet: its device and the memory one job may use on it (RAM on the
    CPU, the GPU's memory for CUDA). ``memory_bytes`` None: unknown (the preflight admits)."""

    name: str
    device: Literal["auto", "cpu", "cuda"]
    memory_bytes: int | None
    #: where the memory figure came from, for messages
    memory_source: str

    @property
    def queue(self) -> str:
        return f"{QUEUE_PREFIX}.{self.name}"


def parse_memory(text: str) -> int:
    """``24GiB`` / ``512MiB`` / ``1.5GiB`` (binary units; ``GB`` is decimal) -> bytes."""
    match = _MEMORY_RE.match(text.strip())
    if not match:
        raise ValueError(f"memory '{text}' must look like 24GiB, 512MiB or 1.5TiB")
    value = float(match.group(1)) * _MEMORY_UNITS[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"memory '{text}' must be more than 0")
    return int(value)


def parse_worker_classes(raw: str) -> list[WorkerClass]:
    """``cpu=cpu:24GiB,gpu24=cuda:24GiB`` -> classes. Raises ValueError naming the bad entry."""
    classes: list[WorkerClass] = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, sep, rest = entry.partition("=")
        device, sep2, memory = rest.partition(":")
        name, device, memory = name.strip(), device.strip().lower(), memory.strip()
        prefix = f"TAQ_WORKER_CLASSES entry '{entry}'"
        if not sep or not sep2:
            raise ValueError(f"{prefix} must look like name=device:memory (e.g. gpu24=cuda:24GiB)")
        if not WORKER_CLASS_RE.match(name):
            raise ValueError(f"{prefix}: the name must be lower-case letters, digits, '_' or '-' (max 32)")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"{prefix}: unknown device '{device}' (cpu or cuda)")
        try:
            memory_bytes = parse_memory(memory)
        except ValueError as exc:
            raise ValueError(f"{prefix}: {exc}") from None
        if any(c.name == name for c in classes):
            raise ValueError(f"{prefix}: the class name '{name}' is declared twice")
        kind = cast(Literal["cpu", "cuda"], device)  # checked above
        classes.append(WorkerClass(name, kind, memory_bytes, f"worker class '{name}' (TAQ_WORKER_CLASSES)"))
    return classes
