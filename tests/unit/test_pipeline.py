"""core.pipeline.run_job on the tiny Llama with a MemoryStore: budgets met, budget sweeps,
byte-identical artifacts, resume inside the layer pass and from stored stage outputs, cancellation,
progress, sequential calibration, reused profiles, exports that load, and the streamed evaluation
against whole in-memory models."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pipeline_helpers import (
    LAYER_MESSAGE,
    LAYER_PREFIX,
    LAYERS,
    ROWS,
    Interrupted,
    Recorder,
    Run,
    artifacts,
    check_progress,
    clone,
    dequantized_model,
    layer_blobs,
    linear_inputs,
    logits_gap,
    make_spec,
    output_error,
    records,
    run,
    same_artifacts,
    write_hf,
)

from core.allocation import layer_costs_from_profile
from core.controls import allocate_uniform_mix
from core.data import encode_text, split_rows, tokenize_rows
from core.errors import BudgetInfeasible, Cancelled, InvalidSpec
from core.job_export import CheckpointWeights
from core.models import LoadedModel
from core.pipeline import (
    STAGE_SHARES,
    STAGES,
    JobHooks,
    JobInputs,
    StagePlan,
    allocate_stage,
    budget_tag,
    overall_progress,
    reference_bits,
    run_job,
)
from core.quant.primitives import dequantize_weight
from core.scheme import QuantScheme, effective_bits
from core.scorers.common import prompt_plan, select_rows
from core.spec import CalibrationRow
from core.streaming.checkpoints import LayerRecord, MemoryStore, load_codes, load_record
from core.types import Profile

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def base(source, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run(make_spec(), source, work_dir=tmp_path_factory.mktemp("work"))


# ------------------------------------------------------------------------------ budgets and layout


def test_budget_met_exactly_and_layers_share_bits(base: Run, loaded: LoadedModel) -> None:
    [allocation] = base.outputs.allocations
    assert allocation.budget == 6.0 and allocation.unit == "layer" and allocation.rule == "budget"
    assert set(allocation.bits) == set(LAYERS)
    params = {ref.name: ref.params for ref in loaded.layers}
    achieved = sum(effective_bits(allocation.bits[n], 32, False) * p for n, p in params.items()) / sum(params.values())
    assert achieved == pytest.approx(allocation.effective_bits) and achieved <= 6.0
    assert len(set(allocation.bits.values())) > 1  # a mixed allocation at this budget
    assert [l.bits for l in base.outputs.profile.layers] == [allocation.bits[n] for n in LAYERS]
    bits = allocation.bit_map.linear_bits(loaded.layers)
    weights = CheckpointWeights(base.store, LAYER_PREFIX, loaded.layers, bits)
    assert set(weights) == {n for n, b in bits.items() if b < 16}
    for ref in loaded.layers:
        for name in ref.linears:  # every linear of a layer at the layer's width
            assert bits[name] == allocation.bits[ref.name]
            if bits[name] < 16:
                q = weights[name]
                assert q.bits == bits[name] and q.group_size == 32 and not q.symmetric
                assert q.shape == tuple(ref.linears[name].weight.shape)
    stored = json.loads(base.store.get_bytes("artifacts/bitmap.json"))
    assert stored["budgets"] == [allocation.to_dict()]
    assert Profile.from_dict(json.loads(base.store.get_bytes("artifacts/profile.json"))) == base.outputs.profile
    with pytest.raises(InvalidSpec, match="no bits"):
        replace(allocation, bits={LAYERS[0]: 4}).bit_map.linear_bits(loaded.layers)


def test_store_layout_and_reported_digests(base: Run) -> None:
    keys = set(base.store.objects)
    assert {
        "artifacts/profile.json",
        "artifacts/profile.png",
        "artifacts/bitmap.json",
        "artifacts/hf/config.json",
        "artifacts/hf/model.safetensors",
        "work/export-b6.json",
    } <= keys
    assert records(base.store) == [0, 1, 2, 3]
    for i in range(4):
        record = LayerRecord.from_json(base.store.get_bytes(f"{LAYER_PREFIX}/layers/{i:05d}.json"))
        assert record.widths == [4, 8] and record.name == LAYERS[i] and record.index == i
        assert all(set(errs) == {4, 8, 16} and errs[16] == 0.0 for errs in record.errors.values())
        assert record.errors.keys() == record.params.keys() and len(record.params) == 7
    [export] = base.outputs.exports
    assert export.tag == "b6" and export.extra == {"n_files": len(export.files)}
    assert base.hooks.exported_tags == ["b6"]
    names = {f["name"] for f in export.files}
    assert names == {k.removeprefix("artifacts/") for k in keys if k.startswith(("artifacts/hf/", "artifacts/model"))}
    for f in export.files:
        data = base.store.get_bytes(f"artifacts/{f['name']}")
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(export.storage) == {"hf"}
    for key, (size, digest) in base.outputs.written.items():
        data = base.store.get_bytes(key)
        assert size == len(data) and digest == hashlib.sha256(data).hexdigest()
    assert set(base.outputs.written) == {"artifacts/profile.json", "artifacts/profile.png", "artifacts/bitmap.json"}
    assert base.outputs.eval_report is None
    assert not list(base.work_dir.iterdir())  # spill files and export staging are removed


def test_same_inputs_give_byte_identical_artifacts(base: Run, source) -> None:
    again = run(make_spec(), source)
    assert artifacts(again.store) == artifacts(base.store)
    assert layer_blobs(again.store) == layer_blobs(base.store)
    assert [(e.tag, e.files, e.storage) for e in again.outputs.exports] == [
        (e.tag, e.files, e.storage) for e in base.outputs.exports
    ]
    assert again.outputs.profile == base.outputs.profile and again.outputs.written == base.outputs.written


def test_spilling_every_hidden_state_changes_no_byte(
    source, base: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.streaming.hidden import SpillArea

    spills = []
    original = SpillArea.spill
    monkeypatch.setattr(SpillArea, "spill", lambda self, t: spills.append(t.shape) or original(self, t))
    spilled = run(make_spec(), source, activation_ram_bytes=0, work_dir=tmp_path)
    assert len(spills) >= 4  # every layer's output went through a file
    assert artifacts(spilled.store) == artifacts(base.store)
    assert layer_blobs(spilled.store) == layer_blobs(base.store)
    assert not list(tmp_path.iterdir())  # spill files and directories are removed


def test_budget_sweep_gives_one_allocation_and_export_set_per_budget(source, base: Run) -> None:
    split = split_rows(ROWS, 0.3, 0)
    swept = run(
        make_spec(bit_budget={"avg_bits": [9.5, 5.5]}, exports=["gguf", "hf"], eval_fraction=0.3),
        source,
        rows=split.calibration,
        eval_rows=split.evaluation,
        memory_limit_bytes=1,
    )
    allocations = swept.outputs.allocations
    assert [a.budget for a in allocations] == [5.5, 9.5]
    assert all(a.effective_bits <= a.budget for a in allocations)
    assert allocations[0].effective_bits < allocations[1].effective_bits
    assert all(l.bits is None for l in swept.outputs.profile.layers)  # several allocations: no single bit map
    assert [e.tag for e in swept.outputs.exports] == ["b5.5", "b9.5"]
    names = [{f["name"].split("/")[0] for f in e.files} for e in swept.outputs.exports]
    assert names == [{"hf-b5.5", "model-b5.5.gguf"}, {"hf-b9.5", "model-b9.5.gguf"}]
    assert swept.store.exists("work/export-b5.5.json") and swept.store.exists("work/export-b9.5.json")
    check_progress(swept.hooks)  # each budget's hf export moves the bar before its GGUF starts
    assert [(f, m) for s, f, m in swept.hooks.events if s == "export"] == [
        (0.25, "exported b5.5 (hf)"),
        (0.5, "exported b5.5"),
        (0.75, "exported b9.5 (hf)"),
        (1.0, "exported b9.5"),
    ]
    assert not swept.store.exists("artifacts/model.gguf") and not swept.store.exists("artifacts/hf/config.json")
    for a in allocations:
        assert swept.outputs.artifact_names(a) == {
            "hf": f"hf-{budget_tag(a.budget)}",
            "gguf": f"model-{budget_tag(a.budget)}.gguf",
        }
    reports = swept.outputs.eval_report["budgets"]  # one eval report per budget
    assert [r["meta"]["avg_bits"] for r in reports] == [5.5, 9.5]
    assert [r["meta"]["effective_bits"] for r in reports] == [a.effective_bits for a in allocations]
    assert all(
        set(r["teacher_forced"]) == {"full_precision", "quantized", "uniform", "error_only", "random"} for r in reports
    )
    assert reports[0]["teacher_forced"]["quantized"]["mean_kl"] > reports[1]["teacher_forced"]["quantized"]["mean_kl"]
    digests = [{f["name"].split("/", 1)[-1]: f["sha256"] for f in e.files} for e in swept.outputs.exports]
    assert digests[0]["model.safetensors"] != digests[1]["model.safetensors"]
    # the same codes as the single-budget pass (RTN codes depend on neither the budget nor the rows)
    assert layer_blobs(swept.store).keys() == layer_blobs(base.store).keys()
    for key, data in layer_blobs(base.store).items():
        if key.endswith(".safetensors"):
            assert swept.store.get_bytes(key) == data


def test_infeasible_budget(source, base: Run) -> None:
    with pytest.raises(BudgetInfeasible):
        allocate_stage(make_spec(bit_budget={"avg_bits": 4.7}), base.outputs.profile)
    store = MemoryStore()
    with pytest.raises(BudgetInfeasible):
        run(make_spec(bit_budget={"avg_bits": 4.7}, exports=["hf"]), source, store=store)
    assert store.exists("artifacts/profile.json") and not store.exists("artifacts/bitmap.json")


def test_uniform_and_paper_rules(base: Run) -> None:
    profile = base.outputs.profile.without_bits()
    uniform = allocate_stage(make_spec(method="uniform", bit_budget={"avg_bits": [5.0, 9.0]}), profile)
    assert [set(a.bits.values()) for a in uniform] == [{4}, {8}]
    paper = allocate_stage(make_spec(allocation="paper", bit_budget=None), profile)
    assert len(paper) == 1 and paper[0].rule == "paper" and paper[0].budget is None
    assert sorted(paper[0].bits.values()) == [4, 4, 4, 8]
    top = max(profile.layers, key=lambda l: l.importance).name
    assert paper[0].bits[top] == 8
    with pytest.raises(InvalidSpec, match="paper"):
        allocate_stage(make_spec(method="taq_kl").model_copy(update={"allocation": "paper"}), profile)


# ------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("crash_in", ["progress", "should_cancel"])
def test_resume_after_a_crash_inside_the_score_pass(source, base: Run, count_quantize, crash_in: str) -> None:
    store = MemoryStore()
    k = 2
    with pytest.raises(Interrupted):
        run(make_spec(), source, store=store, hooks=Recorder(crash_at=f"layer {k}/", crash_in=crash_in))
    assert records(store) == list(range(k))  # layers before k are committed, nothing after
    assert not artifacts(store)
    assert [layer for layer, _ in count_quantize] == list(range(k))
    count_quantize.clear()
    hooks = Recorder()
    resumed = run(make_spec(), source, store=store, hooks=hooks)
    assert [layer for layer, _ in count_quantize] == list(range(k, 4))  # layers < k are not recomputed
    messages = [m for s, _, m in hooks.events if s == "score" and LAYER_MESSAGE.match(m)]
    assert [("checkpointed" in m) for m in messages] == [True] * k + [False] * (4 - k)
    same_artifacts(store, base.store)
    assert layer_blobs(store) == layer_blobs(base.store)
    assert resumed.outputs.exports[0].files == base.outputs.exports[0].files


def test_resume_with_probe_streams_and_sequential_gptq(source, count_quantize) -> None:
    """taq_kl carries a noised probe stream per layer and `calibration_inputs: quantized` a
    quantized calibration stream: both are rebuilt from the checkpoints exactly."""
    rows = ROWS[:4]  # taq_kl applies the LM head to every probe stream: few tokens
    spec = make_spec(method="taq_kl", quantizer="gptq", calibration_inputs="quantized", calibration=rows, max_tokens=24)
    reference = run(spec, source, rows=rows)
    count_quantize.clear()
    store = MemoryStore()
    with pytest.raises(Interrupted):
        run(spec, source, store=store, hooks=Recorder(crash_at="layer 3/"), rows=rows)
    assert records(store) == [0, 1, 2]
    count_quantize.clear()
    run(spec, source, store=store, rows=rows)
    assert [layer for layer, _ in count_quantize] == [3]
    same_artifacts(store, reference.store)
    assert layer_blobs(store) == layer_blobs(reference.store)


def test_records_computed_at_another_dtype_are_not_reused(source, count_quantize) -> None:
    store = MemoryStore()
    spec = make_spec(exports=[])
    with pytest.raises(Interrupted):
        run(spec, source, store=store, hooks=Recorder(crash_at="layer 2/"), dtype=torch.float32)
    count_quantize.clear()
    run(spec, source, store=store, dtype=torch.float64)
    assert [layer for layer, _ in count_quantize] == [0, 1, 2, 3]


def test_records_of_another_pass_are_recomputed(source, base: Run, count_quantize) -> None:
    store = clone(base.store)
    for key in list(store.objects):
        if not key.startswith(LAYER_PREFIX):
            del store.objects[key]
    other = run(make_spec(seed=1, exports=["hf"]), source, store=store)  # the seed is part of the pass key
    assert [layer for layer, _ in count_quantize] == [0, 1, 2, 3]
    assert other.outputs.profile != base.outputs.profile


def test_stored_stage_outputs_are_skipped(source, base: Run, count_quantize, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.streaming.model as streaming_model

    # everything stored: nothing is opened, nothing recomputed, the same outputs come back
    opened = []
    original_open = streaming_model.open_streamed
    monkeypatch.setattr(streaming_model, "open_streamed", lambda *a, **k: opened.append(1) or original_open(*a, **k))
    store = clone(base.store)
    done = run(make_spec(), source, store=store)
    assert done.hooks.skipped() == {
        "load": "all model outputs stored",
        "score": "profile.json stored",
        "allocate": "bitmap.json stored",
        "quantize": "codes stored per layer by the score stage",
        "export": "exports stored",
        "evaluate": "no eval data",
    }
    assert [s for s, _, _ in done.hooks.stages] == list(STAGES)
    assert not opened and not count_quantize and not done.hooks.exported_tags
    assert done.outputs.profile == base.outputs.profile and done.outputs.allocations == base.outputs.allocations
    assert done.outputs.exports == base.outputs.exports and done.outputs.written == base.outputs.written
    assert store.objects == base.store.objects

    # an export marker missing: only the export runs again, from the layer checkpoints
    store = clone(base.store)
    store.delete_prefix("work/export-")
    store.delete_prefix("artifacts/hf/")
    again = run(make_spec(), source, store=store)
    assert set(again.hooks.skipped()) == {"score", "allocate", "quantize", "evaluate"}
    assert opened and not count_quantize and again.hooks.exported_tags == ["b6"]
    assert store.objects == base.store.objects

    # profile and bit map missing: the score pass replays every layer from its record
    store = clone(base.store)
    del store.objects["artifacts/profile.json"], store.objects["artifacts/bitmap.json"]
    rescored = run(make_spec(), source, store=store)
    assert set(rescored.hooks.skipped()) == {"quantize", "evaluate"}
    assert not count_quantize
    same_artifacts(store, base.store)
    assert layer_blobs(store) == layer_blobs(base.store)


def test_resumed_profile_is_byte_identical(source, base: Run) -> None:
    store = MemoryStore()
    with pytest.raises(Interrupted):
        run(make_spec(exports=[]), source, store=store, hooks=Recorder(crash_at="layer 2/"))
    run(make_spec(exports=[]), source, store=store)
    assert store.get_bytes("artifacts/profile.json") == base.store.get_bytes("artifacts/profile.json")


def test_stage_plan_decisions() -> None:
    spec = make_spec()
    store = MemoryStore()
    plan = StagePlan.from_store(store, spec, reused_profile=False)
    assert [plan.skip(s) for s in STAGES] == [
        None,
        None,
        None,
        None,
        "codes stored per layer by the score stage",
        None,
        "no eval data",
        None,
    ]
    assert plan.needs_model and plan.needs_codes
    store.put_bytes("artifacts/profile.json", b"{}")
    store.put_bytes("work/export-b6.json", b"{}")
    plan = StagePlan.from_store(store, spec, reused_profile=False)
    assert plan.skip("score") == "profile.json stored" and not plan.have_exports  # no bit map: exports redone
    store.put_bytes("artifacts/bitmap.json", b"{}")
    plan = StagePlan.from_store(store, spec, reused_profile=False)
    assert plan.have_exports and not plan.needs_model and plan.skip("load") == "all model outputs stored"
    with_eval = StagePlan.from_store(store, make_spec(eval_fraction=0.3), reused_profile=False)
    assert with_eval.wants_eval and not with_eval.have_eval and with_eval.needs_model
    assert with_eval.skip("evaluate") is None and with_eval.skip("export") == "exports stored"
    sweep = StagePlan.from_store(store, make_spec(bit_budget={"avg_bits": [6.0, 9.0]}), reused_profile=False)
    assert not sweep.have_exports  # b9 is missing
    paper = StagePlan.from_store(MemoryStore(), make_spec(allocation="paper", bit_budget=None), reused_profile=True)
    assert paper.skip("score") == "profile reused from another job" and paper.skip("quantize") is None
    reused = MemoryStore()
    for key in ("artifacts/profile.json", "artifacts/bitmap.json", "work/export-default.json"):
        reused.put_bytes(key, b"{}")
    paper = StagePlan.from_store(reused, make_spec(allocation="paper", bit_budget=None), reused_profile=True)
    assert paper.skip("score") == "profile.json stored" and paper.skip("quantize") == "exports and eval stored"


# ---------------------------------------------------------------------------- cancel and progress


def test_cancellation(source) -> None:
    class CancelNow(JobHooks):
        def should_cancel(self) -> bool:
            return True

    store = MemoryStore()
    with pytest.raises(Cancelled):
        run_job(JobInputs(spec=make_spec(), source=source, rows=ROWS), store, CancelNow())
    assert not store.objects
    hooks = Recorder(cancel_at="layer 2/")
    with pytest.raises(Cancelled):
        run(make_spec(), source, store=store, hooks=hooks)
    assert records(store) == [0, 1] and not artifacts(store)
    assert hooks.events[-1][2].startswith("layer 2/")


def test_progress_is_reported_per_stage_in_order(base: Run) -> None:
    assert [s for s, _, _ in base.hooks.stages] == list(STAGES)
    assert base.hooks.skipped() == {"quantize": "codes stored per layer by the score stage", "evaluate": "no eval data"}
    check_progress(base.hooks)
    score = [(f, m) for s, f, m in base.hooks.events if s == "score"]
    assert [m.split(" (")[0] for _, m in score if LAYER_MESSAGE.match(m)] == [f"layer {i}/4" for i in range(1, 5)]
    assert score[-1][0] == 1.0


def test_overall_progress_and_stage_shares() -> None:
    assert list(STAGE_SHARES) == list(STAGES)
    assert sum(STAGE_SHARES.values()) == pytest.approx(1.0, abs=1e-12)
    assert overall_progress("load", 0.0) == 0.0
    assert overall_progress("publish", 1.0) == pytest.approx(1.0)
    points = [overall_progress(s, f) for s in STAGES for f in (0.0, 0.25, 0.5, 1.0)]
    assert points == sorted(points)
    for a, b in zip(STAGES, STAGES[1:]):
        assert overall_progress(a, 1.0) == pytest.approx(overall_progress(b, 0.0))
    assert overall_progress("score", 2.0) == overall_progress("score", 1.0)
    assert overall_progress("score", -1.0) == overall_progress("score", 0.0)
    assert overall_progress("score", 0.5) == pytest.approx(
        sum(STAGE_SHARES[s] for s in STAGES[:2]) + 0.5 * STAGE_SHARES["score"]
    )


@pytest.mark.parametrize(
    "fields, expected",
    [
        (dict(bit_choices=[4, 8, 16], bit_budget={"avg_bits": 6.0}), 4),  # 8 → 9.0 does not fit
        (dict(bit_choices=[4, 8, 16], bit_budget={"avg_bits": 8.75}), 8),  # 8 bits, g32 asym → 8.75
        (dict(bit_choices=[4, 8, 16], bit_budget={"avg_bits": 8.7}), 4),
        (dict(bit_choices=[4, 8, 16], bit_budget={"avg_bits": [9.5, 5.5]}), 4),  # the smallest budget decides
        (dict(bit_choices=[2, 3, 4, 8], bit_budget={"avg_bits": 4.75}, symmetric=True), 4),  # sym: 4 + 16/32
        (dict(bit_choices=[2, 3, 4, 8], bit_budget={"avg_bits": 4.6}), 3),
        (dict(bit_choices=[3, 4, 16], bit_budget={"avg_bits": 2.0}), 3),  # none fits: the lowest
        (dict(bit_choices=[8, 16], allocation="paper", bit_budget=None), 8),  # no budget: the lowest
        (dict(bit_choices=[16], bit_budget={"avg_bits": 16.0}), None),
    ],
)
def test_reference_bits(fields: dict, expected: int | None) -> None:
    assert reference_bits(make_spec(**fields)) == expected


# --------------------------------------------------------------------- sequential calibration inputs


def test_quantized_calibration_inputs(source, base: Run, loaded: LoadedModel) -> None:
    spec = make_spec(calibration_inputs="quantized", exports=[])
    assert reference_bits(spec) == 4
    seq = run(spec, source)
    fp_keys = {i: json.loads(base.store.get_bytes(f"{LAYER_PREFIX}/layers/{i:05d}.json"))["pass_key"] for i in range(4)}
    for i in range(4):
        fp = load_record(base.store, LAYER_PREFIX, i, fp_keys[i])
        key = json.loads(seq.store.get_bytes(f"{LAYER_PREFIX}/layers/{i:05d}.json"))["pass_key"]
        assert key != fp_keys[i]  # calibration_inputs is part of the pass key
        record = load_record(seq.store, LAYER_PREFIX, i, key)
        for bits in (4, 8):  # RTN codes do not depend on the inputs ...
            assert seq.store.get_bytes(f"{LAYER_PREFIX}/layers/{i:05d}/b{bits}.safetensors") == base.store.get_bytes(
                f"{LAYER_PREFIX}/layers/{i:05d}/b{bits}.safetensors"
            )
        if i == 0:  # ... their errors do, from layer 1 on
            assert record.errors == fp.errors
        else:
            assert all(record.errors[n][4] != fp.errors[n][4] for n in record.errors)
    # layer 1's errors are measured on the outputs of layer 0 quantized at reference_bits
    model = dequantized_model(loaded, load_codes(base.store, LAYER_PREFIX, 0, 4), fp16_rest=False)
    sequences = prompt_plan(loaded.tokenizer, select_rows(ROWS, spec), spec).sequences
    names = list(loaded.layers[1].linears)
    xs = linear_inputs(model, loaded.tokenizer, sequences, names)
    record = load_record(
        seq.store, LAYER_PREFIX, 1, json.loads(seq.store.get_bytes(f"{LAYER_PREFIX}/layers/00001.json"))["pass_key"]
    )
    for bits in (4, 8):
        codes = load_codes(seq.store, LAYER_PREFIX, 1, bits)
        for name in names:
            expected = output_error(loaded.model.get_submodule(name).weight, dequantize_weight(codes[name]), xs[name])
            assert record.errors[name][bits] == pytest.approx(expected, rel=1e-4), (name, bits)
    # the profile's scores still come from the full-precision stream
    assert [l.scores for l in seq.outputs.profile.layers] == [l.scores for l in base.outputs.profile.layers]


# ----------------------------------------------------------------------------------- reused profile


def test_reused_profile_skips_score_and_quantizes_only_the_needed_widths(source, base: Run, count_quantize) -> None:
    spec = make_spec(profile_from_job_id="job-a", bit_budget={"avg_bits": 5.0}, exports=["hf"])
    reused = run(spec, source, reused_profile=base.outputs.profile.without_bits())
    skipped = reused.hooks.skipped()
    assert skipped["score"] == "profile reused from another job" and "quantize" not in skipped
    [allocation] = reused.outputs.allocations
    assert set(allocation.bits.values()) == {4}
    assert sorted(count_quantize) == [(i, [4, 16]) for i in range(4)]  # 8 bits is never computed
    assert not layer_blobs(reused.store) and records(reused.store, "work/codes") == [0, 1, 2, 3]
    codes = sorted(k for k in reused.store.objects if k.endswith(".safetensors") and k.startswith("work/codes"))
    assert codes == [f"work/codes/layers/{i:05d}/b4.safetensors" for i in range(4)]
    for i in range(4):  # RTN codes of the codes pass equal the score pass's at the same width
        assert reused.store.get_bytes(codes[i]) == base.store.get_bytes(f"{LAYER_PREFIX}/layers/{i:05d}/b4.safetensors")
    profile = reused.outputs.profile
    assert [l.bits for l in profile.layers] == [4] * 4
    assert profile.without_bits() == base.outputs.profile.without_bits()
    # resume of a reused-profile job: every stage output stored, nothing runs again
    count_quantize.clear()
    again = run(spec, source, store=reused.store, reused_profile=base.outputs.profile.without_bits())
    assert again.hooks.skipped()["quantize"] == "exports and eval stored" and not count_quantize
    assert again.outputs.exports == reused.outputs.exports
    # exports missing: the codes come from the codes pass's checkpoints, not recomputed
    store = clone(reused.store)
    store.delete_prefix("work/export-")
    store.delete_prefix("artifacts/hf/")
    third = run(spec, source, store=store, reused_profile=base.outputs.profile.without_bits())
    assert third.hooks.skipped()["score"] == "profile.json stored" and not count_quantize
    assert store.objects == reused.store.objects


def test_reused_profile_must_match_the_model(source, base: Run) -> None:
    wrong = replace(base.outputs.profile, layers=base.outputs.profile.layers[:2]).without_bits()
    with pytest.raises(InvalidSpec):
        run(make_spec(profile_from_job_id="job-a", exports=["hf"]), source, reused_profile=wrong)


def test_max_calibration_rows_subsamples_deterministically(source) -> None:
    spec = make_spec(max_calibration_rows=4, exports=[])
    many = ROWS + [CalibrationRow(prompt=f"extra {i}") for i in range(30)]
    a, b = run(spec, source, rows=many), run(spec, source, rows=many)
    assert artifacts(a.store) == artifacts(b.store)
    assert a.outputs.profile.layers[0].scores["reservoir_tokens"] <= 4 * 48
    assert [m for s, _, m in a.hooks.events if s == "calibrate"] == ["4 calibration rows, 0 eval rows"]


# ---------------------------------------------------------------------------------------- exports


def test_hf_export_loads_and_equals_the_dequantized_model(base: Run, loaded: LoadedModel, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    [allocation] = base.outputs.allocations
    weights = dict(
        CheckpointWeights(base.store, LAYER_PREFIX, loaded.layers, allocation.bit_map.linear_bits(loaded.layers))
    )
    exported = AutoModelForCausalLM.from_pretrained(
        write_hf(base.store, "hf", tmp_path / "hf"), dtype=torch.float32
    ).eval()
    gap, scale = logits_gap(exported, dequantized_model(loaded, weights, fp16_rest=True), loaded.tokenizer)
    assert gap <= 1e-3 * scale
    config = json.loads(base.store.get_bytes("artifacts/hf/config.json"))
    assert set(config["quantization_config"]["config_groups"]) == {"int4", "int8"}


# ------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def evaluated(source) -> tuple[Run, list[CalibrationRow], list[CalibrationRow]]:
    split = split_rows(ROWS, 0.3, 0)
    spec = make_spec(eval_fraction=0.3, exports=["hf"])
    return run(spec, source, rows=split.calibration, eval_rows=split.evaluation), split.calibration, split.evaluation


def test_eval_report_has_teacher_forced_metrics_for_every_variant(evaluated) -> None:
    result, calibration, eval_rows = evaluated
    assert len(eval_rows) == 3 and len(calibration) == 7
    report = result.outputs.eval_report
    assert report == json.loads(result.store.get_bytes("artifacts/eval.json"))
    assert "artifacts/eval.json" in result.outputs.written
    assert report["n_items"] == 3 and report["dataset"] == "holdout:0.3"
    tf = report["teacher_forced"]
    assert set(tf) == {"full_precision", "quantized", "uniform", "error_only", "random"}
    for values in tf.values():
        assert values["gold_nll"]["mean"] > 0 and len(values["items"]) == 3
        assert all(item["gold_nll"] is not None for item in values["items"])
        assert values["n_tokens"] > 0
    assert tf["full_precision"]["mean_kl"] == 0.0 and tf["full_precision"]["top1_agreement"] == 1.0
    assert tf["quantized"]["mean_kl"] > 0 and tf["uniform"]["mean_kl"] > 0
    assert set(report["fidelity"]) == {"quantized", "uniform", "error_only", "random"}
    # the controls spend the same budget: uniform mixes 4 and 8 bits to get as close as it can
    variants = report["variants"]
    assert report["meta"]["avg_bits"] == 6.0
    assert report["meta"]["uniform_effective_bits"] == variants["uniform"]["effective_bits"]
    assert all(v["effective_bits"] <= 6.0 and v["budget"] == 6.0 for v in variants.values())
    assert variants["uniform"]["bits_histogram"] == {"4": 3, "8": 1} and variants["random"]["rule"] == "random"
    assert set(report["delta_vs_full_precision"]) == {"quantized", "uniform", "error_only", "random"}
    compared = {(c["baseline"], c["metric"]) for c in report["comparisons"]}
    assert compared == {
        (c, m) for c in ("uniform", "error_only", "random") for m in ("gold_nll", "exact_match", "f1", "contains")
    }
    assert all(
        c["verdict"] in ("beats", "beats_with_more_bits", "no_difference", "loses") for c in report["comparisons"]
    )
    assert set(report["retained"]) == {"quantized", "uniform", "error_only", "random"}
    assert report["meta"]["full_precision"]["bits"] > 0
    check_progress(result.hooks)
    assert result.hooks.skipped() == {"quantize": "codes stored per layer by the score stage"}


def answer_fidelity64(reference, model, sequences) -> tuple[float, float, int]:
    """Token-weighted KL(p_ref ‖ p) and top-1 agreement in float64 at the answer positions of each
    (prompt + answer ids, prompt length): the last prompt token and those predicting the answer."""
    kl, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for ids, start in sequences:
            x = torch.tensor([ids])
            a = torch.log_softmax(reference(input_ids=x).logits[0].double(), dim=-1)[start - 1 : len(ids) - 1]
            b = torch.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)[start - 1 : len(ids) - 1]
            kl += float((a.exp() * (a - b)).sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            count += a.shape[0]
    return kl / count, agree / count, count


def test_streamed_fidelity_equals_whole_model_fidelity(evaluated, loaded: LoadedModel) -> None:
    result, _, eval_rows = evaluated
    report = result.outputs.eval_report
    [allocation] = result.outputs.allocations
    uniform = allocate_uniform_mix(layer_costs_from_profile(result.outputs.profile), 6.0, [4, 8, 16], QuantScheme(32))
    prompts = tokenize_rows(eval_rows, loaded.tokenizer, 48)
    sequences = [
        (prompt + encode_text(row.answers[0], loaded.tokenizer, templated=True)[:32], len(prompt))
        for row, prompt in zip(eval_rows, prompts, strict=True)
    ]
    reference64 = copy.deepcopy(loaded.model).double()
    for name, alloc in (("quantized", allocation), ("uniform", uniform)):
        weights = CheckpointWeights(result.store, LAYER_PREFIX, loaded.layers, alloc.bit_map.linear_bits(loaded.layers))
        model = dequantized_model(loaded, dict(weights), fp16_rest=False)
        streamed = report["teacher_forced"][name]
        kl64, top64, count = answer_fidelity64(reference64, copy.deepcopy(model).double(), sequences)
        # KL and top-1 count only the answer positions, not the chat template
        assert streamed["n_tokens"] == count == sum(len(ids) - start for ids, start in sequences)
        assert count < sum(len(p) for p in prompts)
        assert top64 == pytest.approx(streamed["top1_agreement"], abs=1e-12)
        # the streamed pass computes in float32: over a handful of answer positions at KL ~ 4e-4
        # that leaves ~5e-5 relative against float64
        assert streamed["mean_kl"] == pytest.approx(kl64, rel=2e-4)
        assert report["fidelity"][name] == {k: streamed[k] for k in ("mean_kl", "top1_agreement", "n_tokens")}
        # gold NLL: mean over each answer's tokens given the prompt, the best alias per row
        for row, prompt, item in zip(eval_rows, prompts, streamed["items"], strict=True):
            nlls = []
            for answer in row.answers:
                ids = encode_text(answer, loaded.tokenizer, templated=True)[:32]
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].double()
                logp = torch.log_softmax(logits, dim=-1)
                nlls.append(float(-logp[len(prompt) - 1 : -1].gather(1, torch.tensor(ids)[:, None]).mean()))
            assert item["gold_nll"] == pytest.approx(min(nlls), rel=1e-5)


def test_generation_runs_when_the_model_fits_and_is_skipped_otherwise(evaluated, source) -> None:
    result, calibration, eval_rows = evaluated
    report = result.outputs.eval_report
    assert report["generation"]["ran"] is True and report["generation"]["skipped_reason"] is None
    assert result.outputs.generation == {"ran": True, "skipped_reason": None}
    assert set(report["metrics"]) == {"full_precision", "quantized", "uniform", "error_only", "random"}
    assert all(m["n"] == 3 for m in report["metrics"].values())
    assert set(report["delta_vs_full_precision"]["quantized"]) >= {"gold_nll", "exact_match", "f1", "contains"}
    # the same job resumed at evaluate on a worker whose memory is too small for the whole model
    store = clone(result.store)
    del store.objects["artifacts/eval.json"]
    small = run(result.spec, source, store=store, rows=calibration, eval_rows=eval_rows, memory_limit_bytes=1 << 20)
    assert small.hooks.skipped() == {
        "score": "profile.json stored",
        "allocate": "bitmap.json stored",
        "quantize": "codes stored per layer by the score stage",
        "export": "exports stored",
    }
    skipped = small.outputs.eval_report["generation"]
    assert skipped["ran"] is False and "needs the whole model in memory" in skipped["skipped_reason"]
    assert small.outputs.generation["ran"] is False
    assert small.outputs.eval_report["metrics"] == {}
    assert small.outputs.eval_report["teacher_forced"] == report["teacher_forced"]
    assert "exact_match" not in small.outputs.eval_report["delta_vs_full_precision"]["quantized"]
