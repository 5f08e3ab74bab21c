"""What the HF and GGUF exporters share: which linears are quantized at which width, checked once,
and deterministic file writing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ExportError
from core.modules import decoder_layers, named_linears
from core.spec import JobSpec
from core.types import QuantizedWeight

QUANTIZED_BITS = (2, 3, 4, 8)
KEEP_BITS = 16


@dataclass(frozen=True)
class LinearPlan:
    """One decoder-layer linear: its layer, width and (below 16 bits) its quantized weight."""

    name: str
    layer: str
    bits: int
    module: nn.Linear
    q: QuantizedWeight | None

    @property
    def quantized(self) -> bool:
        return self.q is not None


def plan_linears(model: nn.Module, weights: dict[str, QuantizedWeight],
                 bit_map: dict[str, int]) -> list[LinearPlan]:
    """Every linear of every decoder layer in module order, checked against the bit map.

    `bit_map` gives every decoder layer a width (per-layer allocation) or every decoder linear
    one (per-linear allocation), keyed by full dotted names. A linear below 16 bits must have a
    QuantizedWeight of that width and shape; a 16-bit linear must have none. Anything else means
    the allocation and the weights come from different runs, so it is an ExportError rather than
    a silently wrong artifact.
    """
    layers = decoder_layers(model)
    linears_by_layer = {layer_name: named_linears(model, layer_name) for layer_name, _ in layers}
    layer_names = list(linears_by_layer)
    linear_names = [name for linears in linears_by_layer.values() for name in linears]
    per_linear = bool(bit_map) and set(bit_map) <= set(linear_names)
    known = linear_names if per_linear else layer_names
    unknown = sorted(set(bit_map) - set(known))
    if unknown:
        raise ExportError(f"bit map names layers or linears the model does not have (or mixes both): "
                          f"{unknown[:3]}", details={"layers": unknown})
    missing = [name for name in known if name not in bit_map]
    if missing:
        raise ExportError(f"bit map has no width for {'linears' if per_linear else 'layers'} {missing[:3]}",
                          details={"layers": missing})

    plans: list[LinearPlan] = []
    for layer_name, linears in linears_by_layer.items():
        for name, module in linears.items():
            bits = int(bit_map[name if per_linear else layer_name])
            if bits not in QUANTIZED_BITS and bits != KEEP_BITS:
                raise ExportError(f"{name if per_linear else layer_name}: {bits} bits is not a supported width "
                                  f"(choose from {list(QUANTIZED_BITS) + [KEEP_BITS]})")
            q = weights.get(name)
            if bits == KEEP_BITS:
                if q is not None:
                    raise ExportError(f"{name} has a quantized weight but the bit map keeps it at 16 bits")
            else:
                if q is None:
                    raise ExportError(f"{name} has no quantized weight but the bit map puts it at {bits} bits")
                if q.bits != bits:
                    raise ExportError(f"{name} is quantized at {q.bits} bits but the bit map puts it at {bits}")
                if tuple(q.shape) != tuple(module.weight.shape):
                    raise ExportError(f"{name}: quantized shape {tuple(q.shape)} != weight shape "
                                      f"{tuple(module.weight.shape)}")
                expected_cols = q.n_groups * q.group_size
                if q.codes.shape != (q.shape[0], expected_cols) or q.scale.shape != (q.shape[0], q.n_groups):
                    raise ExportError(f"{name}: codes/scale shapes do not match the group layout")
            plans.append(LinearPlan(name=name, layer=layer_name, bits=bits, module=module, q=q))
    planned = {p.name for p in plans}
    stray = sorted(set(weights) - planned)
    if stray:
        raise ExportError(f"quantized weights for linears outside the decoder layers: {stray[:3]}",
                          details={"linears": stray})
    return plans


def check_spec_grid(plans: list[LinearPlan], spec: JobSpec) -> None:
    """Every quantized linear must use the spec's group size and symmetry: a config group (HF) or
    a file (GGUF) describes one grid, and a mismatch means weights from another run."""
    for p in plans:
        if p.q is not None and (p.q.group_size != spec.group_size or p.q.symmetric != spec.symmetric):
            raise ExportError(
                f"{p.name} is quantized with group_size {p.q.group_size}, symmetric {p.q.symmetric} but the "
                f"spec asks for group_size {spec.group_size}, symmetric {spec.symmetric}")


def output_embedding_name(model: nn.Module) -> str | None:
    """Full parameter name of the LM head weight (``lm_head.weight``), or None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def embeddings_tied(model: nn.Module) -> bool:
    """True when the LM head shares the input embedding's storage (SmolLM2, the tiny fixture)."""
    if not hasattr(model, "get_output_embeddings"):
        return False
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None:
        return False
    return head.weight.data_ptr() == embed.weight.data_ptr()


def to_fp16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """float16 copy of a floating tensor; an ExportError when a value does not fit (bf16/fp32
    models can hold values past 65504, which would silently become inf)."""
    out = tensor.detach().to(device="cpu", dtype=torch.float16).contiguous()
    if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(tensor).all()):
        raise ExportError(f"{name} has values outside the float16 range; it cannot be exported in float16")
    return out


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, fixed indent, trailing newline, so reruns are byte-identical."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def write_json(path: Path, obj: Any) -> Path:
    path.write_bytes(json_bytes(obj))
    return path


def text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
