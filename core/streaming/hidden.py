"""Hidden states carried from layer to layer: one `HiddenStream` per stream (the clean calibration
stream, a sequentially quantized one, a scorer's probe streams), each holding one [B, T, H] tensor
per batch.

All streams of a pass share one `SpillArea`: tensors stay in memory (on the compute device) while
the area holds less than `ram_limit_bytes`, and are written to raw files in `directory` beyond
that, then read back (into fresh memory, never a mapping) when a layer needs them. The limit is
what bounds a worker's memory when a scorer carries a probe stream per layer (`taq_kl`, `taqo`).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["HiddenStream", "SpillArea"]

#: numpy has no bfloat16: such tensors are stored through an integer view of the same width
_STORAGE_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}


@dataclass(frozen=True)
class _Spilled:
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class SpillArea:
    """RAM budget and spill directory shared by the streams of one pass."""

    def __init__(self, ram_limit_bytes: int, directory: Path | None = None) -> None:
        if ram_limit_bytes < 0:
            raise ValueError("ram_limit_bytes must be >= 0")
        self.ram_limit_bytes = int(ram_limit_bytes)
        self._parent = directory
        self._dir: Path | None = None
        self.ram_bytes = 0
        self.spilled_bytes = 0
        self.peak_ram_bytes = 0
        self._counter = 0

    def _new_path(self) -> Path:
        if self._dir is None:
            if self._parent is not None:
                Path(self._parent).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="taq-spill-", dir=self._parent))
        self._counter += 1
        return self._dir / f"{self._counter:08d}.bin"

    def admit(self, nbytes: int) -> bool:
        """True when `nbytes` more fit in RAM (and accounts for them)."""
        if self.ram_bytes + nbytes > self.ram_limit_bytes:
            return False
        self.ram_bytes += nbytes
        self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
        return True

    def release(self, nbytes: int) -> None:
        self.ram_bytes -= nbytes

    def spill(self, tensor: torch.Tensor) -> _Spilled:
        path = self._new_path()
        view = tensor.detach().contiguous().cpu().view(_STORAGE_VIEW[tensor.dtype])
        view.numpy().tofile(path)
        self.spilled_bytes += tensor.numel() * tensor.element_size()
        return _Spilled(path=path, shape=tuple(tensor.shape), dtype=tensor.dtype, device=tensor.device)

    def load(self, spilled: _Spilled) -> torch.Tensor:
        storage = _STORAGE_VIEW[spilled.dtype]
        array = np.fromfile(spilled.path, dtype=torch.empty(0, dtype=storage).numpy().dtype)
        tensor = torch.from_numpy(array).view(spilled.dtype).reshape(spilled.shape)
        return tensor.to(spilled.device)

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> SpillArea:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HiddenStream:
    """Per batch, one hidden-state tensor, in RAM or spilled."""

    def __init__(self, area: SpillArea, n_batches: int, name: str = "") -> None:
        self.area = area
        self.name = name
        self._items: list[torch.Tensor | _Spilled | None] = [None] * n_batches

    def __len__(self) -> int:
        return len(self._items)

    def put(self, batch_index: int, tensor: torch.Tensor) -> None:
        self._free(batch_index)
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        self._items[batch_index] = tensor if self.area.admit(nbytes) else self.area.spill(tensor)

    def get(self, batch_index: int) -> torch.Tensor:
        item = self._items[batch_index]
        if item is None:
            raise KeyError(f"stream {self.name!r} has no hidden states for batch {batch_index}")
        return item if isinstance(item, torch.Tensor) else self.area.load(item)

    def _free(self, batch_index: int) -> None:
        item = self._items[batch_index]
        if isinstance(item, torch.Tensor):
            self.area.release(item.numel() * item.element_size())
        elif isinstance(item, _Spilled):
            item.path.unlink(missing_ok=True)
        self._items[batch_index] = None

    def drop(self) -> None:
        """Free every batch (RAM accounting and spill files)."""
        for b in range(len(self._items)):
            self._free(b)
