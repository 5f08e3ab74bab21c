"""quantizer=gptq through run_job on the tiny Llama: an hf export that transformers loads, the same
bytes twice, lower measured output error than RTN (and the profile trades GPTQ's own errors),
sequential calibration changes the codes, reused profiles, progress and cancellation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pipeline_helpers import (
    LAYER_PREFIX,
    ROWS,
    Recorder,
    Run,
    artifacts,
    check_progress,
    dequantized_model,
    layer_blobs,
    linear_inputs,
    logits_gap,
    output_error,
    records,
    run,
    write_hf,
)
from pipeline_helpers import make_spec as base_spec

from core.calibration import make_batches, pad_token_id
from core.errors import Cancelled
from core.job_export import CheckpointWeights
from core.models import LoadedModel
from core.pipeline import reference_bits
from core.quant.layer import LayerInputs, quantize_layer
from core.quant.primitives import dequantize_weight
from core.scheme import QuantScheme
from core.scorers.common import prompt_plan, select_rows
from core.streaming.checkpoints import LayerRecord, MemoryStore, load_codes

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


def make_spec(**overrides):
    fields = dict(quantizer="gptq", group_size=64)  # 96 inputs with group 64: a padded last group
    fields.update(overrides)
    return base_spec(**fields)


def record(store: MemoryStore, index: int) -> LayerRecord:
    return LayerRecord.from_json(store.get_bytes(f"{LAYER_PREFIX}/layers/{index:05d}.json"))


def blob(store: MemoryStore, index: int, bits: int, prefix: str = LAYER_PREFIX) -> bytes:
    return store.get_bytes(f"{prefix}/layers/{index:05d}/b{bits}.safetensors")


@pytest.fixture(scope="module")
def gptq(source) -> Run:
    return run(make_spec(), source)


@pytest.fixture(scope="module")
def rtn(source) -> Run:
    return run(make_spec(quantizer="rtn", exports=[]), source)


@pytest.fixture(scope="module")
def calibration_inputs(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """What every linear receives on the job's calibration tokens, from the whole fp model."""
    spec = make_spec()
    sequences = prompt_plan(loaded.tokenizer, select_rows(ROWS, spec), spec).sequences
    names = [n for ref in loaded.layers for n in ref.linears]
    return linear_inputs(loaded.model, loaded.tokenizer, sequences, names)


def test_end_to_end_with_an_hf_export_that_loads(gptq: Run, loaded: LoadedModel, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    [allocation] = gptq.outputs.allocations
    assert allocation.effective_bits <= 6.0 and set(allocation.bits.values()) == {4, 8}
    weights = dict(
        CheckpointWeights(gptq.store, LAYER_PREFIX, loaded.layers, allocation.bit_map.linear_bits(loaded.layers))
    )
    assert len(weights) == 28
    for q in weights.values():
        assert q.group_size == 64 and q.codes.shape[1] == -(-q.shape[1] // 64) * 64
    assert weights["model.layers.0.self_attn.q_proj"].codes.shape[1] == 128  # 96 inputs, padded
    exported = AutoModelForCausalLM.from_pretrained(
        write_hf(gptq.store, "hf", tmp_path / "hf"), dtype=torch.float32
    ).eval()
    gap, scale = logits_gap(exported, dequantized_model(loaded, weights, fp16_rest=True), loaded.tokenizer)
    assert gap <= 1e-3 * scale
    check_progress(gptq.hooks)


def test_same_inputs_same_bytes(gptq: Run, source) -> None:
    again = run(make_spec(), source)
    assert artifacts(again.store) == artifacts(gptq.store)
    assert layer_blobs(again.store) == layer_blobs(gptq.store)
    assert again.outputs.exports == gptq.outputs.exports


def test_lower_measured_output_error_than_rtn(gptq: Run, rtn: Run, loaded: LoadedModel, calibration_inputs) -> None:
    errors: dict[str, list[float]] = {"gptq": [], "rtn": []}
    for run_, key in ((gptq, "gptq"), (rtn, "rtn")):
        for ref in loaded.layers:
            stored = record(run_.store, ref.index)
            codes = load_codes(run_.store, LAYER_PREFIX, ref.index, 4)
            for name, linear in ref.linears.items():
                measured = output_error(linear.weight, dequantize_weight(codes[name]), calibration_inputs[name])
                assert stored.errors[name][4] == pytest.approx(measured, rel=1e-4), (key, name)
                errors[key].append(measured)
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    assert mean["gptq"] <= 0.9 * mean["rtn"], mean
    assert sum(g < r for g, r in zip(errors["gptq"], errors["rtn"])) == len(errors["rtn"])


def test_the_profile_trades_the_jobs_own_errors(gptq: Run, rtn: Run) -> None:
    for g, r in zip(gptq.outputs.profile.layers, rtn.outputs.profile.layers, strict=True):
        assert g.scores == r.scores and g.importance == r.importance  # the same full-precision stream
        assert g.quant_error[16] == r.quant_error[16] == 0.0
        assert g.quant_error[4] < r.quant_error[4] and g.quant_error[8] <= r.quant_error[8]
        for gl, rl in zip(g.linears, r.linears, strict=True):
            assert gl.name == rl.name and gl.quant_error[4] < rl.quant_error[4]


def test_quantized_calibration_inputs_change_the_codes(gptq: Run, source, loaded: LoadedModel) -> None:
    spec = make_spec(calibration_inputs="quantized", exports=[])
    assert reference_bits(spec) == 4
    seq = run(spec, source)
    for bits in (4, 8):
        assert blob(seq.store, 0, bits) == blob(gptq.store, 0, bits)  # layer 0 sees the same inputs
        for i in (1, 2, 3):
            assert blob(seq.store, i, bits) != blob(gptq.store, i, bits)
    # layer 1 is calibrated on the outputs of layer 0 quantized at reference_bits
    model = dequantized_model(loaded, load_codes(seq.store, LAYER_PREFIX, 0, 4), fp16_rest=False)
    sequences = prompt_plan(loaded.tokenizer, select_rows(ROWS, spec), spec).sequences
    names = list(loaded.layers[1].linears)
    xs = linear_inputs(model, loaded.tokenizer, sequences, names)
    stored = record(seq.store, 1)
    codes = load_codes(seq.store, LAYER_PREFIX, 1, 4)
    for name in names:
        weight = loaded.model.get_submodule(name).weight
        assert stored.errors[name][4] == pytest.approx(
            output_error(weight, dequantize_weight(codes[name]), xs[name]), rel=1e-4
        )
    # and its GPTQ codes are those of the Hessians of these inputs (recorded on the whole model)
    batches = make_batches(sequences, pad_token_id(loaded.tokenizer), "cpu")
    inputs = LayerInputs({n: model.get_submodule(n) for n in names}, sum(b.n_tokens for b in batches))
    with inputs.recording(), torch.no_grad():
        for batch in batches:
            inputs.set_batch(batch.valid)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    weights = {n: loaded.model.get_submodule(n).weight.detach().float() for n in names}
    expected = quantize_layer(weights, inputs, [4, 8, 16], scheme=QuantScheme(64, False), gptq=True, clip_search=False)
    for name in names:
        assert torch.equal(expected.codes[4][name].codes, codes[name].codes), name
        assert torch.equal(expected.codes[4][name].scale, codes[name].scale), name


def test_reused_profile_runs_gptq_at_the_needed_width_only(gptq: Run, source, count_quantize) -> None:
    spec = make_spec(profile_from_job_id="job-a", bit_budget={"avg_bits": 5.0}, exports=[])
    reused = run(spec, source, reused_profile=gptq.outputs.profile.without_bits())
    [allocation] = reused.outputs.allocations
    assert set(allocation.bits.values()) == {4}
    assert sorted(count_quantize) == [(i, [4, 16]) for i in range(4)]
    assert records(reused.store, "work/codes") == [0, 1, 2, 3] and not layer_blobs(reused.store)
    for i in range(4):  # same Hessians (fp inputs), same sweep: the score pass's codes
        assert blob(reused.store, i, 4, "work/codes") == blob(gptq.store, i, 4)


def test_progress_and_cancel_per_layer(source) -> None:
    hooks = Recorder(cancel_at="layer 2/")
    store = MemoryStore()
    with pytest.raises(Cancelled):
        run(make_spec(), source, store=store, hooks=hooks)
    assert records(store) == [0, 1] and not artifacts(store)
    check_progress(hooks)


def test_all_sixteen_bits_exports_a_plain_model(source, loaded: LoadedModel, tmp_path: Path, count_quantize) -> None:
    from transformers import AutoModelForCausalLM

    done = run(make_spec(bit_choices=[16], bit_budget={"avg_bits": 16.0}), source)
    [allocation] = done.outputs.allocations
    assert set(allocation.bits.values()) == {16} and allocation.effective_bits == 16.0
    assert all(widths == [16] for _, widths in count_quantize)
    assert not [k for k in done.store.objects if k.endswith(".safetensors") and k.startswith("work/")]
    config = json.loads(done.store.get_bytes("artifacts/hf/config.json"))
    assert "quantization_config" not in config
    exported = AutoModelForCausalLM.from_pretrained(
        write_hf(done.store, "hf", tmp_path / "hf"), dtype=torch.float32
    ).eval()
    gap, scale = logits_gap(exported, dequantized_model(loaded, {}, fp16_rest=True), loaded.tokenizer)
    assert gap <= 1e-3 * scale
