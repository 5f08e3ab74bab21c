"""Scorers on the tiny random Llama: shapes, determinism, reservoir, spectra, KL/TAQO invariants,
cached replay, padding, progress and cancellation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core.calibration import (ActivationCache, Batch, HessianCollector, StageProgress, head_logits,
                              make_batches, pad_token_id, run_fp_pass)
from core.data import tokenize_rows
from core.errors import Cancelled, DataError
from core.models import LoadedModel, load_model, resolve_model
from core.scorers import score_layers
from core.scorers.common import LayerOutputStats, lowest_bits, zscore
from core.scorers.taq import TokenReservoir, covariance_entropy, matrix_entropy, score_taq
from core.scorers.taq_kl import score_taq_kl
from core.scorers.taqo import greedy_answers, score_taqo
from core.spec import CalibrationRow, JobSpec

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a CPU shared with other jobs two
    OpenMP threads spin against each other (the same tests ran 5-10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

METHODS = ["taq", "taq_kl", "taqo", "uniform"]

ROWS = [CalibrationRow(prompt=f"Question {i}: what is {i} plus {2 * i}? " + "Think step by step. " * (i % 4))
        for i in range(7)] + [
    CalibrationRow(prompt="What is the capital of France?", answers=["Paris", "paris"]),
    CalibrationRow(messages=[{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Name a colour."}], answers=["Blue"]),
]


def make_spec(method: str = "taq", **overrides) -> JobSpec:
    fields = dict(model="tiny-llama", method=method, calibration=ROWS, bit_budget={"avg_bits": 6.0},
                  bit_choices=[4, 8, 16], group_size=32, reservoir_size=32, max_tokens=64, seed=0)
    fields.update(overrides)
    return JobSpec(**fields)


@pytest.fixture(scope="module")
def tiny(tiny_model_root: Path) -> LoadedModel:
    return load_model(resolve_model("tiny-llama", [tiny_model_root], {}))


@pytest.fixture(scope="module")
def profiles(tiny: LoadedModel) -> dict:
    return {m: score_layers(tiny, ROWS, make_spec(m)) for m in METHODS}


# ---------------------------------------------------------------------------------------------
# profile contract
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_profile_shape_and_values(method: str, tiny: LoadedModel, profiles: dict) -> None:
    profile = profiles[method]
    assert profile.method == method and profile.model == "tiny-llama"
    assert [l.name for l in profile.layers] == [f"model.layers.{i}" for i in range(4)]
    assert [l.index for l in profile.layers] == [0, 1, 2, 3]
    for layer, ref in zip(profile.layers, tiny.layers):
        assert layer.params == sum(lin.weight.numel() for lin in ref.linears.values()) > 0
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


def test_taq_scores(profiles: dict) -> None:
    layers = profiles["taq"].layers
    assert abs(sum(l.scores["z_information"] for l in layers)) < 1e-9
    for l in layers:
        assert l.scores["stability"] == -l.scores["variance"] < 0
        assert 0 < l.scores["information"] <= math.log(32) + 1e-9
        assert l.importance == pytest.approx(0.5 * l.scores["z_information"] + 0.5 * l.scores["z_stability"])
        assert l.scores["reservoir_tokens"] == 32
    # sensitivity is exp(importance) normalised to mean 1: monotone in importance
    assert sum(l.sensitivity for l in layers) / len(layers) == pytest.approx(1.0)
    by_importance = sorted(layers, key=lambda l: l.importance)
    assert [l.sensitivity for l in by_importance] == sorted(l.sensitivity for l in layers)


def test_kl_and_taqo_scores(profiles: dict) -> None:
    for l in profiles["taq_kl"].layers:
        assert l.scores["kl"] > 0 and l.sensitivity == l.scores["kl"]
        assert l.scores["noise_width"] == pytest.approx(l.scores["activation_range"] / 15)
    for l in profiles["taqo"].layers:
        s = l.scores
        assert s["delta_nll"] == pytest.approx(s["nll"] - s["fp_nll"])
        assert s["delta_em"] == pytest.approx(s["fp_em"] - s["em"])
        assert 0 <= s["em"] <= s["token_accuracy"] <= 1
        assert s["model_answers"] == pytest.approx(7 / 9)
        assert l.importance == s["delta_nll"]


@pytest.mark.parametrize("method", METHODS)
def test_same_inputs_same_profile(method: str, tiny: LoadedModel, profiles: dict) -> None:
    again = score_layers(tiny, ROWS, make_spec(method))
    assert again.to_dict() == profiles[method].to_dict()


def test_seed_changes_taq_reservoir(tiny: LoadedModel, profiles: dict) -> None:
    other = score_layers(tiny, ROWS, make_spec("taq", seed=1))
    assert [l.scores["information"] for l in other.layers] != [l.scores["information"] for l in profiles["taq"].layers]
    # the streamed variance does not depend on the seed
    assert [l.scores["variance"] for l in other.layers] == [l.scores["variance"] for l in profiles["taq"].layers]


def test_needs_rows(tiny: LoadedModel) -> None:
    with pytest.raises(DataError):
        score_layers(tiny, [], make_spec("taq"))


def test_uniform_without_rows_uses_weight_error(tiny: LoadedModel) -> None:
    profile = score_layers(tiny, [], make_spec("uniform", calibration=None))
    assert all(0 < l.quant_error[4] < 1 for l in profile.layers)


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
    reservoir = TokenReservoir(n_layers=2, size=6, seed=0)
    seen = 0
    for b, lengths in enumerate([[5, 3], [7, 7, 2], [4]]):
        batch = _batch(lengths, width=8)
        reservoir.before_batch(b, batch)
        # hidden value = global index of the valid token, -1 on padding
        hidden = torch.full((len(lengths), 8, 3), -1.0)
        flat = torch.arange(seen, seen + batch.n_tokens, dtype=torch.float32)
        hidden[batch.valid] = flat[:, None].expand(-1, 3)
        seen += batch.n_tokens
        for layer in range(2):
            reservoir.on_layer_output(layer, b, hidden + layer * 1000, batch)
    assert reservoir.filled == 6 and reservoir.seen == seen
    sample = reservoir.sample(0)
    assert (sample >= 0).all(), "padding entered the reservoir"
    assert sample[:, 0].tolist() == [float(t) for t in reservoir.slot_token]
    assert len(set(reservoir.slot_token)) == 6
    assert torch.equal(reservoir.sample(1), sample + 1000)  # same tokens at every layer


def test_reservoir_is_uniform() -> None:
    n, size, trials = 40, 4, 1500
    counts = torch.zeros(n)
    for seed in range(trials):
        reservoir = TokenReservoir(n_layers=1, size=size, seed=seed)
        for b, lengths in enumerate([[10, 6], [9], [15]]):
            reservoir.before_batch(b, _batch(lengths))
        counts[torch.tensor(reservoir.slot_token)] += 1
    expected = trials * size / n  # 150
    assert counts.sum() == trials * size
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
    # early and late tokens are equally likely
    assert abs(counts[:10].mean() - counts[-10:].mean()) < 3 * math.sqrt(expected)


@pytest.mark.parametrize("shape", [(6, 20), (30, 8), (16, 16)])
def test_gram_and_covariance_spectra_give_the_same_entropy(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, shape[1], dtype=torch.float64)
    assert matrix_entropy(x) == pytest.approx(covariance_entropy(x), abs=1e-9)
    # entropy of r isotropic directions is at most log(r - 1) after centring
    assert matrix_entropy(x) <= math.log(min(shape[0] - 1, shape[1])) + 1e-9


def test_matrix_entropy_edge_cases() -> None:
    assert matrix_entropy(torch.ones(5, 3)) == 0.0  # centred to zero
    assert matrix_entropy(torch.randn(1, 3)) == 0.0
    e = torch.eye(4)
    assert matrix_entropy(torch.cat([e, -e])) == pytest.approx(math.log(4))


def test_streamed_variance_matches_direct() -> None:
    g = torch.Generator().manual_seed(1)
    chunks = [torch.randn(n, 5, generator=g) * 3 + 7 for n in (3, 11, 1, 40)]
    stats = LayerOutputStats(1)
    for c in chunks:
        stats.update(0, c)
    full = torch.cat(chunks).double()
    assert stats.variance(0) == pytest.approx(float(full.var(unbiased=False)), rel=1e-12)
    assert stats.value_range(0) == pytest.approx(float(full.max() - full.min()))


def test_padding_never_enters_statistics(tiny: LoadedModel) -> None:
    spec = make_spec("taq", reservoir_size=4096)  # reservoir holds every token: order-independent
    batched = score_taq(tiny, ROWS, spec, batch_tokens=4096)
    single = score_taq(tiny, ROWS, spec, batch_tokens=1)  # one sequence per batch: no padding
    for a, b in zip(batched.layers, single.layers):
        assert a.scores["variance"] == pytest.approx(b.scores["variance"], rel=1e-5)
        assert a.scores["information"] == pytest.approx(b.scores["information"], rel=1e-5)
        for bits in (4, 8):
            assert a.quant_error[bits] == pytest.approx(b.quant_error[bits], rel=1e-4)


def test_zscore_and_lowest_bits() -> None:
    assert zscore([1.0, 1.0]) == [0.0, 0.0]
    z = zscore([1.0, 2.0, 3.0])
    assert z[1] == 0 and z[0] == -z[2]
    assert lowest_bits([3, 8, 16]) == 3 and lowest_bits([16]) == 16


# ---------------------------------------------------------------------------------------------
# cache, KL, TAQO
# ---------------------------------------------------------------------------------------------

def test_cached_replay_equals_full_forward(tiny: LoadedModel) -> None:
    seqs = tokenize_rows(ROWS, tiny.tokenizer, 64)
    batches = make_batches(seqs, pad_token_id(tiny.tokenizer), "cpu", max_batch_tokens=200)
    assert any((b.attention_mask == 0).any() for b in batches), "test needs padded batches"
    cache = run_fp_pass(tiny, batches, cache_inputs=True)
    assert isinstance(cache, ActivationCache)
    cache.advance()
    cache.advance()
    assert cache.position == 2
    for b, batch in enumerate(batches):
        with torch.no_grad():
            reference = tiny.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            replayed = head_logits(tiny.model, cache.stack, cache.replay(b))
        valid = batch.valid
        assert torch.allclose(replayed[valid], reference[valid], atol=1e-5, rtol=0)
        # and each row equals an unpadded forward of that sequence
        for r, i in enumerate(batch.rows):
            with torch.no_grad():
                alone = tiny.model(input_ids=torch.tensor([seqs[i]])).logits[0]
            assert torch.allclose(replayed[r, : len(seqs[i])], alone, atol=1e-5, rtol=0)


def test_shared_inputs_share_hessians(tiny: LoadedModel) -> None:
    seqs = tokenize_rows(ROWS[:3], tiny.tokenizer, 64)
    hessians = HessianCollector(tiny)
    run_fp_pass(tiny, make_batches(seqs, pad_token_id(tiny.tokenizer), "cpu"), hessians=hessians)
    groups = {lead: sorted(n.split(".", 3)[-1] for n in names) for lead, names in hessians.groups().items()
              if lead.startswith("model.layers.1.")}
    assert sorted(groups.values()) == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                                       ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
                                       ["self_attn.o_proj"]]
    q = hessians.hessian("model.layers.1.self_attn.q_proj")
    assert q is hessians.hessian("model.layers.1.self_attn.v_proj") or torch.equal(
        q, hessians.hessian("model.layers.1.self_attn.v_proj"))
    assert torch.allclose(q, q.T) and hessians.counts["model.layers.1.self_attn.q_proj"] == sum(map(len, seqs))


def test_kl_is_zero_without_noise(tiny: LoadedModel) -> None:
    profile = score_taq_kl(tiny, ROWS, make_spec("taq_kl"), noise_scale=0.0)
    assert all(abs(l.scores["kl"]) < 1e-7 and l.scores["noise_width"] == 0 for l in profile.layers)


def test_kl_grows_with_noise(tiny: LoadedModel, profiles: dict) -> None:
    louder = score_taq_kl(tiny, ROWS, make_spec("taq_kl", bit_choices=[2, 16]))
    for a, b in zip(profiles["taq_kl"].layers, louder.layers):
        assert b.scores["kl"] > a.scores["kl"]


def test_taqo_delta_is_zero_at_16_bits(tiny: LoadedModel) -> None:
    profile = score_taqo(tiny, ROWS, make_spec("taqo"), bits=16)
    for l in profile.layers:
        assert abs(l.scores["delta_nll"]) < 1e-9
        assert l.scores["delta_em"] == 0 and l.scores["delta_token_accuracy"] == 0


def test_taqo_model_answers_are_reproduced_by_the_fp_model(tiny: LoadedModel) -> None:
    rows = [r for r in ROWS if not r.answers]
    prompts = tokenize_rows(rows, tiny.tokenizer, 64)
    answers = greedy_answers(tiny, prompts, max_new_tokens=5)
    assert all(1 <= len(a) <= 5 for a in answers)
    assert answers == greedy_answers(tiny, prompts, max_new_tokens=5, batch_size=1)
    profile = score_taqo(tiny, rows, make_spec("taqo", calibration=rows), max_new_tokens=5)
    assert profile.layers[0].scores["fp_em"] == 1.0 and profile.layers[0].scores["fp_token_accuracy"] == 1.0


# ---------------------------------------------------------------------------------------------
# progress and cancellation
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_progress_fires_for_every_layer(method: str, tiny: LoadedModel) -> None:
    events: list[tuple[str, float, str]] = []
    score_layers(tiny, ROWS, make_spec(method), progress=lambda s, f, m: events.append((s, f, m)))
    assert {s for s, _, _ in events} == {"score"}
    fractions = [f for _, f, _ in events]
    assert all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    for i in range(4):
        mentions = [m for _, _, m in events if f"layer {i + 1}/4" in m or f"model.layers.{i} " in m]
        assert len(mentions) >= 2, f"layer {i} reported {len(mentions)} times: {events}"


@pytest.mark.parametrize("method", ["taq", "taq_kl", "taqo"])
@pytest.mark.parametrize("cancel_after", [1, 6, 12])
def test_cancel_raises_within_one_layer(method: str, cancel_after: int, tiny: LoadedModel) -> None:
    state = {"checks": 0, "cancelled": False, "reports_after": 0}

    def should_cancel() -> bool:
        state["checks"] += 1
        if state["checks"] >= cancel_after:
            state["cancelled"] = True
        return state["cancelled"]

    def progress(stage: str, fraction: float, message: str) -> None:
        if state["cancelled"] and "layer" in message:
            state["reports_after"] += 1

    with pytest.raises(Cancelled):
        score_layers(tiny, ROWS, make_spec(method), progress=progress, should_cancel=should_cancel)
    assert state["checks"] == cancel_after  # the very first check after the request raises
    assert state["reports_after"] <= 1


def test_stage_progress_maps_spans() -> None:
    events = []
    tracker = StageProgress(lambda s, f, m: events.append((s, f)), stage="score").span(0.5, 1.0).span(0.0, 0.5)
    tracker.report(0.0, "")
    tracker.report(1.0, "")
    tracker.report(2.0, "")
    assert events == [("score", 0.5), ("score", 0.75), ("score", 0.75)]


def test_float32_output_error_matches_the_primitive(tiny: LoadedModel) -> None:
    from core.quant.primitives import dequantize_weight, quantization_error, quantize_weight
    from core.scorers.common import layer_quant_errors, relative_output_error

    seqs = tokenize_rows(ROWS, tiny.tokenizer, 64)
    hessians = HessianCollector(tiny)
    run_fp_pass(tiny, make_batches(seqs, pad_token_id(tiny.tokenizer), "cpu"), hessians=hessians)
    ref = tiny.layers[1]
    spec = make_spec("taq")
    expected = {}
    for bits in (4, 8):
        total = 0.0
        for name, lin in ref.linears.items():
            w = lin.weight.detach()
            q = quantize_weight(w, bits, 32, False)
            h = hessians.hessian(name)
            assert relative_output_error(w, dequantize_weight(q), h) == pytest.approx(quantization_error(w, q, h),
                                                                                        rel=1e-4)
            total += quantization_error(w, q, h) * w.numel()
        expected[bits] = total / ref.params
    got = layer_quant_errors(ref, hessians, spec, keep_bits=4)
    assert got.errors[4] == pytest.approx(expected[4], rel=1e-4)
    assert got.errors[8] == pytest.approx(expected[8], rel=1e-4)
    assert got.errors[16] == 0.0 and set(got.kept) == set(ref.linears)


def test_replay_handles_per_layer_masks_and_softcapping() -> None:
    """Gemma 3 gives sliding- and full-attention layers different masks and rotary embeddings;
    the cache must replay each layer with its own, and the head must soft-cap like the model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from core.models import ModelSource, layer_refs

    config = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                              max_position_embeddings=128, final_logit_softcapping=30.0,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    loaded = LoadedModel(model=model, tokenizer=None, source=ModelSource("gemma", "hf_dir", Path(".")),
                         layers=layer_refs(model))
    seqs = [list(range(5, 5 + n)) for n in (12, 7, 3, 9)]
    batches = make_batches(seqs, 0, "cpu", max_batch_tokens=100)
    cache = run_fp_pass(loaded, batches, cache_inputs=True)
    sliding, full = cache.calls[0][0].kwargs, cache.calls[0][1].kwargs
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
    for b, batch in enumerate(batches):
        with torch.no_grad():
            reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            replayed = head_logits(model, cache.stack, cache.replay(b))
        assert torch.allclose(replayed[batch.valid], reference[batch.valid], atol=1e-5, rtol=0)
        for r, i in enumerate(batch.rows):
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([seqs[i]])).logits[0]
            assert torch.allclose(replayed[r, : len(seqs[i])], alone, atol=1e-5, rtol=0)
