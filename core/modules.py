"""The one walk/swap entry point over a model's modules, keyed by full dotted names.

Everything in `core` that needs to find a decoder layer, a linear, the final norm or the LM head,
or to replace a module, goes through these functions so that naming stays consistent
(`model.layers.7`, `model.layers.7.self_attn.q_proj`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from core.errors import UnsupportedModel

__all__ = [
    "DecoderStack",
    "decoder_layers",
    "decoder_stack",
    "fused_linear_groups",
    "get_module",
    "linears_in",
    "named_linears",
    "set_module",
    "weight_name",
]

#: linears that serving runtimes fuse into one matrix (vLLM's qkv_proj and gate_up_proj): the
#: shards of a fused matrix must share one quantization scheme, so they share one width
_FUSED_SHARDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}

#: attribute names of the final norm on the module that holds the decoder layers
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")


def named_linears(model: nn.Module, prefix: str = "") -> dict[str, nn.Linear]:
    """Every `nn.Linear` under `model` by full dotted name, in module order.

    With `prefix` (e.g. ``"model.layers.3"``) only linears inside that module are returned (the
    names stay full, i.e. relative to `model`). The LM head is an `nn.Linear` too; callers that
    quantize decoder layers use `linears_in` on each layer instead.
    """
    out: dict[str, nn.Linear] = {}
    root = get_module(model, prefix) if prefix else model
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear):
            full = f"{prefix}.{name}" if prefix and name else (prefix or name)
            out[full] = module
    return out


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    """The submodule at a full dotted name (``""`` is the model itself); KeyError when absent."""
    if not dotted:
        return model
    module = model
    for part in dotted.split("."):
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            index = int(part)
            if index >= len(module):
                raise KeyError(f"no module '{dotted}' (index {index} out of range)")
            module = module[index]
        else:
            child = module._modules.get(part)
            if child is None:
                raise KeyError(f"no module '{dotted}' (missing '{part}')")
            module = child
    return module


def module_weight(model: nn.Module, dotted: str) -> torch.Tensor:
    """The ``weight`` parameter of the submodule at a full dotted name (a linear's, an embedding's)."""
    return cast(torch.Tensor, get_module(model, dotted).weight)


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at `dotted` with `new`; returns the module that was there."""
    if not dotted:
        raise ValueError("cannot replace the root module")
    parent_name, _, leaf = dotted.rpartition(".")
    parent = get_module(model, parent_name)
    old = get_module(parent, leaf)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)
    return old


@dataclass(frozen=True)
class DecoderStack:
    """Where the decoder layers live: `prefix` is the dotted name of their ModuleList
    (``model.layers``), `parent` the module holding it (owner of the final norm)."""

    prefix: str
    layers: nn.ModuleList
    parent: nn.Module
    final_norm: nn.Module | None
    final_norm_name: str | None


def decoder_stack(model: nn.Module) -> DecoderStack:
    """Find the transformer block stack: the ModuleList of repeated blocks that contain linears.

    Preference: a list whose length equals ``config.num_hidden_layers`` (text config for
    multimodal configs); among candidates the longest, then the shallowest. Raises
    UnsupportedModel when the model has no such stack.
    """
    config = getattr(model, "config", None)
    n_expected = None
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_expected = getattr(text_config, "num_hidden_layers", None)
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        first = module[0]
        if not any(isinstance(m, nn.Linear) for m in first.modules()):
            continue
        if len({type(m) for m in module}) != 1:
            continue
        candidates.append((name, module))
    if not candidates:
        raise UnsupportedModel(f"{type(model).__name__} has no stack of decoder layers that core can walk")
    exact = [c for c in candidates if n_expected is not None and len(c[1]) == n_expected]
    pool = exact or candidates
    name, layers = sorted(pool, key=lambda c: (-len(c[1]), c[0].count("."), c[0]))[0]
    parent_name = name.rpartition(".")[0]
    parent = get_module(model, parent_name)
    final_norm, final_norm_name = None, None
    for attr in _FINAL_NORM_NAMES:
        candidate = parent._modules.get(attr)
        if candidate is not None:
            final_norm = candidate
            final_norm_name = f"{parent_name}.{attr}" if parent_name else attr
            break
    return DecoderStack(
        prefix=name, layers=layers, parent=parent, final_norm=final_norm, final_norm_name=final_norm_name
    )


def weight_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """The full parameter name of `module`'s weight inside `model` (``lm_head.weight``), or None."""
    if module is None:
        return None
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}.weight"
    return None


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers in order as (full dotted name, module): ``("model.layers.0", ...)``."""
    stack = decoder_stack(model)
    return [(f"{stack.prefix}.{i}", layer) for i, layer in enumerate(stack.layers)]


def linears_in(model: nn.Module, layer_name: str) -> dict[str, nn.Linear]:
    """The linears of one decoder layer by full dotted name."""
    return named_linears(model, layer_name)


def fused_linear_groups(linear_names: list[str]) -> list[list[str]]:
    """Full linear names grouped as runtimes fuse them: q/k/v of one attention module form one
    group, gate/up of one MLP another, every other linear is its own group. Order follows the
    first member of each group."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in linear_names:
        parent, _, leaf = name.rpartition(".")
        groups.setdefault((parent, _FUSED_SHARDS.get(leaf, leaf)), []).append(name)
    return list(groups.values())
