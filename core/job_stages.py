"""The stages of `core.pipeline.run_job`, in one object that carries the state between them
(the order, the resume decisions and the progress shares are in core/pipeline.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.calibration import StageProgress, default_batch_tokens, make_batches, pad_token_id
from core.canonical_json import canonical_json as dumps
from core.errors import DataError, InvalidSpec
from core.pipeline import (
    CODES_PREFIX,
    LAYERS_PREFIX,
    ArtifactStore,
    ExportRecord,
    JobHooks,
    JobInputs,
    JobOutputs,
    StagePlan,
    allocate_stage,
    check_rows,
    pass_key,
    reference_bits,
)
from core.runtimes import check_shapes
from core.spec import CalibrationInputs, Quantizer
from core.streaming.checkpoints import load_codes
from core.types import JSON_VERSION, BitAllocation, Profile, QuantizedWeight, check_version

if TYPE_CHECKING:
    from core.calibration import Batch
    from core.spec import CalibrationRow
    from core.streaming.hidden import SpillArea
    from core.streaming.layer_pass import PassResult, StreamScorer
    from core.streaming.model import StreamedModel

EVAL_NEW_TOKENS = 32
SMALL_ARTIFACTS = ("profile.json", "profile.png", "bitmap.json", "eval.json")


class JobRun:
    def __init__(self, inputs: JobInputs, store: ArtifactStore, hooks: JobHooks) -> None:
        self.inputs, self.store, self.hooks = inputs, store, hooks
        self.spec = inputs.spec
        self.model: StreamedModel | None = None
        self.rows: list[CalibrationRow] = []
        self.holdout: list[CalibrationRow] = []  # closed_loop's held-back rows
        self.profile: Profile | None = None
        self.allocations: list[BitAllocation] = []
        self.exports: list[ExportRecord] = []
        self.eval_report: dict[str, Any] | None = None
        self.generation: dict[str, Any] | None = None
        self.written: dict[str, tuple[int, str]] = {}
        self.codes_prefix = LAYERS_PREFIX
        self._tmp: Path | None = None
        self._area: SpillArea | None = None

    # ---- plumbing -------------------------------------------------------------------------------
    @property
    def loaded(self) -> StreamedModel:
        """The model the load stage opened (a stage that needs it never runs after a skipped load)."""
        if self.model is None:
            raise RuntimeError("the model is not loaded: the load stage was skipped")
        return self.model

    def tracker(self, stage: str) -> StageProgress:
        return StageProgress(self.hooks.progress, self.hooks.should_cancel, stage)

    @property
    def tmp(self) -> Path:
        if self._tmp is None:
            base = self.inputs.work_dir
            if base is not None:
                Path(base).mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix="taq-job-", dir=base))
        return self._tmp

    @property
    def area(self) -> SpillArea:
        from core.streaming.hidden import SpillArea

        if self._area is None:
            self._area = SpillArea(self.inputs.activation_ram_bytes, self.tmp / "spill")
        return self._area

    def put(self, name: str, data: bytes) -> None:
        key = f"artifacts/{name}"
        self.store.put_bytes(key, data)
        self.written[key] = (len(data), hashlib.sha256(data).hexdigest())

    def batches_for(self, sequences: list[list[int]]) -> list[Batch]:
        tokens = self.inputs.batch_tokens or default_batch_tokens(self.loaded.device)
        return make_batches(sequences, pad_token_id(self.loaded.tokenizer), self.loaded.device, max_batch_tokens=tokens)

    # ---- the run ----------------------------------------------------------------------------------
    def run(self) -> Any:
        plan = StagePlan.from_store(self.store, self.spec, reused_profile=self.inputs.reused_profile is not None)
        try:
            for stage in ("load", "calibrate", "score", "allocate", "quantize", "export", "evaluate"):
                reason = plan.skip(stage)
                with self.hooks.stage(stage, skipped=reason is not None, reason=reason or ""):
                    self.tracker(stage).check()
                    getattr(self, f"stage_{stage}")(plan, reason)
            with self.hooks.stage("publish", skipped=False, reason=""):
                self.tracker("publish").check()
                return self.hooks.publish(self.outputs())
        finally:
            if self.model is not None:
                self.model.close()
            if self._area is not None:
                self._area.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def outputs(self) -> JobOutputs:
        assert self.profile is not None  # the score stage sets it (computed, stored or reused)
        for name in SMALL_ARTIFACTS:
            key = f"artifacts/{name}"
            if key not in self.written and self.store.exists(key):
                data = self.store.get_bytes(key)
                self.written[key] = (len(data), hashlib.sha256(data).hexdigest())
        return JobOutputs(
            spec=self.spec,
            source=self.inputs.source,
            profile=self.profile,
            allocations=self.allocations,
            exports=self.exports,
            eval_report=self.eval_report,
            written=dict(self.written),
            generation=self.generation,
        )

    # ---- stages -----------------------------------------------------------------------------------
    def stage_load(self, plan: StagePlan, skip: str | None) -> None:
        from core.streaming.model import open_streamed

        if skip is None:
            self.model = open_streamed(self.inputs.source, device=self.inputs.device, dtype=self.inputs.dtype)
            # before any calibration work (the submit check did the same from the config if it could)
            check_shapes(
                self.spec.target_runtime,
                in_features={name: lin.in_features for ref in self.model.layers for name, lin in ref.linears.items()},
                group_sizes=self.spec.group_sizes,
                k_quant_widths=self.spec.k_quant_widths,
            )
            self.hooks.progress("load", 1.0, f"opened {self.spec.model} for streaming on {self.model.device}")

    def stage_calibrate(self, plan: StagePlan, skip: str | None) -> None:
        from core.scorers.common import select_rows

        self.rows = select_rows(self.inputs.rows, self.spec)
        if self.spec.closed_loop:
            from core.closed_loop import split_holdout

            self.rows, self.holdout = split_holdout(self.rows, self.spec.seed)
        if plan.needs_model and not plan.have_profile:
            check_rows(self.spec, self.rows)
        self.hooks.progress(
            "calibrate", 1.0, f"{len(self.rows)} calibration rows, {len(self.inputs.eval_rows)} eval rows"
        )

    def layer_pass(self, stage: str, scorer: StreamScorer, widths: list[int], prefix: str) -> PassResult:
        from core.scorers.common import prompt_plan
        from core.streaming.layer_pass import PassSettings, run_layer_pass

        batches: list[Batch] = []
        if self.rows:
            sequence_plan = scorer.plan(self.loaded.tokenizer, self.rows, self.spec)
            if sequence_plan is None:
                sequence_plan = prompt_plan(self.loaded.tokenizer, self.rows, self.spec)
            if not sequence_plan.sequences:
                raise DataError("no calibration sequence is left after tokenization", details=[])
            batches = self.batches_for(sequence_plan.sequences)
        sequential = self.spec.calibration_inputs == CalibrationInputs.quantized
        settings = PassSettings(
            widths=tuple(sorted(widths)),
            scheme=self.spec.scheme,
            gptq=self.spec.quantizer == Quantizer.gptq,
            clip_search=self.spec.clip_search,
            sequential=sequential and bool(widths),
            reference_bits=reference_bits(self.spec) if sequential else None,
            pass_key=pass_key(
                self.spec,
                self.rows,
                widths,
                self.inputs.source,
                scorer.method,
                device=self.loaded.device.type,
                dtype=self.loaded.dtype,
            ),
            prefix=prefix,
        )
        if settings.reference_bits is not None and settings.reference_bits not in settings.widths:
            settings = replace(settings, reference_bits=min(settings.widths))
        tracker = self.tracker(stage)
        result = run_layer_pass(self.loaded, batches, scorer, settings, self.store, tracker.span(0.0, 0.9), self.area)
        tracker.report(0.9, "layer pass done")
        return result

    def stage_score(self, plan: StagePlan, skip: str | None) -> None:
        from core.scorers import make_scorer
        from core.scorers.common import build_profile

        if skip is not None:
            if plan.have_profile:
                self.profile = Profile.from_dict(json.loads(self.store.get_bytes("artifacts/profile.json")))
                self.codes_prefix = CODES_PREFIX if plan.reused_profile else LAYERS_PREFIX
            else:
                reused = self.inputs.reused_profile
                assert reused is not None  # the plan skips scoring for a reused profile only
                self.profile = reused
                self.codes_prefix = CODES_PREFIX
                if [l.name for l in reused.layers] != [ref.name for ref in self.loaded.layers]:
                    raise InvalidSpec("the reused profile does not match the model's layers")
            return
        from core.job_generation import greedy_token_answers, greedy_variant_answers

        scorer = make_scorer(
            self.spec,
            generate=partial(greedy_token_answers, self),
            generate_variants=partial(greedy_variant_answers, self),
        )
        widths = [b for b in self.spec.bit_choices if b < 16]
        result = self.layer_pass("score", scorer, widths, LAYERS_PREFIX)
        scores = scorer.finish(self.loaded, result)
        self.profile = build_profile(self.spec, scorer.method, scores, result.records)
        for stream in result.streams.values():
            stream.drop()
        if result.final is not None:
            result.final.drop()
        self.put("profile.json", dumps(self.profile.to_dict()))
        self.hooks.profile_ready(self.profile)
        self.hooks.progress("score", 1.0, "profile stored")

    def stage_allocate(self, plan: StagePlan, skip: str | None) -> None:
        from core.plot import plot_profile

        if skip is not None:
            data = json.loads(self.store.get_bytes("artifacts/bitmap.json"))
            check_version(data, "bitmap.json")
            self.allocations = [BitAllocation.from_dict(a) for a in data["budgets"]]
            if self.profile is not None and len(self.allocations) == 1:
                self.profile = self.profile.with_bits(self.allocations[0].bit_map)
            return
        profile = self.profile
        assert profile is not None  # set by the score stage, which runs or is skipped with a profile
        self.allocations = list(allocate_stage(self.spec, profile))
        if self.spec.closed_loop:
            from core.closed_loop import closed_loop_stage

            self.allocations = closed_loop_stage(self, profile)
        if len(self.allocations) == 1:
            profile = self.profile = profile.with_bits(self.allocations[0].bit_map)
        self.put("profile.json", dumps(profile.to_dict()))
        self.hooks.profile_ready(profile)
        effective = self.allocations[0].effective_bits if len(self.allocations) == 1 else None
        self.put(
            "profile.png",
            plot_profile(
                profile,
                f"{self.spec.model} · {self.spec.method.value}",
                scheme=self.spec.scheme,
                effective=effective,
            ),
        )
        self.put(
            "bitmap.json", dumps({"version": JSON_VERSION, "budgets": [a.to_dict() for a in self.allocations]})
        )  # last: the checkpoint
        self.hooks.progress("allocate", 1.0, f"{len(self.allocations)} allocation(s)")

    def stage_quantize(self, plan: StagePlan, skip: str | None) -> None:
        """Only for a reused profile: one pass storing codes at the widths this job needs."""
        from core.scorers.uniform import UniformScorer

        if skip is not None:
            return
        needed = {b for a in self.allocations for b in a.bits.values()}
        if plan.wants_eval:  # the controls evaluated next to the allocation may use any width of the menu
            needed |= set(self.spec.bit_choices)
        widths = sorted(b for b in needed if b < 16)
        result = self.layer_pass("quantize", UniformScorer(), widths, CODES_PREFIX)
        if result.final is not None:
            result.final.drop()
        self.codes_prefix = CODES_PREFIX

    def codes(self, index: int, bits: int) -> dict[str, QuantizedWeight]:
        return load_codes(self.store, self.codes_prefix, index, bits, device=self.loaded.device)

    def stage_export(self, plan: StagePlan, skip: str | None) -> None:
        from core.job_export import export_allocations

        export_allocations(self)

    def stage_evaluate(self, plan: StagePlan, skip: str | None) -> None:
        from core.eval_report import evaluate_job

        if skip is not None:
            if plan.wants_eval:
                self.eval_report = json.loads(self.store.get_bytes("artifacts/eval.json"))
            return
        if not self.inputs.eval_rows:
            return
        self.eval_report, self.generation = evaluate_job(self)
        self.put("eval.json", dumps(self.eval_report))
