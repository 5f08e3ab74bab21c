"""Lazy weight readers: open a checkpoint without materialising it, read one tensor at a time.

A checkpoint is a model directory of safetensors files (one file, several, or a
`model.safetensors.index.json`) or one GGUF file. `open_weights` parses and validates every header
up front (a broken checkpoint is a `ModelInvalid` naming the file or tensor, before any data is
read), then `read` / `read_rows` / `gather_rows` fetch tensor bytes with positioned reads into a
fresh buffer and convert them. Nothing is memory-mapped: a mapping's touched pages stay in the
process RSS, which is what streaming a 16 GB checkpoint through a small worker must avoid.

Files are named relative to the model directory in every message, never by a server path, and
everything read must resolve inside the model directory (or `confine_to`).
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ModelInvalid

__all__ = [
    "CheckpointSummary",
    "TensorInfo",
    "WeightReader",
    "inspect_checkpoint",
    "open_weights",
    "validate_shapes",
]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as stored: HF name, HF-layout shape, stored type, stored bytes, file name."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: str


@dataclass(frozen=True)
class CheckpointSummary:
    """What `inspect_checkpoint` found. `dtypes` counts tensors per stored type ("BF16", "Q4_K")."""

    files: int
    tensors: int
    total_bytes: int
    dtypes: dict[str, int] = field(default_factory=dict)


class WeightReader(ABC):
    """Reads tensors of one checkpoint on demand. A context manager; `close()` releases the files."""

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor, by Hugging Face parameter name."""

    def read(
        self, name: str, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """The whole tensor, as `from_pretrained` would load it, converted to `dtype` on `device`
        (`dtype=None`: the stored type for safetensors, float32 after dequantization for GGUF)."""
        return to_output(self._load(self._info(name), None), dtype, device)

    def read_rows(
        self,
        name: str,
        start: int,
        stop: int,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Rows [start, stop) of a 2-D tensor, reading only their bytes."""
        info = self._info(name)
        check_row_range(info, start, stop)
        return to_output(self._load(info, (start, stop)), dtype, device)

    @abstractmethod
    def _load(self, info: TensorInfo, rows: tuple[int, int] | None) -> torch.Tensor:
        """The tensor `info` names as the reader produces it, before `to_output` converts it: all of
        it (`rows` None) or rows [start, stop) of a 2-D tensor (already checked by `check_row_range`;
        a reader that cannot read those rows alone raises ValueError)."""

    @abstractmethod
    def close(self) -> None:
        """Close every file descriptor; further reads fail."""

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.infos().values())

    def gather_rows(
        self,
        name: str,
        ids: torch.Tensor,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        chunk_rows: int = 4096,
    ) -> torch.Tensor:
        """Rows at `ids` (any shape; the result is `ids.shape + (columns,)`), in the order given.

        Only row chunks that contain a requested id are read, each bounded to the ids it holds, so
        memory is one chunk plus the result (token embeddings of a 128k vocabulary)."""
        info = self._info(name)
        if len(info.shape) != 2:
            raise ValueError(f"gather_rows needs a 2-D tensor; {name} has shape {info.shape}")
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        rows, cols = info.shape
        flat = ids.reshape(-1).to(device="cpu", dtype=torch.long)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
            raise IndexError(f"row ids of {name} must lie in [0, {rows})")
        out: torch.Tensor | None = None
        chunks = torch.div(flat, chunk_rows, rounding_mode="floor")
        for chunk in torch.unique(chunks).tolist():
            where = (chunks == chunk).nonzero().reshape(-1)
            wanted = flat[where]
            lo, hi = int(wanted.min()), int(wanted.max()) + 1
            block = self.read_rows(name, lo, hi, dtype=dtype, device="cpu")
            picked = block[wanted - lo].to(device)
            if out is None:
                out = torch.empty((flat.numel(), cols), dtype=picked.dtype, device=picked.device)
            out[where.to(out.device)] = picked
            del block, picked
        if out is None:  # no ids: still honour dtype/device
            probe = dtype if dtype is not None else torch.float32
            out = torch.empty((0, cols), dtype=probe, device=device)
        return out.reshape(*ids.shape, cols)

    def _info(self, name: str) -> TensorInfo:
        known = getattr(self, "_infos", None)  # readers keep their own dict; infos() hands out copies
        try:
            return (known if known is not None else self.infos())[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in this checkpoint") from None

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # descriptors must not leak when a caller forgets close()
        try:  # noqa: SIM105 - no contextlib at interpreter shutdown, when modules may be torn down
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn modules down
            pass


def open_weights(
    directory_or_file: Path,
    *,
    gguf_file: str | None = None,
    skeleton: nn.Module | None = None,
    confine_to: Path | None = None,
) -> WeightReader:
    """Open a checkpoint for lazy reads; validates every header first (ModelInvalid otherwise).

    `directory_or_file`: a model directory of safetensors, one `.safetensors` file, or (with
    `gguf_file`, or a path ending in `.gguf`) a GGUF file. GGUF needs `skeleton`, the HF model built
    on the meta device, whose parameter names the GGUF tensors are mapped onto. `confine_to` widens
    the directory that files must resolve inside; it defaults to the model directory (for a Hugging
    Face cache snapshot, its repo folder, since snapshot files link into `../../blobs`)."""
    directory, name, is_gguf = _locate(Path(directory_or_file), gguf_file)
    root = _confinement(directory, confine_to)
    if is_gguf:
        if skeleton is None:
            raise ValueError("open_weights needs skeleton= (the HF model on the meta device) for a GGUF file")
        from core.weights.gguf_reader import GGUFWeightReader

        assert name is not None  # _locate names the file of a GGUF checkpoint
        return GGUFWeightReader(directory, name, skeleton, root)
    from core.weights.safetensors_reader import SafetensorsReader

    return SafetensorsReader(directory, name, root)


def inspect_checkpoint(
    directory_or_file: Path, *, gguf_file: str | None = None, confine_to: Path | None = None
) -> CheckpointSummary:
    """Header-only check when a job is submitted: the same validation as `open_weights`, no tensor
    data read. Raises ModelInvalid."""
    directory, name, is_gguf = _locate(Path(directory_or_file), gguf_file)
    root = _confinement(directory, confine_to)
    if is_gguf:
        from core.weights.gguf_reader import summarize_gguf

        assert name is not None  # _locate names the file of a GGUF checkpoint
        return summarize_gguf(directory, name, root)
    from core.weights.safetensors_reader import summarize_safetensors

    return summarize_safetensors(directory, name, root)


def validate_shapes(
    reader: WeightReader, expected: dict[str, tuple[int, ...]], *, optional: set[str] | frozenset[str] = frozenset()
) -> None:
    """ModelInvalid naming the first expected tensor that is missing (unless `optional`, e.g. a tied
    lm_head.weight) or whose checkpoint shape differs from the model config's."""
    infos = reader.infos()
    for name, shape in expected.items():
        info = infos.get(name)
        if info is None:
            if name in optional:
                continue
            raise ModelInvalid(f"tensor {name} is missing from the checkpoint", details={"tensor": name})
        want = tuple(int(d) for d in shape)
        if tuple(info.shape) != want:
            raise ModelInvalid(
                f"tensor {name} has shape {tuple(info.shape)} in the checkpoint "
                f"({info.file}), the model config says {want}",
                details={"tensor": name, "file": info.file, "shape": list(info.shape), "expected": list(want)},
            )


# ---- shared by the readers ------------------------------------------------------------------


def _locate(path: Path, gguf_file: str | None) -> tuple[Path, str | None, bool]:
    """(model directory, file name or None for "the directory's safetensors", is GGUF)."""
    if gguf_file is not None:
        return path, gguf_file, True
    if path.is_dir():
        return path, None, False
    if path.name.endswith(".gguf"):
        return path.parent, path.name, True
    if path.name.endswith(".safetensors"):
        return path.parent, path.name, False
    if not path.exists():
        raise ModelInvalid(f"model path '{path.name}' does not exist")
    raise ModelInvalid(f"'{path.name}' is neither a model directory, a .safetensors file nor a .gguf file")


def _confinement(directory: Path, confine_to: Path | None) -> Path:
    """Where files must resolve: `confine_to`, else the model directory, except that a Hugging Face
    cache snapshot (`models--org--name/snapshots/<rev>/`, whose files link into `../../blobs`) is
    confined to its repo folder."""
    if confine_to is not None:
        return Path(confine_to)
    if directory.parent.name == "snapshots" and directory.parent.parent.name.startswith("models--"):
        return directory.parent.parent
    return directory


def check_file_name(name: str, what: str) -> None:
    """A file named by a header or index must be a plain name inside the model directory."""
    if os.path.isabs(name) or name.startswith(("/", "\\")):  # never echo an absolute path
        shown = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        raise ModelInvalid(
            f"{what} names an absolute path (ending in '{shown}'), which is outside the model directory",
            details={"file": shown},
        )
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ModelInvalid(
            f"{what} names '{name}', which is outside the model directory (only plain file names are allowed)",
            details={"file": name},
        )


def open_model_file(directory: Path, name: str, root: Path, role: str = "file") -> tuple[int, int]:
    """Open `directory/name` for positioned reads: (fd, size). It must resolve (symlinks followed)
    inside `root` and be a regular file (a FIFO would block the reader forever)."""
    check_file_name(name, f"the requested {role}")
    try:
        real = (directory / name).resolve(strict=True)
        real_root = root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ModelInvalid(f"missing {role} {name}", details={"file": name}) from None
    if not real.is_relative_to(real_root):
        raise ModelInvalid(f"{role} {name} resolves outside the model directory", details={"file": name})
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise ModelInvalid(f"cannot open {role} {name}: {exc.strerror}", details={"file": name}) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ModelInvalid(f"{role} {name} is not a regular file", details={"file": name})
    return fd, st.st_size


def pread_exact(fd: int, nbytes: int, offset: int, *, file: str, tensor: str) -> np.ndarray:
    """`nbytes` at `offset` into a fresh uint8 array (no mapping, no intermediate bytes copy)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    view = buf.data  # a memoryview of the array's bytes
    done = 0
    while done < nbytes:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # pragma: no cover - platforms without preadv
            chunk = os.pread(fd, min(nbytes - done, 1 << 30), offset + done)
            got = len(chunk)
            buf[done : done + got] = np.frombuffer(chunk, dtype=np.uint8)
        if got == 0:  # the file shrank after its header was validated
            raise ModelInvalid(
                f"tensor {tensor} lies past the end of {file} (truncated?)", details={"tensor": tensor, "file": file}
            )
        done += got
    return buf


def to_output(tensor: torch.Tensor, dtype: torch.dtype | None, device: str | torch.device) -> torch.Tensor:
    """Convert and move, doing the conversion where the smaller copy crosses to the device."""
    device = torch.device(device)
    dtype = tensor.dtype if dtype is None else dtype
    if device.type == "cpu":
        return tensor.to(dtype)
    if dtype.itemsize <= tensor.element_size():
        return tensor.to(dtype).to(device)
    return tensor.to(device).to(dtype)


def check_row_range(info: TensorInfo, start: int, stop: int) -> None:
    if len(info.shape) != 2:
        raise ValueError(f"read_rows needs a 2-D tensor; {info.name} has shape {info.shape}")
    if not 0 <= start <= stop <= info.shape[0]:
        raise ValueError(f"rows [{start}, {stop}) are outside {info.name}'s {info.shape[0]} rows")
