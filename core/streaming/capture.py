"""What every decoder layer is called with, without running any decoder layer.

For each batch, the skeleton's decoder stack runs its own forward (compact embedding, masks,
rotary embeddings: all real, all small) while every decoder layer is temporarily replaced by a
catcher that records its call and passes the hidden states through; the last one stops the
forward. The result is the input of layer 0 and, per layer, the arguments the architecture gives
it (a sliding-window mask for Gemma's local layers, the shared causal mask and rotary tables for
Llama's). The recorded arguments reference the same tensors across layers, so they cost one set
per batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.calibration import Batch
from core.streaming.model import StreamedModel

__all__ = ["CapturedInputs", "LayerCall", "capture_inputs", "run_layer"]


@dataclass(frozen=True)
class LayerCall:
    """A decoder layer's arguments besides its hidden states (references, not copies)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass(frozen=True)
class CapturedInputs:
    hidden: list[torch.Tensor]  # per batch: the input of layer 0, [B, T, H]
    calls: list[list[LayerCall]]  # per batch, per layer


class _Captured(Exception):
    pass


def _catcher(index: int, last: int, calls: list[LayerCall], hidden: list[torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        states: torch.Tensor
        if args:
            states, rest = args[0], tuple(args[1:])
        else:
            states, rest = kwargs.pop("hidden_states"), ()
        calls.append(LayerCall(args=rest, kwargs=dict(kwargs)))
        if index == 0:
            hidden.append(states.detach())
        if index == last:
            raise _Captured
        return states

    return forward


def capture_inputs(model: StreamedModel, batches: list[Batch]) -> CapturedInputs:
    layers = model.stack.layers
    last = len(layers) - 1
    all_calls: list[list[LayerCall]] = []
    hidden: list[torch.Tensor] = []
    for batch in batches:
        calls: list[LayerCall] = []
        for i, layer in enumerate(layers):
            layer.forward = _catcher(i, last, calls, hidden)
        try:
            with torch.no_grad(), model.compact_embedding(batch.input_ids) as ids:
                model.stack.parent(input_ids=ids, attention_mask=batch.attention_mask.to(model.device), use_cache=False)
        except _Captured:
            pass
        finally:
            for layer in layers:
                del layer.forward  # back to the class's forward
        if len(calls) != len(layers):
            raise RuntimeError(f"captured {len(calls)} of {len(layers)} decoder layer calls")
        all_calls.append(calls)
    return CapturedInputs(hidden=hidden, calls=all_calls)


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, call: LayerCall) -> torch.Tensor:
    """One decoder layer's forward on `hidden` with its captured arguments."""
    with torch.no_grad():
        out = layer(hidden, *call.args, **call.kwargs)
    result: torch.Tensor = out[0] if isinstance(out, (tuple, list)) else out
    return result
