"""taqo_gen (core/scorers/taqo_gen.py): the paper's TAQO, the drop of 0.5·(EM + F1) of greedy
answers when only one layer is quantized, recomputed here on the whole in-memory transformers
model (a copy with one layer's stored codes installed, its own greedy generation) and compared with
what the job's score stage put in the profile; the memory refusal; the paper rule; the preflight."""

from __future__ import annotations

import copy

import pytest
import torch
from pipeline_helpers import spy_layer_pass
from test_memory import SMOLLM2_CONFIG

from core.allocation import LayerCost
from core.allocation_paper import allocate_paper
from core.data import tokenize_rows
from core.errors import InvalidSpec
from core.memory import RUNTIME_BYTES, estimate_job_memory
from core.model_dims import ModelDims
from core.models import resolve_model
from core.pipeline import JobHooks, JobInputs, run_job
from core.quant.primitives import dequantize_weight
from core.scheme import QuantScheme
from core.scorers.taqo_gen import task_score
from core.spec import CalibrationRow, JobSpec
from core.streaming.checkpoints import MemoryStore, load_codes
from core.streaming.generate import greedy_token_ids
from core.types import Profile

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]

N_LAYERS = 4
ROWS = [CalibrationRow(prompt=f"Count from {i} to {i + 5}:") for i in range(6)] + [
    CalibrationRow(prompt="What is the capital of France?", answers=["Paris"]),
    CalibrationRow(messages=[{"role": "user", "content": "Name a colour."}], answers=["Blue", "red"]),
]


def make_spec(**overrides) -> JobSpec:
    fields = dict(
        model="tiny-llama",
        method="taqo_gen",
        calibration=ROWS,
        bit_budget={"avg_bits": 6.0},
        bit_choices=[2, 4, 8, 16],
        group_size=32,
        max_tokens=64,
        exports=[],
    )
    fields.update(overrides)
    return JobSpec(**fields)


class Recorder(JobHooks):
    def __init__(self) -> None:
        self.profiles: list[Profile] = []
        self.events: list[tuple[str, float, str]] = []

    def progress(self, stage: str, fraction: float, message: str) -> None:
        self.events.append((stage, fraction, message))

    def profile_ready(self, profile: Profile) -> None:
        self.profiles.append(profile)


@pytest.fixture(scope="module")
def source(tiny_model_root):
    return resolve_model("tiny-llama", [tiny_model_root], {})


@pytest.fixture(scope="module")
def run(source):
    store, hooks = MemoryStore(), Recorder()
    with spy_layer_pass() as seen:
        run_job(JobInputs(spec=make_spec(), source=source, rows=ROWS), store, hooks)
    return hooks, store, seen


def reference_answers(model, tokenizer, prompts: list[list[int]]) -> list[str]:
    ids = greedy_token_ids(model, tokenizer, prompts, 16)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in ids]


def test_scores_are_the_whole_model_greedy_task_score(run, tiny) -> None:
    hooks, store, _ = run
    model, tokenizer = tiny
    profile = hooks.profiles[0]
    prompts = tokenize_rows(ROWS, tokenizer, 64)
    fp_answers = reference_answers(model, tokenizer, prompts)
    golds = [row.answers or [fp_answers[i]] for i, row in enumerate(ROWS)]
    fp = task_score(fp_answers, golds)
    drops = []
    for l, layer in enumerate(profile.layers):
        probe = copy.deepcopy(model)
        with torch.no_grad():
            for name, q in load_codes(store, "work/layers", l, 2).items():  # the probe: the lowest width
                probe.get_submodule(name).weight.copy_(dequantize_weight(q, torch.float32))
        expected = task_score(reference_answers(probe, tokenizer, prompts), golds)
        assert layer.scores["fp_score"] == fp
        assert layer.scores["score"] == expected, l
        assert layer.scores["delta_score"] == pytest.approx(fp - expected, abs=1e-12)
        assert layer.importance == pytest.approx(fp - expected, abs=1e-12)
        assert layer.scores["probe_bits"] == 2 and layer.scores["model_answers"] == pytest.approx(6 / 8)
        drops.append(fp - expected)
    positive = [max(0.0, d) for d in drops]
    assert max(positive) > 0, "some layer at 2 bits must change the greedy answers (else nothing is tested)"
    floor = 0.01 * sum(positive) / len(positive)
    for layer, p in zip(profile.layers, positive):
        assert layer.sensitivity == pytest.approx(p + floor)


def test_generation_reports_progress_per_variant(run) -> None:
    hooks, _, _ = run
    messages = [m for stage, _, m in hooks.events if stage == "score" and m.startswith("generating")]
    assert messages == [f"generating with variant {i} of {N_LAYERS + 1}" for i in range(1, N_LAYERS + 2)]


def test_the_pass_calibrates_on_the_prompts_it_generates_from(run, tiny) -> None:
    _, _, seen = run
    _, tokenizer = tiny
    prompts = tokenize_rows(ROWS, tokenizer, 64)
    ran = {}
    for batch in seen["batches"]:
        for r, s in enumerate(batch.rows):
            ran[s] = batch.input_ids[r, : int(batch.attention_mask[r].sum())].tolist()
    assert [ran[i] for i in range(len(ran))] == prompts


def test_refused_when_the_whole_model_does_not_fit(source) -> None:
    with pytest.raises(InvalidSpec, match="taqo_gen generates with each layer quantized.*use method 'taqo'"):
        run_job(
            JobInputs(spec=make_spec(), source=source, rows=ROWS, memory_limit_bytes=1 << 20), MemoryStore(), Recorder()
        )


def test_paper_rule_is_taqos() -> None:
    layers = [LayerCost(name=f"l{i}", params=128, sensitivity=1.0, quant_error={4: 1.0}) for i in range(12)]
    importance = {f"l{i}": float(i % 5) for i in range(12)}
    for method in ("taqo", "taqo_gen"):
        got = allocate_paper(layers, method, QuantScheme(32), importance=importance)
        # 8 layers: the first 2, the last 2 and the top 4 of the rest (l4, l9 (4.0), l3, l8 (3.0); ties: the earlier)
        assert sorted(n for n, b in got.bits.items() if b == 16) == ["l0", "l1", "l10", "l11", "l3", "l4", "l8", "l9"]
    assert JobSpec(**{**make_spec().model_dump(), "allocation": "paper"}).allocation.value == "paper"
    with pytest.raises(ValueError, match="'taq', 'taqo' and 'taqo_gen'"):
        JobSpec(**{**make_spec().model_dump(), "method": "taq_kl", "allocation": "paper"})


def test_preflight_always_counts_generation() -> None:
    dims = ModelDims.from_config(SMOLLM2_CONFIG)
    base = dict(calibration_rows=256, max_tokens=256, generation=True)
    gen = estimate_job_memory(dims, method="taqo_gen", **base)
    taqo = estimate_job_memory(dims, method="taqo", **base)
    assert gen.phase == "generation" and gen.total_bytes == gen.generation_bytes + RUNTIME_BYTES
    assert taqo.phase != "generation"  # generation there belongs to the evaluation only
