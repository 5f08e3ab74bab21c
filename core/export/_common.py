"""What the HF and GGUF exporters share: the plan of which linears are quantized at which width
(checked by key up front, each weight checked when it is loaded), where source tensors come from,
and deterministic, hashed file writing."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import torch
from torch import nn

from core.canonical_json import canonical_json
from core.errors import ExportError
from core.modules import decoder_layers, named_linears, weight_name
from core.scheme import float_zero_at
from core.spec import AllocationUnit, JobSpec
from core.types import KEEP_BITS, QUANTIZED_BITS, BitMap, QuantizedWeight

if TYPE_CHECKING:
    from types import TracebackType

    import numpy as np
    from typing_extensions import Buffer


#: one floating tensor of the source model by state-dict name, on the CPU, in any float dtype;
#: called once per tensor, and the exporters drop the result once it is written
TensorFetcher = Callable[[str], torch.Tensor]


def model_tensors(model: nn.Module) -> TensorFetcher:
    """A TensorFetcher over an in-memory model's state dict."""
    state = model.state_dict()

    def fetch(name: str) -> torch.Tensor:
        tensor: torch.Tensor = state[name]
        return tensor.detach()

    return fetch


@dataclass(frozen=True)
class ExportedFile:
    """One written file: `name` relative to the directory the caller gave, sha256 computed while writing."""

    name: str
    path: Path
    size: int
    sha256: str

    def __fspath__(self) -> str:  # lets callers that expected a Path pass this on unchanged
        return str(self.path)


class HashingWriter:
    """A binary file that accumulates sha256 and size as bytes go out."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Buffer | np.ndarray[Any, Any]) -> int:
        view = memoryview(cast("Buffer", data)).cast("B")  # numpy's stubs give arrays no __buffer__ before 3.12
        self._digest.update(view)
        self._file.write(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def result(self, name: str) -> ExportedFile:
        return ExportedFile(name=name, path=self.path, size=self.size, sha256=self._digest.hexdigest())


def hashed_file(path: Path, name: str) -> ExportedFile:
    """ExportedFile of a small file already written (JSON, tokenizer files)."""
    data = Path(path).read_bytes()
    return ExportedFile(name=name, path=Path(path), size=len(data), sha256=hashlib.sha256(data).hexdigest())


class OutputGuard:
    """Removes what an export wrote when it fails, so no half-written artifact is left behind:
    the directory if the export created it, otherwise the files it registered."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.created = not self.directory.exists()
        self.paths: list[Path] = []
        self.directory.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> OutputGuard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            return
        if self.created:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            for path in self.paths:
                path.unlink(missing_ok=True)


@dataclass(frozen=True)
class LinearPlan:
    """One decoder-layer linear: its layer, width and weight shape [out, in]; its QuantizedWeight
    (below 16 bits) is loaded only when it is written (`load_weight`)."""

    name: str
    layer: str
    bits: int
    shape: tuple[int, int]

    @property
    def quantized(self) -> bool:
        return self.bits != KEEP_BITS


def plan_linears(model: nn.Module, weights: Mapping[str, QuantizedWeight], bit_map: BitMap) -> list[LinearPlan]:
    """Every linear of every decoder layer in module order, checked against the bit map by name.

    `bit_map` gives every decoder layer a width (unit layer) or every decoder linear one (unit
    linear), keyed by full dotted names. A linear below 16 bits must have a
    weight, a 16-bit linear none. Only `weights`' keys are read here (it may load lazily);
    `load_weight` checks each weight when it is written. Anything inconsistent means the
    allocation and the weights come from different runs: an ExportError, not a wrong artifact.
    """
    layers = decoder_layers(model)
    linears_by_layer = {layer_name: named_linears(model, layer_name) for layer_name, _ in layers}
    layer_names = list(linears_by_layer)
    linear_names = [name for linears in linears_by_layer.values() for name in linears]
    per_linear = bit_map.unit == AllocationUnit.linear
    known = linear_names if per_linear else layer_names
    unknown = sorted(set(bit_map.bits) - set(known))
    if unknown:
        raise ExportError(
            f"bit map names {'linears' if per_linear else 'layers'} the model does not have: {unknown[:3]}",
            details={"layers": unknown},
        )
    missing = [name for name in known if name not in bit_map.bits]
    if missing:
        raise ExportError(
            f"bit map has no width for {'linears' if per_linear else 'layers'} {missing[:3]}",
            details={"layers": missing},
        )

    available = set(weights.keys())  # a Mapping's default `in` would load the weight
    plans: list[LinearPlan] = []
    for layer_name, linears in linears_by_layer.items():
        for name, module in linears.items():
            bits = int(bit_map.bits[name if per_linear else layer_name])
            if bits not in QUANTIZED_BITS and bits != KEEP_BITS:
                raise ExportError(
                    f"{name if per_linear else layer_name}: {bits} bits is not a supported width "
                    f"(choose from {list(QUANTIZED_BITS) + [KEEP_BITS]})"
                )
            present = name in available
            if bits == KEEP_BITS and present:
                raise ExportError(f"{name} has a quantized weight but the bit map keeps it at 16 bits")
            if bits != KEEP_BITS and not present:
                raise ExportError(f"{name} has no quantized weight but the bit map puts it at {bits} bits")
            shape = cast(tuple[int, int], tuple(int(s) for s in module.weight.shape))  # [out, in]
            plans.append(LinearPlan(name=name, layer=layer_name, bits=bits, shape=shape))
    planned = {p.name for p in plans}
    stray = sorted(available - planned)
    if stray:
        raise ExportError(
            f"quantized weights for linears outside the decoder layers: {stray[:3]}", details={"linears": stray}
        )
    return plans


def load_weight(plan: LinearPlan, weights: Mapping[str, QuantizedWeight], spec: JobSpec) -> QuantizedWeight:
    """`weights[plan.name]`, read once, checked against the plan and the spec's grid (one config
    group (HF) or one file (GGUF) describes one grid; a mismatch means weights from another run)."""
    q = weights[plan.name]
    name = plan.name
    if q.bits != plan.bits:
        raise ExportError(f"{name} is quantized at {q.bits} bits but the bit map puts it at {plan.bits}")
    if tuple(q.shape) != plan.shape:
        raise ExportError(f"{name}: quantized shape {tuple(q.shape)} != weight shape {plan.shape}")
    expected_cols = q.n_groups * q.group_size
    if tuple(q.codes.shape) != (q.shape[0], expected_cols) or tuple(q.scale.shape) != (q.shape[0], q.n_groups):
        raise ExportError(f"{name}: codes/scale shapes do not match the group layout")
    group_size = spec.scheme.group_size_at(q.bits)
    if q.group_size != group_size or q.symmetric != spec.symmetric:
        raise ExportError(
            f"{name} is quantized with group_size {q.group_size}, symmetric {q.symmetric} but the "
            f"spec asks for group_size {group_size}, symmetric {spec.symmetric} at {q.bits} bits"
        )
    if q.float_zero != float_zero_at(q.bits, spec.symmetric, spec.float_zero):
        raise ExportError(
            f"{name} is stored with {'a float' if q.float_zero else 'an integer'} zero point but the spec asks "
            f"for zero_point {spec.zero_point.value!r}"
        )
    return q


def output_embedding_name(model: nn.Module) -> str | None:
    """Full parameter name of the LM head weight (``lm_head.weight``), or None."""
    hf: Any = model  # a transformers model, or a plain module without the method
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    return weight_name(model, head)


def embeddings_tied(model: nn.Module) -> bool:
    """True when the LM head shares the input embedding (SmolLM2, the tiny fixture). By identity
    or the config, never by storage: a meta skeleton's tensors all have data_ptr 0."""
    hf: Any = model  # a transformers model, or a plain module without the methods
    if not hasattr(hf, "get_output_embeddings"):
        return False
    head, embed = hf.get_output_embeddings(), hf.get_input_embeddings()
    if head is None or embed is None:
        return False
    return head.weight is embed.weight or bool(getattr(text_config(model), "tie_word_embeddings", False))


def state_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(state-dict name, tensor: possibly meta, for shape and dtype only) in state-dict order,
    without a tied LM head."""
    head = output_embedding_name(model)
    skip = head if (head is not None and embeddings_tied(model)) else None
    return [(key, value) for key, value in model.state_dict().items() if key != skip]


_FINITE_CHECK_ELEMENTS = 1 << 22


def to_fp16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """float16 copy of a floating tensor; an ExportError when a value does not fit (bf16/fp32
    models can hold values past 65504, which would silently become inf)."""
    out = tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
    flat_out, flat_in = out.reshape(-1), tensor.detach().reshape(-1)
    # checked in slices: whole-tensor masks of an 8B model's embedding would add 1 GB to the peak
    for start in range(0, flat_out.numel(), _FINITE_CHECK_ELEMENTS):
        part = slice(start, start + _FINITE_CHECK_ELEMENTS)
        if not bool(torch.isfinite(flat_out[part]).all()) and bool(torch.isfinite(flat_in[part]).all()):
            raise ExportError(f"{name} has values outside the float16 range; it cannot be exported in float16")
    return out


@dataclass(frozen=True)
class Fp16Parts:
    """A floating tensor to be stored as float16, converted a slice of rows at a time while it is
    written: an 8B model's embedding and untied head would each take 1 GB more at once."""

    name: str
    value: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.value.numel() * 2

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.value.dim() == 0:
            yield to_fp16(self.name, self.value)
            return
        rows = max(1, _FINITE_CHECK_ELEMENTS // max(1, self.value[0].numel()))
        for part in torch.split(self.value, rows):
            yield to_fp16(self.name, part)


def write_json(path: Path, obj: Any) -> Path:
    path.write_bytes(canonical_json(obj))
    return path


def text_config(model: nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
