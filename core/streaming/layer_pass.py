"""The layer pass: every decoder layer onloaded once, in order, doing all the per-layer work.

For layer l (onloaded at the compute dtype):
1. the calibration stream runs through the full-precision layer while `LayerInputs` records what
   its linears receive (X rows or XᵀX over valid tokens) and the scorer observes the outputs;
2. every probe stream a scorer started at an earlier layer runs through it too;
3. every linear is quantized at every stored width (round-to-nearest or GPTQ) and its error
   measured; codes and the record are checkpointed (`core.streaming.checkpoints`);
4. the scorer may start this layer's probe stream (e.g. the layer's input run through the layer
   quantized at the probe width);
5. with `calibration_inputs: quantized` the next layer's calibration inputs are this layer's
   outputs with its weights quantized at `reference_bits` (sequential calibration), while the
   full-precision stream continues alongside for the scorer;
6. the layer is offloaded and its input records freed.

Resume: a layer whose record exists (same `pass_key`) is not quantized again. Its streams are
rebuilt from the record (codes and scorer values), so every later layer sees the exact tensors an
uninterrupted run would have: same inputs, same order of operations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from core.calibration import Batch, StageProgress
from core.models import LayerRef
from core.quant.layer import LayerInputs, quantize_layer
from core.scheme import QuantScheme
from core.streaming.capture import CapturedInputs, LayerCall, capture_inputs, run_layer
from core.streaming.checkpoints import CheckpointStore, LayerRecord, load_codes, load_record, save_layer
from core.streaming.hidden import HiddenStream, SpillArea
from core.streaming.model import StreamedModel
from core.types import QuantizedWeight

if TYPE_CHECKING:
    from core.scorers.common import LayerScores, SequencePlan
    from core.spec import CalibrationRow, JobSpec

__all__ = ["LayerStep", "PassResult", "PassSettings", "StreamScorer", "run_layer_pass"]


@dataclass(frozen=True)
class PassSettings:
    widths: tuple[int, ...]  # widths whose codes are stored (< 16)
    scheme: QuantScheme  # the grid each width is quantized on
    gptq: bool
    clip_search: bool
    sequential: bool  # calibration_inputs == "quantized"
    reference_bits: int | None  # width of the sequentially quantized stream
    pass_key: str
    prefix: str = "layers"


@dataclass
class LayerStep:
    """What a scorer sees of layer `index` after its full-precision forward."""

    index: int
    ref: LayerRef
    inputs: HiddenStream  # full-precision input of the layer
    outputs: HiddenStream  # full-precision output of the layer
    record: LayerRecord
    batches: list[Batch]
    codes: Callable[[int], dict[str, QuantizedWeight]]
    run: Callable[..., HiddenStream]  # run(stream, codes=None, name="") through this layer


@dataclass
class PassResult:
    records: list[LayerRecord]
    final: HiddenStream | None  # full-precision output of the last layer
    streams: dict[str, HiddenStream]
    batches: list[Batch]
    area: SpillArea
    #: per batch, per layer: the arguments each decoder layer was called with (empty without rows)
    calls: list[list[LayerCall]] = field(default_factory=list)
    #: codes(layer, bits): a layer's stored codes, read from the checkpoint store (not cached)
    codes: Callable[[int, int], dict[str, QuantizedWeight]] | None = None


class StreamScorer(ABC):
    """A method's side of the pass: per-layer statistics of the clean stream, probe streams,
    and the final per-layer scores (`core.scorers`)."""

    method: str = ""

    def plan(self, tokenizer: Any, rows: Sequence[CalibrationRow], spec: JobSpec) -> SequencePlan | None:
        """The sequences the pass runs (`core.scorers.common.SequencePlan`); None: one rendered
        prompt per row."""
        return None

    def begin(self, batches: list[Batch], n_layers: int) -> None:
        """Called once before layer 0."""

    def observe(self, layer: int, batch_index: int, output: torch.Tensor, batch: Batch, inputs: torch.Tensor) -> None:
        """The full-precision output of `layer` for one batch and the input it came from (fresh
        layers only)."""

    def layer_values(self, layer: int) -> dict[str, float]:
        """The per-layer values to checkpoint once `layer` was observed."""
        return {}

    def restore(self, layer: int, values: dict[str, float]) -> None:
        """A resumed layer: its checkpointed values instead of observations."""

    def perturb(self, step: LayerStep) -> dict[str, HiddenStream]:
        """Probe streams that start at this layer."""
        return {}

    @abstractmethod
    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        """Per-layer `core.scorers.base.LayerScores` once every layer was processed."""


def _forward(
    layer: torch.nn.Module,
    stream: HiddenStream,
    captured: CapturedInputs,
    index: int,
    batches: list[Batch],
    tracker: StageProgress,
    name: str,
    *,
    inputs: LayerInputs | None = None,
    observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> HiddenStream:
    out = HiddenStream(stream.area, len(stream), name)
    recording = inputs.recording() if inputs is not None else nullcontext()
    with recording:
        for b in range(len(stream)):
            tracker.check()
            if inputs is not None:
                inputs.set_batch(batches[b].valid)
            source = stream.get(b)
            hidden = run_layer(layer, source, captured.calls[b][index])
            if observe is not None:
                observe(b, hidden, source)
            out.put(b, hidden)
    return out


def run_layer_pass(
    model: StreamedModel,
    batches: list[Batch],
    scorer: StreamScorer,
    settings: PassSettings,
    store: CheckpointStore,
    tracker: StageProgress,
    area: SpillArea,
) -> PassResult:
    """See the module docstring. `batches` may be empty (no calibration data: errors are relative
    weight errors and nothing is captured)."""
    n = model.n_layers
    captured = capture_inputs(model, batches) if batches else None
    n_tokens = sum(b.n_tokens for b in batches)
    clean: HiddenStream | None = None
    calib: HiddenStream | None = None
    if captured is not None:
        clean = HiddenStream(area, len(batches), "clean")
        for b, hidden in enumerate(captured.hidden):
            clean.put(b, hidden)
        captured.hidden.clear()
        calib = clean
        if settings.sequential:
            calib = HiddenStream(area, len(batches), "calibration")
            for b in range(len(batches)):
                calib.put(b, clean.get(b))
    streams: dict[str, HiddenStream] = {}
    records: list[LayerRecord] = []
    scorer.begin(batches, n)
    for index, ref in enumerate(model.layers):
        tracker.check()
        record = load_record(store, settings.prefix, index, settings.pass_key)
        fresh = record is None
        with model.onloaded(ref.name) as layer:
            inputs = LayerInputs(ref.linears, n_tokens) if fresh and captured is not None else None
            observe = (lambda b, h, x, _i=index: scorer.observe(_i, b, h, batches[b], x)) if fresh else None
            clean_out = calib_out = None
            if captured is not None:
                assert clean is not None and calib is not None  # set together with `captured`
                calib_out = _forward(
                    layer,
                    calib,
                    captured,
                    index,
                    batches,
                    tracker,
                    "calibration",
                    inputs=inputs,
                    observe=None if settings.sequential else observe,
                )
                clean_out = calib_out
                if settings.sequential:
                    clean_out = _forward(layer, clean, captured, index, batches, tracker, "clean", observe=observe)
                for name in list(streams):
                    advanced = _forward(layer, streams[name], captured, index, batches, tracker, name)
                    streams[name].drop()
                    streams[name] = advanced
            held: dict[int, dict[str, QuantizedWeight]] = {}
            if record is None:  # fresh
                weights = {name: linear.weight.detach().float() for name, linear in ref.linears.items()}
                quant = quantize_layer(
                    weights,
                    inputs,
                    sorted(set(settings.widths) | {16}),
                    scheme=settings.scheme,
                    gptq=settings.gptq,
                    clip_search=settings.clip_search,
                )
                del weights
                if inputs is not None:
                    inputs.clear()
                record = LayerRecord(
                    index=index,
                    name=ref.name,
                    pass_key=settings.pass_key,
                    params={name: int(lin.weight.numel()) for name, lin in ref.linears.items()},
                    errors=quant.errors,
                    widths=sorted(settings.widths),
                    scorer=scorer.layer_values(index),
                    in_features={name: int(lin.weight.shape[1]) for name, lin in ref.linears.items()},
                )
                save_layer(store, settings.prefix, record, quant.codes)
                held = quant.codes
            else:
                scorer.restore(index, record.scorer)

            def codes(
                bits: int, _index: int = index, _held: dict[int, dict[str, QuantizedWeight]] = held
            ) -> dict[str, QuantizedWeight]:
                if bits not in _held:
                    _held[bits] = load_codes(store, settings.prefix, _index, bits, device=model.device)
                return _held[bits]

            def run(
                stream: HiddenStream,
                codes_: dict[str, QuantizedWeight] | None = None,
                name: str = "",
                _layer: torch.nn.Module = layer,
                _index: int = index,
            ) -> HiddenStream:
                assert captured is not None  # run is handed out only when inputs were captured
                with model.swapped_linears(codes_) if codes_ else nullcontext():
                    return _forward(_layer, stream, captured, _index, batches, tracker, name)

            if captured is not None:
                assert clean is not None and calib is not None and clean_out is not None and calib_out is not None
                step = LayerStep(
                    index=index,
                    ref=ref,
                    inputs=clean,
                    outputs=clean_out,
                    record=record,
                    batches=batches,
                    codes=codes,
                    run=run,
                )
                streams.update(scorer.perturb(step))
                if settings.sequential:
                    calib_next = (
                        run(calib, codes(settings.reference_bits), "calibration")
                        if settings.reference_bits is not None
                        else calib_out
                    )
                    if calib_next is not calib_out:
                        calib_out.drop()
                    calib.drop()
                    calib = calib_next
                clean.drop()  # the layer's input (in fp mode also the calibration input)
                clean = clean_out
                if not settings.sequential:
                    calib = clean
            held.clear()
        records.append(record)
        tracker.report((index + 1) / n, f"layer {index + 1}/{n} ({ref.name}){' (checkpointed)' if not fresh else ''}")

    def stored_codes(index: int, bits: int) -> dict[str, QuantizedWeight]:
        return load_codes(store, settings.prefix, index, bits, device=model.device)

    return PassResult(
        records=records,
        final=clean,
        streams=streams,
        batches=batches,
        area=area,
        calls=captured.calls if captured is not None else [],
        codes=stored_codes,
    )


def pass_layer_values(records: Sequence[LayerRecord], key: str) -> list[float]:
    return [float(r.scorer.get(key, 0.0)) for r in records]
