"""Activation capture for the scorers: batching, one full-precision pass with hooks, cached layer
inputs and replay of the decoder stack from any layer.

* Sequences are right-padded into batches with an attention mask; `Batch.valid` marks real
  tokens. With right padding and causal attention real tokens never see padding, so statistics
  taken on `valid` positions equal those of unpadded runs. Padding never enters any statistic,
  reservoir, Hessian or KL.
* `run_fp_pass` runs the model once over all batches. Forward pre-hooks (`with_kwargs=True`) on
  every decoder layer record what each layer receives besides the hidden states (rotary
  `position_embeddings`, masks — per layer, so models with per-layer-type masks such as Gemma 3
  replay correctly) and the input of layer 0. Forward hooks hand every layer's output to
  observers. Optional linear pre-hooks accumulate Hessians H = XᵀX / n per linear input.
* `ActivationCache` then holds, per batch, the input of one layer; `replay` runs layers
  `start..stop-1` from it (optionally transforming a layer's output, e.g. adding noise) and
  `advance` moves the cache one layer forward. Scorers that need "layer l and everything after
  it" (taq_kl, taqo) walk l = 0..L-1 keeping only one layer's inputs in memory.

Progress is reported and cancellation checked once per decoder layer per batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from core.errors import Cancelled, UnsupportedModel
from core.models import LoadedModel
from core.modules import DecoderStack, decoder_stack
from core.types import CancelFn, ProgressFn, never_cancel, no_progress

__all__ = [
    "ActivationCache",
    "Batch",
    "HessianCollector",
    "LayerCall",
    "LayerObserver",
    "StageProgress",
    "default_batch_tokens",
    "head_logits",
    "make_batches",
    "pad_token_id",
    "run_fp_pass",
]


# ---------------------------------------------------------------------------------------------
# progress helper
# ---------------------------------------------------------------------------------------------

@dataclass
class StageProgress:
    """Maps a sub-task's [0, 1] onto [start, end] of one stage and checks cancellation."""

    progress: ProgressFn = no_progress
    should_cancel: CancelFn = never_cancel
    stage: str = "score"
    start: float = 0.0
    end: float = 1.0

    def report(self, fraction: float, message: str) -> None:
        fraction = min(1.0, max(0.0, fraction))
        self.progress(self.stage, self.start + (self.end - self.start) * fraction, message)

    def check(self) -> None:
        if self.should_cancel():
            raise Cancelled("cancelled by request")

    def span(self, start: float, end: float) -> "StageProgress":
        width = self.end - self.start
        return StageProgress(self.progress, self.should_cancel, self.stage,
                             self.start + width * start, self.start + width * end)


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor       # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    rows: tuple[int, ...]         # indices of the sequences in this batch

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def lengths(self) -> list[int]:
        return [int(x) for x in self.attention_mask.sum(dim=1)]


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def default_batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per batch: small on CPU (no gain from large batches), larger on GPUs."""
    return 16384 if torch.device(device).type == "cuda" else 2048


def make_batches(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str, *,
                 max_batch_tokens: int = 2048, max_batch_size: int = 32) -> list[Batch]:
    """Right-padded batches, longest sequences first (deterministic; minimises padding).
    A batch holds at most `max_batch_size` sequences and `max_batch_tokens` padded tokens
    (a single longer sequence still gets its own batch)."""
    if not sequences:
        raise ValueError("no sequences to batch")
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    groups: list[list[int]] = []
    for i in order:
        if not sequences[i]:
            raise ValueError(f"sequence {i} is empty")
        if groups:
            group = groups[-1]
            width = len(sequences[group[0]])  # longest first
            if len(group) < max_batch_size and (len(group) + 1) * width <= max_batch_tokens:
                group.append(i)
                continue
        groups.append([i])
    batches = []
    for group in groups:
        width = len(sequences[group[0]])
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        batches.append(Batch(input_ids=ids.to(device), attention_mask=mask.to(device), rows=tuple(group)))
    return batches


# ---------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------

class LayerObserver(Protocol):
    def on_layer_output(self, layer: int, batch_index: int, hidden: torch.Tensor, batch: Batch) -> None: ...


@dataclass
class LayerCall:
    """What a decoder layer received besides its hidden states (references, not copies)."""

    args: tuple
    kwargs: dict[str, Any]


def _split_hidden(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    hidden = kwargs.pop("hidden_states")
    return hidden, (), kwargs


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class HessianCollector:
    """Accumulates XᵀX over valid tokens of every linear's input in the decoder layers.

    Linears that receive the very same input tensor within a layer (q/k/v, gate/up) share one
    accumulator. Accumulation is in float32 on the model's device; `hessian(name)` returns
    XᵀX / n.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.sums: dict[str, torch.Tensor] = {}   # leader linear name -> XᵀX
        self.counts: dict[str, int] = {}
        self.leader: dict[str, str] = {}          # linear name -> leader name
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._valid: torch.Tensor | None = None

    def set_batch(self, batch: Batch) -> None:
        self._valid = batch.valid
        self._seen = {}

    def new_layer(self) -> None:
        self._seen = {}

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        valid = self._valid
        if valid is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(valid.shape):
            return x[valid]
        return x.reshape(-1, x.shape[-1])

    def hook(self, name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = id(x)
            if key in self._seen and self._seen[key][1] is x:
                self.leader[name] = self._seen[key][0]
                return
            self._seen[key] = (name, x)
            self.leader[name] = name
            rows = self._rows(x).to(torch.float32)
            xtx = rows.T @ rows
            if name in self.sums:
                self.sums[name] += xtx
            else:
                self.sums[name] = xtx
            self.counts[name] = self.counts.get(name, 0) + int(rows.shape[0])
        return pre_hook

    def hessian(self, name: str) -> torch.Tensor | None:
        lead = self.leader.get(name)
        if lead is None or lead not in self.sums or self.counts.get(lead, 0) == 0:
            return None
        return self.sums[lead] / self.counts[lead]

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, lead in self.leader.items():
            out.setdefault(lead, []).append(name)
        return out

    def release(self, names: Sequence[str]) -> None:
        """Drop the accumulators of these linears once their layer is done."""
        for name in names:
            lead = self.leader.get(name)
            if lead is not None and all(n in names for n, l in self.leader.items() if l == lead):
                self.sums.pop(lead, None)


# ---------------------------------------------------------------------------------------------
# cache and replay
# ---------------------------------------------------------------------------------------------

@dataclass
class ActivationCache:
    """Per batch: the input of decoder layer `position` and what every layer was called with."""

    batches: list[Batch]
    calls: list[list[LayerCall]]
    hidden: list[torch.Tensor]
    position: int = 0
    stack: DecoderStack | None = field(default=None, repr=False)

    def run_layer(self, layer: int, batch_index: int, hidden: torch.Tensor) -> torch.Tensor:
        call = self.calls[batch_index][layer]
        return _layer_output(self.stack.layers[layer](hidden, *call.args, **call.kwargs))

    def replay(self, batch_index: int, start: int | None = None, stop: int | None = None, *,
               hidden: torch.Tensor | None = None,
               transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Run layers start..stop-1 (default: `position`..end) on the cached input (or `hidden`).
        `transform(layer, output)` may replace a layer's output (it must not modify it in place).
        Returns the last layer's output (before the final norm)."""
        start = self.position if start is None else start
        stop = len(self.stack.layers) if stop is None else stop
        if hidden is None:
            if start != self.position:
                raise ValueError(f"the cache holds inputs of layer {self.position}, not {start}")
            hidden = self.hidden[batch_index]
        with torch.no_grad():
            for layer in range(start, stop):
                hidden = self.run_layer(layer, batch_index, hidden)
                if transform is not None:
                    hidden = transform(layer, hidden)
        return hidden

    def advance(self, outputs: list[torch.Tensor] | None = None) -> None:
        """Move to the next layer: its inputs are the full-precision outputs of the current one
        (computed here unless given)."""
        if outputs is None:
            with torch.no_grad():
                outputs = [self.run_layer(self.position, b, h) for b, h in enumerate(self.hidden)]
        self.hidden = list(outputs)
        self.position += 1


def head_logits(model: nn.Module, stack: DecoderStack, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head (+ final logit soft-capping when the config has it), in float32."""
    if stack.final_norm is None:
        raise UnsupportedModel(f"{type(model).__name__}: no final norm found next to the decoder layers")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedModel(f"{type(model).__name__} has no output embeddings (LM head)")
    logits = head(stack.final_norm(hidden)).float()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def run_fp_pass(loaded: LoadedModel, batches: list[Batch], *, observers: Sequence[LayerObserver] = (),
                hessians: HessianCollector | None = None, cache_inputs: bool = False,
                before_batch: Callable[[int, Batch], None] | None = None,
                tracker: StageProgress | None = None) -> ActivationCache | None:
    """One full-precision forward pass over all batches with the hooks described above.

    Returns the ActivationCache (inputs of layer 0, calls of every layer) when `cache_inputs`.
    """
    tracker = tracker or StageProgress()
    model = loaded.model
    stack = decoder_stack(model)
    n_layers = len(stack.layers)
    calls: list[list[LayerCall]] = []
    hidden0: list[torch.Tensor] = []
    state = {"batch": 0}
    handles = []

    def make_pre(index: int) -> Callable:
        def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            b = state["batch"]
            tracker.check()
            tracker.report((b + index / n_layers) / len(batches),
                           f"calibration batch {b + 1}/{len(batches)}, layer {index + 1}/{n_layers}")
            if hessians is not None:
                hessians.new_layer()
            if cache_inputs:
                hidden, rest, kw = _split_hidden(args, kwargs)
                calls[b].append(LayerCall(args=rest, kwargs=kw))
                if index == 0:
                    hidden0.append(hidden.detach())
        return pre

    def make_post(index: int) -> Callable:
        def post(module: nn.Module, args: tuple, out: Any) -> None:
            if observers:
                out_hidden = _layer_output(out)
                for obs in observers:
                    obs.on_layer_output(index, state["batch"], out_hidden, batches[state["batch"]])
        return post

    try:
        for i, layer in enumerate(stack.layers):
            handles.append(layer.register_forward_pre_hook(make_pre(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(make_post(i)))
        if hessians is not None:
            for ref in loaded.layers:
                for name, linear in ref.linears.items():
                    handles.append(linear.register_forward_pre_hook(hessians.hook(name)))
        with torch.no_grad():
            for b, batch in enumerate(batches):
                state["batch"] = b
                calls.append([])
                if hessians is not None:
                    hessians.set_batch(batch)
                if before_batch is not None:
                    before_batch(b, batch)
                _forward(model, batch)
        tracker.report(1.0, f"calibration pass done ({sum(x.n_tokens for x in batches)} tokens)")
    finally:
        for h in handles:
            h.remove()
    if hessians is not None:
        hessians.new_layer()
    if not cache_inputs:
        return None
    return ActivationCache(batches=batches, calls=calls, hidden=hidden0, position=0, stack=stack)


def _forward(model: nn.Module, batch: Batch) -> None:
    kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                              "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the pass needs hidden states, not full-vocabulary logits
    model(**kwargs)
