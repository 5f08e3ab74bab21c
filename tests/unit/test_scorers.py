"""The method scorers (core/scorers/) as layer-pass `StreamScorer`s, on the tiny random Llama.

The strongest tests recompute every score from its definition (the module docstrings) on the
WHOLE in-memory transformers model — forward hooks on the decoder layers and linears, the model's
own logits, a copy with one layer's weights replaced, the model's own greedy generation — and
compare with what the streamed score stage (`core.pipeline.run_job`) put in the profile. The
batches the pass ran are taken from the pass itself (a spy around `run_layer_pass`), because the
reservoir and the TAQ-KL noise are drawn batch by batch; everything else is computed here.

Also: profile contract, reservoir and spectrum internals, determinism, padding, progress,
cancellation, resume from layer checkpoints, and a Gemma-3 model (sliding-window masks, logit
soft-capping) for TAQ-KL.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from pipeline_helpers import spy_layer_pass

from core.calibration import Batch, StageProgress, make_batches, pad_token_id
from core.errors import Cancelled, DataError, InvalidSpec
from core.models import resolve_model
from core.pipeline import JobHooks, JobInputs, run_job
from core.quant.gptq import gptq_quantize_weights
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scorers import make_scorer
from core.scorers.common import (
    LayerOutputStats,
    build_profile,
    exp_sensitivity,
    lowest_bits,
    prompt_plan,
    select_rows,
    zscore,
)
from core.scorers.taq import TokenReservoir, covariance_entropy, matrix_entropy
from core.spec import CalibrationRow, JobSpec
from core.streaming.checkpoints import MemoryStore
from core.streaming.hidden import SpillArea
from core.streaming.layer_pass import PassSettings, StreamScorer, run_layer_pass
from core.streaming.model import open_streamed
from core.types import Profile

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


METHODS = ["taq", "taq_kl", "taqo", "taq_grad", "uniform"]
N_LAYERS = 4
#: the layer pass's per-layer progress message
LAYER_REPORT = re.compile(r"layer \d+/\d+ ")
#: padded tokens per batch: small enough that the rows make several batches, most of them padded
BATCH_TOKENS = 200

ROWS = [
    CalibrationRow(prompt=f"Question {i}: what is {i} plus {2 * i}? " + "Think step by step. " * (i % 4))
    for i in range(7)
] + [
    CalibrationRow(prompt="What is the capital of France?", answers=["Paris", "paris"]),
    CalibrationRow(
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
        answers=["Blue"],
    ),
]


def make_spec(method: str = "taq", **overrides) -> JobSpec:
    fields = dict(
        model="tiny-llama",
        method=method,
        calibration=ROWS,
        bit_budget={"avg_bits": 6.0},
        bit_choices=[4, 8, 16],
        group_size=32,
        reservoir_size=32,
        max_tokens=64,
        seed=0,
        exports=[],
    )
    fields.update(overrides)
    return JobSpec(**fields)


# ---------------------------------------------------------------------------------------------
# running the score stage (the pipeline's own path) and seeing what the pass ran
# ---------------------------------------------------------------------------------------------


class Recorder(JobHooks):
    def __init__(self, should_cancel: Callable[[], bool] | None = None) -> None:
        self.events: list[tuple[str, float, str]] = []
        self.profiles: list[Profile] = []
        self.stages: list[tuple[str, bool]] = []
        self._cancel = should_cancel

    def stage(self, name: str, *, skipped: bool, reason: str):
        self.stages.append((name, skipped))
        return nullcontext()

    def progress(self, stage: str, fraction: float, message: str) -> None:
        self.events.append((stage, fraction, message))

    def should_cancel(self) -> bool:
        return bool(self._cancel()) if self._cancel is not None else False

    def profile_ready(self, profile: Profile) -> None:
        self.profiles.append(profile)


@dataclass
class Run:
    profile: Profile  # the score stage's profile (before allocation)
    batches: list[Batch]  # what the layer pass ran, in its order
    scorer: StreamScorer
    settings: PassSettings
    hooks: Recorder
    store: MemoryStore
    calls: int = 0  # layer passes run

    @property
    def sequences(self) -> list[list[int]]:
        """The pass's token sequences (unpadded), by sequence index."""
        out: dict[int, list[int]] = {}
        for batch in self.batches:
            for r, s in enumerate(batch.rows):
                out[s] = batch.input_ids[r, : int(batch.attention_mask[r].sum())].tolist()
        return [out[i] for i in range(len(out))]


def score(
    source,
    method: str = "taq",
    *,
    rows: list[CalibrationRow] | None = None,
    hooks: Recorder | None = None,
    store: MemoryStore | None = None,
    batch_tokens: int = BATCH_TOKENS,
    **overrides,
) -> Run:
    rows = ROWS if rows is None else rows
    spec = make_spec(method, **overrides)
    hooks = hooks or Recorder()
    store = store if store is not None else MemoryStore()
    with spy_layer_pass() as seen:
        run_job(JobInputs(spec=spec, source=source, rows=rows, batch_tokens=batch_tokens), store, hooks)
    return Run(
        profile=hooks.profiles[0],
        batches=seen.get("batches", []),
        scorer=seen.get("scorer"),
        settings=seen.get("settings"),
        hooks=hooks,
        store=store,
        calls=seen["calls"],
    )


def score_low_level(
    source, spec: JobSpec, scorer: StreamScorer, rows: list[CalibrationRow], *, batch_tokens: int = BATCH_TOKENS
) -> tuple[Profile, list[Batch]]:
    """The pass without the pipeline (for scorer options the pipeline does not pass)."""
    model = open_streamed(source)
    try:
        rows = select_rows(rows, spec)
        plan = scorer.plan(model.tokenizer, rows, spec) or prompt_plan(model.tokenizer, rows, spec)
        batches = make_batches(
            plan.sequences, pad_token_id(model.tokenizer), model.device, max_batch_tokens=batch_tokens
        )
        settings = PassSettings(
            widths=tuple(b for b in spec.bit_choices if b < 16),
            scheme=spec.scheme,
            gptq=False,
            clip_search=False,
            sequential=False,
            reference_bits=None,
            pass_key="test",
        )
        with SpillArea(1 << 30) as area:
            result = run_layer_pass(model, batches, scorer, settings, MemoryStore(), StageProgress(), area)
            profile = build_profile(spec, scorer.method, scorer.finish(model, result), result.records)
        return profile, batches
    finally:
        model.close()


@pytest.fixture(scope="module")
def source(tiny_model_root: Path):
    return resolve_model("tiny-llama", [tiny_model_root], {})


@pytest.fixture(scope="module")
def runs(source) -> dict[str, Run]:
    return {m: score(source, m) for m in METHODS}


@pytest.fixture(scope="module")
def hf(tiny):
    """The whole in-memory transformers model (conftest's `tiny`)."""
    model, tokenizer = tiny
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


# ---------------------------------------------------------------------------------------------
# independent references on the whole model
# ---------------------------------------------------------------------------------------------


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@dataclass
class Forward:
    outputs: list[torch.Tensor]  # per decoder layer, [B, T, H]
    logits: torch.Tensor  # [B, T, V]
    hidden_states: tuple


def full_forward(model, batch: Batch, *, add: dict[int, torch.Tensor] | None = None) -> Forward:
    """The whole model on a padded batch, every decoder layer's output recorded by a forward hook;
    `add[l]` is added to layer l's output (the hook returns the sum, so later layers see it)."""
    layers = model.model.layers
    outs: dict[int, torch.Tensor] = {}
    add = add or {}

    def hook(index: int):
        def fn(module, args, output):
            hidden = _out(output)
            if index in add:
                hidden = hidden + add[index]
                output = (hidden, *output[1:]) if isinstance(output, (tuple, list)) else hidden
            outs[index] = hidden.detach()
            return output

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            res = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        for h in handles:
            h.remove()
    return Forward(
        outputs=[outs[i] for i in range(len(layers))], logits=res.logits.detach(), hidden_states=res.hidden_states
    )


def valid_rows(tensors: list[torch.Tensor], batches: list[Batch]) -> torch.Tensor:
    """Every valid position, batch by batch, row-major over (sequence, position)."""
    return torch.cat([t[b.valid] for t, b in zip(tensors, batches, strict=True)])


def spectral_entropy(x: torch.Tensor) -> float:
    """-Σ p log p of the normalised eigenvalues of the centred covariance, via singular values."""
    x = x.to(torch.float64)
    xc = x - x.mean(dim=0, keepdim=True)
    lam = torch.linalg.svdvals(xc) ** 2
    p = lam / lam.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def sequential_algorithm_r(
    batches: list[Batch], size: int, seed: int, masks: list[torch.Tensor] | None = None
) -> list[int]:
    """Algorithm R token by token: token g (global index over valid tokens, or over `masks`)
    fills slot g while g < size, else replaces slot j = floor(u·(g+1)) when j < size. The uniforms
    come from the same seeded generator, drawn batch by batch for the batch's tokens past the
    first `size`."""
    generator = torch.Generator().manual_seed(seed)
    slots = [-1] * size
    g = 0
    for b, batch in enumerate(batches):
        n = batch.n_tokens if masks is None else int(masks[b].sum())
        n_late = sum(1 for t in range(g, g + n) if t >= size)
        u = torch.rand(n_late, generator=generator, dtype=torch.float64).tolist() if n_late else []
        k = 0
        for t in range(g, g + n):
            if t < size:
                slots[t] = t
            else:
                j = math.floor(u[k] * (t + 1))
                k += 1
                if j < size:
                    slots[j] = t
        g += n
    return slots


def pop_z(values: list[float]) -> list[float]:
    mean, std = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mean) / std for v in values]


def linear_inputs(model, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """X (float64 rows of every token) of every decoder linear's input, each sequence run alone."""
    names = {
        mod: name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in name
    }
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names.values()}

    def hook(module, args):
        rows[names[module]].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64))

    handles = [m.register_forward_pre_hook(hook) for m in names]
    try:
        with torch.no_grad():
            for seq in sequences:
                model(input_ids=torch.tensor([seq]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items()}


INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def reference_errors(
    model,
    x: dict[str, torch.Tensor] | None,
    bits: int,
    group_size: int,
    *,
    gptq: bool = False,
    symmetric: bool = False,
    clip_search: bool = False,
) -> dict[str, dict[str, float]]:
    """Per layer, per linear: ‖X ΔWᵀ‖² / ‖X Wᵀ‖² = tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) (‖ΔW‖²/‖W‖² without X),
    ΔW from RTN (`quantize_weight`) or GPTQ on the same H."""
    out: dict[str, dict[str, float]] = {}
    for i, _layer in enumerate(model.model.layers):
        lname = f"model.layers.{i}"
        out[lname] = {}
        for group in INPUT_GROUPS:
            names = [f"{lname}.{g}" for g in group]
            weights = {n: model.get_submodule(n).weight.detach().float() for n in names}
            if gptq:
                xs = x[names[0]]
                h = (xs.T @ xs / xs.shape[0]).float()
                codes = gptq_quantize_weights(weights, h, bits, group_size, False)
            else:
                codes = {
                    n: quantize_weight(w, bits, group_size, symmetric, clip_search=clip_search)
                    for n, w in weights.items()
                }
            for n, w in weights.items():
                w64 = w.double()
                delta = w64 - dequantize_weight(codes[n], torch.float64)
                if x is None:
                    out[lname][n] = float(delta.square().sum() / w64.square().sum())
                else:
                    xs = x[n]
                    out[lname][n] = float((xs @ delta.T).square().sum() / (xs @ w64.T).square().sum())
    return out


def weighted(errors: dict[str, float], model) -> float:
    params = {n: model.get_submodule(n).weight.numel() for n in errors}
    return sum(errors[n] * params[n] for n in errors) / sum(params.values())


# ---------------------------------------------------------------------------------------------
# profile contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_profile_shape_and_values(method: str, hf, runs: dict) -> None:
    run = runs[method]
    profile = run.profile
    assert run.calls == 1
    assert profile.method == method and profile.model == "tiny-llama"
    assert [l.name for l in profile.layers] == [f"model.layers.{i}" for i in range(N_LAYERS)]
    assert [l.index for l in profile.layers] == list(range(N_LAYERS))
    assert len(run.batches) >= 3 and any((b.attention_mask == 0).any() for b in run.batches), (
        "the test needs several padded batches"
    )
    for layer in profile.layers:
        module = hf.get_submodule(layer.name)
        linears = {f"{layer.name}.{n}": m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
        assert layer.params == sum(m.weight.numel() for m in linears.values()) > 0
        assert {l.name: l.params for l in layer.linears} == {n: m.weight.numel() for n, m in linears.items()}
        assert all(math.isfinite(v) for v in layer.scores.values())
        assert math.isfinite(layer.importance)
        assert layer.sensitivity >= 0 and math.isfinite(layer.sensitivity)
        assert sorted(layer.quant_error) == [4, 8, 16]
        assert layer.quant_error[16] == 0.0
        assert 0 < layer.quant_error[8] < layer.quant_error[4] < 1
        assert layer.bits is None
    if method == "uniform":
        assert all(l.importance == 0 and l.sensitivity == 1 and l.scores == {} for l in profile.layers)
    else:
        assert len({round(l.importance, 12) for l in profile.layers}) > 1
        assert all(l.sensitivity > 0 for l in profile.layers)


def test_score_relations(runs: dict) -> None:
    layers = runs["taq"].profile.layers
    assert abs(sum(l.scores["z_information"] for l in layers)) < 1e-9
    for l in layers:
        assert l.scores["stability"] == -l.scores["update_variance"] < 0
        assert l.scores["massive_tokens"] == 0 and l.scores["shared_prefix"] > 0
        assert 0 < l.scores["information"] <= math.log(32) + 1e-9
        assert l.scores["effective_rank"] == pytest.approx(math.exp(l.scores["information"]))
        assert l.importance == pytest.approx(0.5 * l.scores["z_information"] + 0.5 * l.scores["z_stability"])
        assert l.scores["reservoir_tokens"] == 32
    assert sum(l.sensitivity for l in layers) / len(layers) == pytest.approx(1.0)
    by_importance = sorted(layers, key=lambda l: l.importance)
    assert [l.sensitivity for l in by_importance] == sorted(l.sensitivity for l in layers)
    for l in runs["taq_kl"].profile.layers:
        assert l.scores["kl"] > 0 and l.sensitivity == l.scores["kl"] == l.importance
        assert l.scores["probe_bits"] == 4
    for l in runs["taqo"].profile.layers:
        s = l.scores
        assert s["delta_nll"] == pytest.approx(s["nll"] - s["fp_nll"])
        assert s["delta_em"] == pytest.approx(s["fp_em"] - s["em"])
        assert s["delta_token_accuracy"] == pytest.approx(s["fp_token_accuracy"] - s["token_accuracy"])
        assert 0 <= s["em"] <= s["token_accuracy"] <= 1
        assert s["model_answers"] == pytest.approx(7 / 9)
        assert s["probe_bits"] == 4
        assert l.importance == s["delta_nll"]


# ---------------------------------------------------------------------------------------------
# TAQ against the whole model
# ---------------------------------------------------------------------------------------------


def common_prefix(sequences: list[list[int]]) -> int:
    n = 0
    while all(len(x) > n for x in sequences) and len({x[n] for x in sequences}) == 1:
        n += 1
    return n


def task_masks(batches: list[Batch], prefix: int) -> list[torch.Tensor]:
    out = []
    for batch in batches:
        mask = batch.attention_mask.bool().clone()
        mask[:, :prefix] = False
        out.append(mask)
    return out


def test_taq_scores_match_the_whole_model(hf, runs: dict) -> None:
    run = runs["taq"]
    batches = run.batches
    forwards = [full_forward(hf, b) for b in batches]
    # the reference itself: the hooks see what output_hidden_states reports (before the final norm)
    for fw in forwards:
        for l in range(N_LAYERS - 1):
            assert torch.equal(fw.outputs[l], fw.hidden_states[l + 1])
    prefix = common_prefix(run.sequences)
    assert prefix > 0  # the chat template every row starts with
    masks = task_masks(batches, prefix)
    n_task = sum(int(m.sum()) for m in masks)
    reservoir = TokenReservoir(32, 0)
    reservoir.draw(batches, masks)
    assert n_task > 100 and reservoir.seen == n_task and reservoir.filled == 32
    assert reservoir.slot_token == sequential_algorithm_r(batches, 32, 0, masks)
    info, stab = [], []
    for l in range(N_LAYERS):
        x = valid_rows([fw.outputs[l] for fw in forwards], [_masked(b, m) for b, m in zip(batches, masks)])
        before = valid_rows([fw.hidden_states[l] for fw in forwards], [_masked(b, m) for b, m in zip(batches, masks)])
        assert x.shape[0] == n_task
        info.append(spectral_entropy(x[torch.tensor(reservoir.slot_token)]))
        stab.append(-float((x - before).double().var(unbiased=False)))
    z_info, z_stab = pop_z(info), pop_z(stab)
    importance = [0.5 * a + 0.5 * b for a, b in zip(z_info, z_stab)]
    exp_imp = [math.exp(v) for v in importance]
    sensitivity = [v / statistics.fmean(exp_imp) for v in exp_imp]
    for l, layer in enumerate(run.profile.layers):
        assert layer.scores["shared_prefix"] == prefix
        assert layer.scores["information"] == pytest.approx(info[l], rel=1e-6)
        assert layer.scores["stability"] == pytest.approx(stab[l], rel=1e-6)
        assert layer.scores["z_information"] == pytest.approx(z_info[l], abs=1e-4)
        assert layer.scores["z_stability"] == pytest.approx(z_stab[l], abs=1e-4)
        assert layer.importance == pytest.approx(importance[l], abs=1e-4)
        assert layer.sensitivity == pytest.approx(sensitivity[l], rel=1e-4)


def _masked(batch: Batch, mask: torch.Tensor) -> Batch:
    """The batch with `mask` as its attention mask (so `valid_rows` takes the masked tokens)."""
    return Batch(input_ids=batch.input_ids, attention_mask=mask.long(), rows=batch.rows)


def test_massive_activation_tokens_leave_the_statistics() -> None:
    """A token whose output norm is > MASSIVE_RATIO × the median (an attention sink) enters neither
    the update variance nor the reservoir; the shared prefix enters neither either."""
    from core.scorers.taq import MASSIVE_RATIO, TaqScorer, massive_tokens

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[7, 7, 1, 2, 3, 4], [7, 7, 5, 6, 8, 0]])
    batch = Batch(input_ids=ids, attention_mask=torch.tensor([[1] * 6, [1] * 5 + [0]]), rows=(0, 1))
    inputs = torch.randn(2, 6, 8, generator=g)
    output = inputs + torch.randn(2, 6, 8, generator=g)
    output[0, 3] *= 10 * MASSIVE_RATIO  # a sink after the prefix
    output[0, 0] *= 10 * MASSIVE_RATIO  # a sink inside the prefix: left out as prefix anyway
    scorer = TaqScorer(make_spec("taq", reservoir_size=16))
    scorer.begin([batch], 1)
    assert scorer.prefix == 2
    scorer.observe(0, 0, output, batch, inputs)
    values = scorer.layer_values(0)
    keep = torch.tensor([[0, 0, 1, 0, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    expected = (output - inputs)[keep].double().var(unbiased=False)
    assert values["update_variance"] == pytest.approx(float(expected), rel=1e-9)
    assert values["massive_tokens"] == 1 and values["reservoir_tokens"] == 6 and values["shared_prefix"] == 2
    assert massive_tokens(torch.tensor([1.0, 1.1, 0.9, 1.0 * MASSIVE_RATIO + 0.5])).tolist() == [False] * 3 + [True]
    assert massive_tokens(torch.zeros(0)).numel() == 0


def test_taq_reservoir_larger_than_the_data_holds_every_token(source, hf) -> None:
    """reservoir_size above the number of task tokens: every one, in order."""
    run = score(source, "taq", reservoir_size=4096)
    batches = [_masked(b, m) for b, m in zip(run.batches, task_masks(run.batches, common_prefix(run.sequences)))]
    n_valid = sum(b.n_tokens for b in batches)
    forwards = [full_forward(hf, b) for b in run.batches]
    for l, layer in enumerate(run.profile.layers):
        x = valid_rows([fw.outputs[l] for fw in forwards], batches)
        assert layer.scores["reservoir_tokens"] == n_valid
        assert layer.scores["information"] == pytest.approx(spectral_entropy(x), rel=1e-6)


def test_seed_changes_taq_reservoir_only(source, runs: dict) -> None:
    base = runs["taq"].profile
    other = score(source, "taq", seed=1).profile
    assert [l.scores["information"] for l in other.layers] != [l.scores["information"] for l in base.layers]
    # the streamed variance and the measured errors do not depend on the seed
    assert [l.scores["update_variance"] for l in other.layers] == [l.scores["update_variance"] for l in base.layers]
    assert [l.quant_error for l in other.layers] == [l.quant_error for l in base.layers]


def test_padding_never_enters_statistics(source) -> None:
    batched = score(source, "taq", reservoir_size=4096, batch_tokens=4096)
    single = score(source, "taq", reservoir_size=4096, batch_tokens=1)  # one sequence per batch
    assert len(batched.batches) == 1 and (batched.batches[0].attention_mask == 0).any()
    assert all(b.attention_mask.all() for b in single.batches)
    for a, b in zip(batched.profile.layers, single.profile.layers):
        assert a.scores["update_variance"] == pytest.approx(b.scores["update_variance"], rel=1e-5)
        assert a.scores["information"] == pytest.approx(b.scores["information"], rel=1e-5)
        for bits in (4, 8):
            assert a.quant_error[bits] == pytest.approx(b.quant_error[bits], rel=1e-4)


# ---------------------------------------------------------------------------------------------
# TAQ internals
# ---------------------------------------------------------------------------------------------


def _batch(lengths: list[int], width: int | None = None) -> Batch:
    width = width or max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return Batch(input_ids=torch.zeros_like(mask), attention_mask=mask, rows=tuple(range(len(lengths))))


def test_reservoir_holds_exactly_the_sampled_valid_tokens() -> None:
    batches = [_batch(lengths, width=8) for lengths in ([5, 3], [7, 7, 2], [4])]
    reservoir = TokenReservoir(size=6, seed=0)
    reservoir.draw(batches)
    assert reservoir.slot_token == sequential_algorithm_r(batches, 6, 0)

    def hidden_of(layer: int) -> list[torch.Tensor]:
        out, seen = [], 0
        for batch in batches:
            # hidden value = global index of the valid token (+1000 per layer), -1 on padding
            hidden = torch.full((batch.valid.shape[0], 8, 3), -1.0)
            hidden[batch.valid] = torch.arange(seen, seen + batch.n_tokens, dtype=torch.float32)[:, None] + 1000 * layer
            seen += batch.n_tokens
            out.append(hidden)
        return out

    samples = []
    for layer in range(2):
        reservoir.reset()
        for b, (batch, hidden) in enumerate(zip(batches, hidden_of(layer))):
            reservoir.observe(b, hidden, batch)
        samples.append(reservoir.sample().clone())
    assert reservoir.filled == 6 and reservoir.seen == sum(b.n_tokens for b in batches)
    assert (samples[0] >= 0).all(), "padding entered the reservoir"
    assert samples[0][:, 0].tolist() == [float(t) for t in reservoir.slot_token]
    assert len(set(reservoir.slot_token)) == 6
    assert torch.equal(samples[1], samples[0] + 1000)  # the same tokens at every layer


def test_reservoir_is_uniform_and_seeded() -> None:
    n, size, trials = 40, 4, 1500
    batches = [_batch(lengths) for lengths in ([10, 6], [9], [15])]
    counts = torch.zeros(n)
    for seed in range(trials):
        reservoir = TokenReservoir(size=size, seed=seed)
        reservoir.draw(batches)
        counts[torch.tensor(reservoir.slot_token)] += 1
    expected = trials * size / n  # 150
    assert counts.sum() == trials * size
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
    assert abs(counts[:10].mean() - counts[-10:].mean()) < 3 * math.sqrt(expected)  # early = late
    a, b, c = TokenReservoir(size, 3), TokenReservoir(size, 3), TokenReservoir(size, 4)
    for r in (a, b, c):
        r.draw(batches)
    assert a.slot_token == b.slot_token != c.slot_token
    a.draw(batches)  # drawing again restarts from the seed
    assert a.slot_token == b.slot_token


def test_reservoir_smaller_than_size_keeps_every_token() -> None:
    batches = [_batch([3, 2]), _batch([4])]
    reservoir = TokenReservoir(size=16, seed=0)
    reservoir.draw(batches)
    assert reservoir.filled == 9 and reservoir.slot_token == list(range(9)) + [-1] * 7


@pytest.mark.parametrize("shape", [(6, 20), (30, 8), (16, 16)])
def test_gram_and_covariance_spectra_give_the_same_entropy(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, shape[1], dtype=torch.float64)
    assert matrix_entropy(x) == pytest.approx(covariance_entropy(x), abs=1e-9)
    assert matrix_entropy(x) == pytest.approx(spectral_entropy(x), abs=1e-9)
    # entropy of r directions is at most log(r - 1) after centring
    assert matrix_entropy(x) <= math.log(min(shape[0] - 1, shape[1])) + 1e-9


def test_matrix_entropy_edge_cases() -> None:
    assert matrix_entropy(torch.ones(5, 3)) == 0.0  # centred to zero
    assert matrix_entropy(torch.randn(1, 3)) == 0.0
    e = torch.eye(4)
    assert matrix_entropy(torch.cat([e, -e])) == pytest.approx(math.log(4))


def test_streamed_variance_matches_direct() -> None:
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, 5, generator=g) * 3 + 7 for n in (3, 11, 1, 40)]
    stats = LayerOutputStats()
    for c in chunks:
        stats.update(c)
    full = torch.cat(chunks).double()
    assert stats.count == full.numel()
    assert stats.variance == pytest.approx(float(full.var(unbiased=False)), rel=1e-12)
    assert stats.value_range == pytest.approx(float(full.max() - full.min()))
    stats.reset()
    assert stats.count == 0 and stats.variance == 0.0 and stats.value_range == 0.0
    batch = _batch([2, 1], width=3)
    hidden = torch.tensor([[[1.0], [3.0], [1e6]], [[5.0], [-1e6], [1e6]]])  # padding is huge
    stats.observe(hidden, batch)
    assert stats.count == 3 and stats.variance == pytest.approx(float(torch.tensor([1.0, 3, 5]).var(unbiased=False)))
    assert stats.value_range == 4.0


def test_zscore_exp_sensitivity_and_lowest_bits() -> None:
    assert zscore([1.0, 1.0]) == [0.0, 0.0]
    assert zscore([]) == []
    z = zscore([1.0, 2.0, 3.0])
    assert z[1] == 0 and z[0] == -z[2] and z == pytest.approx(pop_z([1.0, 2.0, 3.0]))
    s = exp_sensitivity([0.0, 1.0, -2.0])
    assert statistics.fmean(s) == pytest.approx(1.0) and s[1] / s[0] == pytest.approx(math.e)
    assert lowest_bits([3, 8, 16]) == 3 and lowest_bits([16]) == 16


# ---------------------------------------------------------------------------------------------
# TAQ-KL against the whole model
# ---------------------------------------------------------------------------------------------


def kl_reference(model, batches: list[Batch], layer: int, bits: int, group_size: int = 32) -> float:
    """Mean over sequences of KL(p_fp ‖ p_q) at each sequence's last valid token, p_q the whole
    model with decoder layer `layer` carrying its dequantized RTN codes at `bits`."""
    quantized = with_layers_quantized(model, [layer], bits, group_size) if bits < 16 else model
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            last = batch.attention_mask.sum(dim=1) - 1
            rows = torch.arange(batch.input_ids.shape[0])
            fp = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rows, last]
            q = quantized(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[rows, last]
            p_log = torch.log_softmax(fp.double(), dim=-1)
            q_log = torch.log_softmax(q.double(), dim=-1)
            total += float((p_log.exp() * (p_log - q_log)).sum())
            count += int(batch.input_ids.shape[0])
    return total / count


def test_taq_kl_matches_quantized_copies_of_the_whole_model(hf, runs: dict) -> None:
    run = runs["taq_kl"]
    kls = []
    for l, layer in enumerate(run.profile.layers):
        kl = kl_reference(hf, run.batches, l, 4)
        # the streamed head forms z_ref − z in float32 per vocabulary chunk; with one layer at 4
        # bits the logits move by ~1e-2 and the KL is ~1e-4, so float32 gives it ~1e-3 relative
        assert layer.scores["kl"] == pytest.approx(kl, rel=1e-3)
        assert layer.sensitivity == layer.scores["kl"]
        kls.append(kl)
    assert min(kls) > 0, "the probe changed nothing; the test is vacuous"


def test_kl_is_zero_when_the_probe_keeps_full_precision(source) -> None:
    spec = make_spec("taq_kl", bit_choices=[16])
    profile, _ = score_low_level(source, spec, make_scorer(spec), ROWS)
    assert all(l.scores["kl"] == 0 and l.scores["probe_bits"] == 16 for l in profile.layers)


def test_kl_grows_when_the_probe_is_coarser(source, runs: dict) -> None:
    coarser = score(source, "taq_kl", bit_choices=[2, 16])
    for a, b in zip(runs["taq_kl"].profile.layers, coarser.profile.layers, strict=True):
        assert b.scores["probe_bits"] == 2
        assert b.scores["kl"] > a.scores["kl"]


# ---------------------------------------------------------------------------------------------
# TAQO against the whole model
# ---------------------------------------------------------------------------------------------


def render_ids(row: CalibrationRow, tokenizer) -> list[int]:
    messages = (
        [{"role": m.role, "content": m.content} for m in row.messages]
        if row.messages
        else [{"role": "user", "content": row.prompt}]
    )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy_answer(model, tokenizer, prompt: list[int], max_new_tokens: int = 16) -> list[int]:
    eos = {tokenizer.eos_token_id}
    config_eos = model.generation_config.eos_token_id
    eos |= set(config_eos if isinstance(config_eos, list) else [config_eos]) - {None}
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.eos_token_id,
        )
    answer = []
    for t in out[0, len(prompt) :].tolist():
        answer.append(t)
        if t in eos:
            break
    return answer


def taqo_sequences(model, tokenizer, rows: list[CalibrationRow]) -> tuple[list[list[int]], list[int], list[int]]:
    """(prompt + answer per gold answer, or + the model's own greedy answer; row; answer start)."""
    sequences, row_of, starts = [], [], []
    for i, row in enumerate(rows):
        prompt = render_ids(row, tokenizer)
        if row.answers:
            answers = [tokenizer(a, add_special_tokens=False)["input_ids"][:32] for a in row.answers]
        else:
            answers = [greedy_answer(model, tokenizer, prompt)]
        for answer in answers:
            sequences.append(prompt + answer)
            row_of.append(i)
            starts.append(len(prompt))
    return sequences, row_of, starts


def task_scores(model, sequences, row_of, starts, n_rows: int) -> tuple[float, float, float]:
    """(EM, token accuracy, NLL): per sequence on its answer tokens, teacher-forced, each sequence
    alone; per row the best over its sequences; mean over rows."""
    best = [[0.0, 0.0, math.inf] for _ in range(n_rows)]
    with torch.no_grad():
        for seq, row, start in zip(sequences, row_of, starts):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            gold = torch.tensor(seq[start:])
            pred = logp[start - 1 : len(seq) - 1]
            correct = (pred.argmax(dim=-1) == gold).double()
            nll = float(-pred.gather(1, gold[:, None]).mean())
            em, acc = float(correct.min()), float(correct.mean())
            best[row] = [max(best[row][0], em), max(best[row][1], acc), min(best[row][2], nll)]
    return tuple(statistics.fmean(b[k] for b in best) for k in range(3))


def with_layers_quantized(model, layers, bits: int, group_size: int):
    """A deep copy whose decoder layers in `layers` carry their dequantized RTN codes."""
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for layer in layers:
            for module in quantized.model.layers[layer].modules():
                if isinstance(module, torch.nn.Linear):
                    q = quantize_weight(module.weight.detach(), bits, group_size, False)
                    module.weight.copy_(dequantize_weight(q, torch.float32))
    return quantized


def test_taqo_matches_quantized_copies_of_the_whole_model(hf, tokenizer, runs: dict) -> None:
    run = runs["taqo"]
    sequences, row_of, starts = taqo_sequences(hf, tokenizer, ROWS)
    plan = run.scorer.sequence_plan
    assert plan.sequences == sequences and plan.row_of == row_of and plan.starts == starts
    assert run.sequences == sequences  # and those are what the pass ran
    fp = task_scores(hf, sequences, row_of, starts, len(ROWS))
    # the model's own greedy answers are what it predicts teacher-forced
    own = [i for i, r in enumerate(ROWS) if not r.answers]
    sub = [(s, own.index(r), t) for s, r, t in zip(sequences, row_of, starts) if r in own]
    assert task_scores(hf, *map(list, zip(*sub)), len(own))[:2] == (1.0, 1.0)
    deltas = []
    for l, layer in enumerate(run.profile.layers):
        q = task_scores(with_layers_quantized(hf, [l], 4, 32), sequences, row_of, starts, len(ROWS))
        s = layer.scores
        assert (s["fp_em"], s["fp_token_accuracy"]) == pytest.approx(fp[:2], abs=1e-12)
        assert s["fp_nll"] == pytest.approx(fp[2], rel=1e-6)
        assert (s["em"], s["token_accuracy"]) == pytest.approx(q[:2], abs=1e-12)
        assert s["nll"] == pytest.approx(q[2], rel=1e-6)
        assert s["delta_nll"] == pytest.approx(q[2] - fp[2], rel=1e-3, abs=1e-7)
        assert s["delta_em"] == pytest.approx(fp[0] - q[0], abs=1e-12)
        assert s["delta_token_accuracy"] == pytest.approx(fp[1] - q[1], abs=1e-12)
        deltas.append(q[2] - fp[2])
    assert any(abs(d) > 1e-5 for d in deltas), "the probe changed nothing; the test is vacuous"
    positive = [max(0.0, d) for d in deltas]
    floor = 0.01 * statistics.fmean(positive) if any(positive) else 1e-6
    for layer, d, p in zip(run.profile.layers, deltas, positive):
        assert layer.importance == pytest.approx(d, rel=1e-3, abs=1e-7)
        assert layer.sensitivity == pytest.approx(p + floor, rel=1e-3, abs=1e-7)
        assert layer.sensitivity > 0


def test_taqo_probe_under_gptq_is_the_stored_gptq_codes(source, hf, tokenizer) -> None:
    """Under `quantizer: gptq` the probe quantizes layer l with the codes the pass stored (GPTQ's,
    what the job ships), not with round-to-nearest."""
    rows = [r for r in ROWS if r.answers]
    run = score(source, "taqo", rows=rows, calibration=rows, quantizer="gptq")
    sequences, row_of, starts = taqo_sequences(hf, tokenizer, rows)
    assert run.sequences == sequences
    for l, layer in enumerate(run.profile.layers):
        probe = copy.deepcopy(hf)
        with torch.no_grad():
            for name, q in stored_codes(run, l, 4).items():
                probe.get_submodule(name).weight.copy_(dequantize_weight(q, torch.float32))
        q_scores = task_scores(probe, sequences, row_of, starts, len(rows))
        rtn_scores = task_scores(with_layers_quantized(hf, [l], 4, 32), sequences, row_of, starts, len(rows))
        assert layer.scores["nll"] == pytest.approx(q_scores[2], rel=1e-6)
        assert layer.scores["nll"] != pytest.approx(rtn_scores[2], rel=1e-6)


def test_taqo_delta_is_zero_at_16_bits(source) -> None:
    spec = make_spec("taqo")
    scorer = make_scorer(spec, bits=16, generate=lambda prompts, n: [[5, 6, 7] for _ in prompts])
    profile, _ = score_low_level(source, spec, scorer, ROWS)
    for l in profile.layers:
        assert abs(l.scores["delta_nll"]) < 1e-9
        assert l.scores["delta_em"] == 0 and l.scores["delta_token_accuracy"] == 0
        assert l.sensitivity == 1e-6


def test_taqo_model_answers_are_reproduced_by_the_fp_model(source) -> None:
    rows = [r for r in ROWS if not r.answers]
    profile = score(source, "taqo", rows=rows, calibration=rows).profile
    for l in profile.layers:
        assert l.scores["fp_em"] == 1.0 and l.scores["fp_token_accuracy"] == 1.0
        assert l.scores["model_answers"] == 1.0


def test_taqo_without_generate_refuses_rows_without_answers(source, tokenizer) -> None:
    scorer = make_scorer(make_spec("taqo"))
    with pytest.raises(ValueError, match="answers"):
        scorer.plan(tokenizer, ROWS, make_spec("taqo"))


def test_taqo_self_answers_need_the_model_in_memory(source) -> None:
    with pytest.raises(InvalidSpec, match="answers"):
        run_job(
            JobInputs(spec=make_spec("taqo"), source=source, rows=ROWS, memory_limit_bytes=1 << 20),
            MemoryStore(),
            Recorder(),
        )
    # gold answers everywhere: no generation, no limit
    rows = [r for r in ROWS if r.answers]
    hooks = Recorder()
    run_job(
        JobInputs(spec=make_spec("taqo", calibration=rows), source=source, rows=rows, memory_limit_bytes=1 << 20),
        MemoryStore(),
        hooks,
    )
    assert hooks.profiles[0].layers[0].scores["model_answers"] == 0.0


# ---------------------------------------------------------------------------------------------
# uniform and the measured quantization errors of every method
# ---------------------------------------------------------------------------------------------


def test_uniform_without_rows_uses_relative_weight_error(source, hf) -> None:
    run = score(source, "uniform", rows=[], calibration=None)
    assert run.batches == []
    expected = {b: reference_errors(hf, None, b, 32) for b in (4, 8)}
    for layer in run.profile.layers:
        assert layer.importance == 0 and layer.sensitivity == 1 and layer.scores == {}
        for b in (4, 8):
            for lin in layer.linears:
                assert lin.quant_error[b] == pytest.approx(expected[b][layer.name][lin.name], rel=1e-5)
            assert layer.quant_error[b] == pytest.approx(weighted(expected[b][layer.name], hf), rel=1e-5)
        assert 0 < layer.quant_error[8] < layer.quant_error[4] < 1


@pytest.mark.parametrize("method", METHODS)
def test_quant_error_is_the_activation_weighted_rtn_error(method: str, hf, runs: dict) -> None:
    run = runs[method]
    x = linear_inputs(hf, run.sequences)
    n_tokens = sum(len(s) for s in run.sequences)
    assert all(v.shape[0] == n_tokens for v in x.values())
    weight_only = reference_errors(hf, None, 4, 32)
    for b in (4, 8):
        expected = reference_errors(hf, x, b, 32)
        for layer in run.profile.layers:
            for lin in layer.linears:
                assert lin.quant_error[b] == pytest.approx(expected[layer.name][lin.name], rel=1e-4)
            assert layer.quant_error[b] == pytest.approx(weighted(expected[layer.name], hf), rel=1e-4)
            if b == 4:  # activation-weighted, not the weight error
                assert layer.quant_error[4] != pytest.approx(weighted(weight_only[layer.name], hf), rel=1e-3)


def stored_codes(run: Run, layer: int, bits: int):
    from core.streaming.checkpoints import load_codes

    return load_codes(run.store, "work/layers", layer, bits)


def test_stored_rtn_codes_are_quantize_weight(hf, runs: dict) -> None:
    for l in range(N_LAYERS):
        for b in (4, 8):
            codes = stored_codes(runs["taq"], l, b)
            assert set(codes) == {f"model.layers.{l}.{g}" for group in INPUT_GROUPS for g in group}
            for name, q in codes.items():
                ref = quantize_weight(hf.get_submodule(name).weight.detach(), b, 32, False)
                assert torch.equal(q.codes, ref.codes) and torch.equal(q.scale, ref.scale)
                assert torch.equal(q.zero, ref.zero) and (q.bits, q.group_size, q.shape) == (b, 32, ref.shape)


def test_quant_error_under_gptq_is_gptqs_own_error(source, hf, runs: dict) -> None:
    run = score(source, "taq", quantizer="gptq")
    x = linear_inputs(hf, run.sequences)
    rtn = runs["taq"].profile
    for b in (4, 8):
        expected = reference_errors(hf, x, b, 32, gptq=True)
        for l, (layer, rtn_layer) in enumerate(zip(run.profile.layers, rtn.layers)):
            codes = stored_codes(run, l, b)
            measured = {}
            for lin in layer.linears:
                w = hf.get_submodule(lin.name).weight.detach().double()
                delta = w - dequantize_weight(codes[lin.name], torch.float64)
                xs = x[lin.name]
                measured[lin.name] = float((xs @ delta.T).square().sum() / (xs @ w.T).square().sum())
                # the error of the codes the job ships, measured on the whole model's activations
                assert lin.quant_error[b] == pytest.approx(measured[lin.name], rel=1e-4)
                # and those codes are GPTQ's on H = XᵀX/n: the same up to rounding flips from H's
                # float32 accumulation in the pass (float64 here)
                ref = gptq_quantize_weights({lin.name: w.float()}, (xs.T @ xs / xs.shape[0]).float(), b, 32, False)
                assert (codes[lin.name].codes != ref[lin.name].codes).float().mean() < 0.01
                assert lin.quant_error[b] == pytest.approx(expected[layer.name][lin.name], rel=1e-2)
            assert layer.quant_error[b] == pytest.approx(weighted(measured, hf), rel=1e-4)
            assert layer.quant_error[b] == pytest.approx(weighted(expected[layer.name], hf), rel=5e-3)
            assert layer.quant_error[b] < 0.7 * rtn_layer.quant_error[b]  # GPTQ minimises exactly this
    # the scores themselves do not depend on the quantizer
    for a, b in zip(run.profile.layers, runs["taq"].profile.layers):
        assert a.scores == b.scores and a.importance == b.importance


def test_quant_error_symmetric_with_clip_search_and_3_bits(source, hf) -> None:
    run = score(
        source, "uniform", symmetric=True, clip_search=True, bit_choices=[3, 8, 16], bit_budget={"avg_bits": 8.0}
    )
    x = linear_inputs(hf, run.sequences)
    for b in (3, 8):
        expected = reference_errors(hf, x, b, 32, symmetric=True, clip_search=True)
        for layer in run.profile.layers:
            assert sorted(layer.quant_error) == [3, 8, 16]
            for lin in layer.linears:
                assert lin.quant_error[b] == pytest.approx(expected[layer.name][lin.name], rel=1e-4)
            assert layer.quant_error[b] == pytest.approx(weighted(expected[layer.name], hf), rel=1e-4)


@pytest.mark.parametrize("method", ["taq", "taq_kl", "taqo"])
def test_sequential_calibration_keeps_scores_and_measures_errors_on_quantized_inputs(
    method: str, source, hf, runs: dict
) -> None:
    """`calibration_inputs: quantized`: layer l's errors are measured on the inputs of a model whose
    layers < l are quantized at the reference width (layer l itself full precision), while the
    method's scores still come from the full-precision stream."""
    run = score(source, method, calibration_inputs="quantized")
    assert run.settings.sequential and run.settings.reference_bits == 4
    fp = runs[method].profile
    for a, b in zip(run.profile.layers, fp.layers):
        assert a.scores == b.scores and a.importance == b.importance and a.sensitivity == b.sensitivity
    assert run.profile.layers[0].quant_error == fp.layers[0].quant_error
    for l, layer in enumerate(run.profile.layers):
        x = linear_inputs(with_layers_quantized(hf, range(l), 4, 32), run.sequences)
        for b in (4, 8):
            expected = reference_errors(hf, x, b, 32)[layer.name]
            assert layer.quant_error[b] == pytest.approx(weighted(expected, hf), rel=1e-4)
            if l > 0 and b == 4:
                assert layer.quant_error[b] != pytest.approx(fp.layers[l].quant_error[b], rel=1e-4)


@pytest.mark.parametrize("method", ["taq_kl", "taqo"])
def test_chunked_lm_head_gives_the_same_scores(method: str, source, runs: dict, monkeypatch) -> None:
    """The head is applied in vocabulary chunks with online log-sum-exp / KL / argmax; the tiny
    model's vocabulary fits one chunk by default, so force about 200 chunks."""
    import core.streaming.head as head

    monkeypatch.setattr(head, "_CHUNK_ELEMENTS", 256 * 300)
    chunked = score(source, method).profile
    for a, b in zip(chunked.layers, runs[method].profile.layers):
        # the same up to float32 rounding: logits shifted by a different running maximum, and
        # each chunk's sums taken in float32 over other spans (TAQ-KL's KL of one 4-bit layer is
        # ~1e-4 formed from float32 logit differences: a few 1e-4 relative)
        rel = 1e-3 if method == "taq_kl" else 1e-5
        assert a.scores == pytest.approx(b.scores, rel=rel, abs=1e-12)
        assert a.sensitivity == pytest.approx(b.sensitivity, rel=rel, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# determinism, rows, resume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_same_profile(method: str, source, runs: dict) -> None:
    again = score(source, method)
    assert again.profile.to_dict() == runs[method].profile.to_dict()


@pytest.mark.parametrize("method", ["taq_kl", "taqo"])
def test_spilled_streams_give_the_same_profile(method: str, source, runs: dict) -> None:
    """With no RAM for carried hidden states every stream goes through the spill files."""
    hooks = Recorder()
    run_job(
        JobInputs(spec=make_spec(method), source=source, rows=ROWS, batch_tokens=BATCH_TOKENS, activation_ram_bytes=0),
        MemoryStore(),
        hooks,
    )
    assert hooks.profiles[0].to_dict() == runs[method].profile.to_dict()


def test_needs_rows(source) -> None:
    with pytest.raises(DataError):
        score(source, "taq", rows=[])


def test_max_calibration_rows_subsamples_before_scoring(source) -> None:
    run = score(source, "taq", max_calibration_rows=4)
    assert sum(len(b.rows) for b in run.batches) == 4
    assert score(source, "taq", max_calibration_rows=4).profile == run.profile


def score_interrupted(source, method: str, store: MemoryStore, after_layers: int) -> None:
    """A score stage cancelled once `after_layers` layers were reported (their records stored)."""
    done = {"layers": 0}
    hooks = Recorder(lambda: done["layers"] >= after_layers)
    original = hooks.progress

    def progress(stage, fraction, message):
        original(stage, fraction, message)
        if stage == "score" and LAYER_REPORT.match(message):
            done["layers"] += 1

    hooks.progress = progress
    with pytest.raises(Cancelled):
        score(source, method, hooks=hooks, store=store)
    assert sum(k.endswith(".json") and "/layers/" in k for k in store.objects) == after_layers


@pytest.mark.parametrize("method", ["taq", "taq_kl", "taqo"])
def test_resumed_pass_gives_the_uninterrupted_scores(method: str, source, runs: dict) -> None:
    store = MemoryStore()
    score_interrupted(source, method, store, 2)
    resumed = score(source, method, store=store)
    assert sum("(checkpointed)" in m for _, _, m in resumed.hooks.events) == 2
    for a, b in zip(resumed.profile.layers, runs[method].profile.layers, strict=True):
        assert (a.name, a.params, a.scores, a.importance, a.sensitivity) == (
            b.name,
            b.params,
            b.scores,
            b.importance,
            b.sensitivity,
        )
        assert a.quant_error == pytest.approx(b.quant_error, rel=1e-12, abs=0)
        assert {l.name: (l.params, l.quant_error) for l in a.linears} == {
            l.name: (l.params, l.quant_error) for l in b.linears
        }


def test_resumed_profile_is_byte_identical(source, runs: dict) -> None:
    store = MemoryStore()
    score_interrupted(source, "taq", store, 2)
    resumed = score(source, "taq", store=store)
    names = [[lin.name for lin in layer.linears] for layer in runs["taq"].profile.layers]
    assert [[lin.name for lin in layer.linears] for layer in resumed.profile.layers] == names
    assert resumed.profile.to_dict() == runs["taq"].profile.to_dict()


# ---------------------------------------------------------------------------------------------
# progress and cancellation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_progress_is_reported_for_every_layer(method: str, runs: dict) -> None:
    events = [(f, m) for s, f, m in runs[method].hooks.events if s == "score"]
    fractions = [f for f, _ in events]
    assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    for i in range(N_LAYERS):
        mentions = [m for _, m in events if f"layer {i + 1}/{N_LAYERS}" in m and f"model.layers.{i}" in m]
        assert len(mentions) >= 1, f"layer {i} not reported: {events}"


def _checks_per_layer(source, method: str) -> list[int]:
    """How many cancellation checks had happened when each layer's progress was reported."""
    state = {"checks": 0}
    at: list[int] = []

    def should_cancel() -> bool:
        state["checks"] += 1
        return False

    hooks = Recorder(should_cancel)
    original = hooks.progress

    def progress(stage, fraction, message):
        original(stage, fraction, message)
        if stage == "score" and LAYER_REPORT.match(message):
            at.append(state["checks"])

    hooks.progress = progress
    score(source, method, hooks=hooks)
    return at


@pytest.mark.parametrize("method", ["taq", "taq_kl", "taqo", "uniform"])
def test_cancel_raises_within_one_layer(method: str, source) -> None:
    at = _checks_per_layer(source, method)
    assert len(at) == N_LAYERS and all(b - a >= 2 for a, b in zip(at, at[1:]))
    # a request in the middle of layer 0, of layer 2 and just before the last layer is reported
    for cancel_after in (at[0] // 2 + 1, (at[1] + at[2]) // 2 + 1, at[3]):
        state = {"checks": 0, "cancelled": False, "layers_after": 0}

        def should_cancel() -> bool:
            state["checks"] += 1
            if state["checks"] >= cancel_after:
                state["cancelled"] = True
            return state["cancelled"]

        hooks = Recorder(should_cancel)
        original = hooks.progress

        def progress(stage, fraction, message):
            original(stage, fraction, message)
            if state["cancelled"] and LAYER_REPORT.match(message):
                state["layers_after"] += 1

        hooks.progress = progress
        with pytest.raises(Cancelled):
            score(source, method, hooks=hooks)
        assert state["checks"] == cancel_after  # the very first check after the request raises
        assert state["layers_after"] == 0
        assert hooks.profiles == []


def test_stage_progress_maps_spans() -> None:
    events = []
    tracker = StageProgress(lambda s, f, m: events.append((s, f)), stage="score").span(0.5, 1.0).span(0.0, 0.5)
    tracker.report(0.0, "")
    tracker.report(1.0, "")
    tracker.report(2.0, "")
    assert events == [("score", 0.5), ("score", 0.75), ("score", 0.75)]


# ---------------------------------------------------------------------------------------------
# Gemma 3: per-layer masks (sliding window) and logit soft-capping, through TAQ-KL
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=4,
        max_position_embeddings=256,
        final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"] * 2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # random norms: the zero-init (1 + w) scales make every layer alike
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
        model.get_input_embeddings().weight.normal_(0.0, 0.3)  # tied: logits beyond the soft cap
    root = tmp_path_factory.mktemp("gemma-root")
    model.save_pretrained(root / "tiny-gemma", safe_serialization=True)
    tok.save_pretrained(root / "tiny-gemma")
    return resolve_model("tiny-gemma", [root], {}), model


def test_taq_kl_on_gemma3_matches_the_whole_model(tiny_gemma) -> None:
    source, model = tiny_gemma
    rows = ROWS[1:6]
    spec = make_spec("taq_kl", model="tiny-gemma", calibration=rows)
    profile, batches = score_low_level(source, spec, make_scorer(spec), rows, batch_tokens=120)
    assert len(batches) >= 2 and any((b.attention_mask == 0).any() for b in batches)
    assert min(b.input_ids.shape[1] for b in batches) > 4 * 4  # the sliding window matters
    with torch.no_grad():  # the soft cap is active
        logits = model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask).logits
    assert float(logits.abs().max()) > 2.0
    for l, layer in enumerate(profile.layers):
        kl = kl_reference(model, batches, l, 4)
        assert layer.scores["kl"] == pytest.approx(kl, rel=1e-3)
