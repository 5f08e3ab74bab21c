"""Shared by the run_job tests (test_pipeline*, test_allocation_linear): the tiny Llama's rows
and spec, hooks that record stages and progress (and crash on demand), store helpers, and whole
in-memory reference models built from the layer checkpoints."""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import core.streaming.layer_pass as layer_pass
from core.models import LoadedModel
from core.pipeline import STAGES, JobHooks, JobInputs, JobOutputs, overall_progress, run_job
from core.quant.primitives import dequantize_weight
from core.spec import CalibrationRow, JobSpec
from core.streaming.checkpoints import MemoryStore

ROWS = [
    CalibrationRow(
        prompt=f"Task {i}: summarise the number {i * 7} in words. " + "Please. " * (i % 3),
        answers=[f"{i * 7}", f"number {i * 7}"] if i % 4 else [f"{i * 7}"],
    )
    for i in range(10)
]
LAYERS = [f"model.layers.{i}" for i in range(4)]
LAYER_PREFIX = "work/layers"
LAYER_MESSAGE = re.compile(r"layer \d+/\d+ ")


def make_spec(**overrides) -> JobSpec:
    fields = dict(
        model="tiny-llama",
        method="taq",
        calibration=ROWS,
        bit_budget={"avg_bits": 6.0},
        bit_choices=[4, 8, 16],
        group_size=32,
        reservoir_size=32,
        max_tokens=48,
        seed=0,
        exports=["hf"],
    )
    fields.update(overrides)
    return JobSpec(**fields)


@contextmanager
def spy_layer_pass():
    """Records the batches, scorer, settings and layer refs `core.job_stages.JobRun.layer_pass` hands
    to `run_layer_pass` (it imports the function at call time)."""
    seen: dict[str, Any] = {"calls": 0}
    original = layer_pass.run_layer_pass

    def spy(model, batches, scorer, settings, store, tracker, area):
        seen.update(batches=list(batches), scorer=scorer, settings=settings, layers=list(model.layers))
        seen["calls"] += 1
        return original(model, batches, scorer, settings, store, tracker, area)

    layer_pass.run_layer_pass = spy
    try:
        yield seen
    finally:
        layer_pass.run_layer_pass = original


class Interrupted(Exception):
    """A crash in the middle of a job (not a cancellation)."""


class Recorder(JobHooks):
    """Records stages (with skip decisions) and progress; optionally crashes once the score stage
    reports `crash_at` (a message prefix) from `progress` or from the next `should_cancel`."""

    def __init__(
        self, *, crash_at: str | None = None, crash_in: str = "progress", cancel_at: str | None = None
    ) -> None:
        self.stages: list[tuple[str, bool, str]] = []
        self.events: list[tuple[str, float, str]] = []
        self.current: str | None = None
        self.crash_at, self.crash_in, self.cancel_at = crash_at, crash_in, cancel_at
        self.reached = False
        self.exported_tags: list[str] = []

    @contextmanager
    def stage(self, name: str, *, skipped: bool, reason: str):
        self.stages.append((name, skipped, reason))
        self.current = name
        try:
            yield
        finally:
            self.current = None

    def progress(self, stage: str, fraction: float, message: str) -> None:
        assert stage == self.current, (stage, self.current)
        self.events.append((stage, fraction, message))
        if stage == "score" and self.crash_at and message.startswith(self.crash_at):
            self.reached = True
            if self.crash_in == "progress":
                raise Interrupted(message)
        if self.cancel_at and stage == "score" and message.startswith(self.cancel_at):
            self.reached = True

    def should_cancel(self) -> bool:
        if self.crash_in == "should_cancel" and self.reached:
            raise Interrupted("crash while checking for cancellation")
        return bool(self.cancel_at) and self.reached

    def exported(self, tag: str, files: list[tuple[str, Path]]) -> dict[str, Any]:
        self.exported_tags.append(tag)
        assert all(path.is_file() for _, path in files)  # local copies still exist here
        return {"n_files": len(files)}

    def skipped(self) -> dict[str, str]:
        return {name: reason for name, skipped, reason in self.stages if skipped}


@dataclass
class Run:
    outputs: JobOutputs
    store: MemoryStore
    hooks: Recorder
    spec: JobSpec
    work_dir: Path | None = None


def run(
    spec: JobSpec, source, *, store: MemoryStore | None = None, hooks: Recorder | None = None, rows=ROWS, **inputs
) -> Run:
    store = store if store is not None else MemoryStore()
    hooks = hooks or Recorder()
    outputs = run_job(JobInputs(spec=spec, source=source, rows=list(rows), **inputs), store, hooks)
    return Run(outputs=outputs, store=store, hooks=hooks, spec=spec, work_dir=inputs.get("work_dir"))


def clone(store: MemoryStore) -> MemoryStore:
    other = MemoryStore()
    other.objects = dict(store.objects)
    return other


def artifacts(store: MemoryStore) -> dict[str, bytes]:
    return {k: v for k, v in store.objects.items() if k.startswith("artifacts/")}


def layer_blobs(store: MemoryStore, prefix: str = LAYER_PREFIX) -> dict[str, bytes]:
    return {k: v for k, v in store.objects.items() if k.startswith(prefix + "/")}


def records(store: MemoryStore, prefix: str = LAYER_PREFIX) -> list[int]:
    """Indices of the layers whose record (the commit marker) exists, whatever its pass key."""
    return sorted(
        int(k.rsplit("/", 1)[1].removesuffix(".json"))
        for k in store.objects
        if k.startswith(prefix + "/") and k.endswith(".json")
    )


def same_artifacts(store: MemoryStore, reference: MemoryStore) -> None:
    """Every artifacts/ object byte-identical."""
    assert artifacts(store) == artifacts(reference)


def count_quantize_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    """Records every quantize_layer call of the layer pass as (layer index, widths)."""
    calls: list[tuple[int, list[int]]] = []
    original = layer_pass.quantize_layer

    def counting(weights, inputs, widths, **kwargs):
        calls.append((int(next(iter(weights)).split(".")[2]), list(widths)))
        return original(weights, inputs, widths, **kwargs)

    monkeypatch.setattr(layer_pass, "quantize_layer", counting)
    return calls


def write_hf(store: MemoryStore, name: str, out: Path) -> Path:
    """The stored `artifacts/{name}/` directory written to `out` (for transformers to load)."""
    for key, data in store.objects.items():
        if key.startswith(f"artifacts/{name}/"):
            path = out / key.removeprefix(f"artifacts/{name}/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return out


def dequantized_model(loaded: LoadedModel, weights, *, fp16_rest: bool):
    """A copy of the whole model with `weights` dequantized into their linears; `fp16_rest` also
    rounds every other tensor to float16, as the exports store them."""
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():
        if fp16_rest:
            for value in model.state_dict().values():
                value.copy_(value.half().float())
        for name, q in weights.items():
            model.get_submodule(name).weight.copy_(dequantize_weight(q))
    return model.eval()


def check_progress(hooks: Recorder) -> None:
    """Stages report in STAGES order, only while running; fractions in [0, 1], monotone within a
    stage, and so the overall progress is monotone too."""
    order = [s for s, _, _ in hooks.events]
    assert order == sorted(order, key=STAGES.index)  # stages report in STAGES order
    for stage in STAGES:
        fractions = [f for s, f, _ in hooks.events if s == stage]
        assert all(0.0 <= f <= 1.0 for f in fractions)
        assert fractions == sorted(fractions), stage
    ran = {s for s, skipped, _ in hooks.stages if not skipped}
    assert set(order) <= ran
    overall = [overall_progress(s, f) for s, f, _ in hooks.events]
    assert overall == sorted(overall) and all(0.0 <= p <= 1.0 for p in overall)


def linear_inputs(model, tokenizer, sequences, names) -> dict[str, torch.Tensor]:
    """The rows every named linear receives over the valid tokens of `sequences` (whole model)."""
    from core.calibration import make_batches, pad_token_id

    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    current: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda m, args, _n=n: rows[_n].append(args[0][current["valid"]].detach().double())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            for batch in make_batches(sequences, pad_token_id(tokenizer), "cpu"):
                current["valid"] = batch.valid
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in rows.items()}


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    w = weight.detach().double()
    return float((x @ (w - approx.double()).T).square().sum() / (x @ w.T).square().sum())


def logits_gap(a, b, tokenizer) -> tuple[float, float]:
    """Max |logit difference| over valid positions of a few prompts, and the logits' scale."""
    batch = tokenizer(
        ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        la, lb = a(**batch).logits, b(**batch).logits
    mask = batch["attention_mask"].bool()
    return float((la - lb).abs()[mask].max()), float(lb.abs()[mask].max())
