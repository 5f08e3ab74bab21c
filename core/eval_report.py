"""`eval.json` of a job: every budget's quantized model and its equal-budget uniform baseline
against full precision on the eval rows.

* teacher-forced metrics for every variant, streamed layer by layer in one pass
  (`core.streaming.evaluate`): gold-answer NLL, next-token KL and top-1 agreement;
* greedy generation (exact match, F1, contains) when the whole model fits the worker's memory
  (`core.streaming.generate`); otherwise `generation.skipped_reason` says why;
* paired-bootstrap intervals of each variant minus full precision on the same items.
"""

from __future__ import annotations

from typing import Any

from core.evaluation import bootstrap_ci, evaluate_generation
from core.spec import CalibrationRow, JobSpec
from core.streaming.evaluate import EvalVariant, TeacherForced, teacher_forced_eval

__all__ = ["budget_report", "evaluate_job"]

EVAL_NEW_TOKENS = 32
GENERATION_METRICS = (("exact_match", "em"), ("f1", "f1"), ("contains", "contains"))


def _paired(a: list[float | None], b: list[float | None], seed: int) -> dict[str, Any] | None:
    diffs = [y - x for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    return bootstrap_ci(diffs, seed=seed).to_dict() if diffs else None


def budget_report(spec: JobSpec, rows: list[CalibrationRow], teacher: dict[str, TeacherForced],
                  generation: dict[str, Any], *, meta: dict[str, Any], skipped_reason: str | None) -> dict[str, Any]:
    """One budget's report; `teacher` and `generation` are keyed full_precision / quantized /
    uniform."""
    seed = spec.seed
    data: dict[str, Any] = {
        "dataset": spec.eval_dataset_id or f"holdout:{spec.eval_fraction}",
        "n_items": len(rows),
        "metrics": {name: ev.to_dict(include_items=True) for name, ev in generation.items()},
        "fidelity": {name: {"mean_kl": tf.mean_kl, "top1_agreement": tf.top1_agreement, "n_tokens": tf.n_tokens}
                     for name, tf in teacher.items() if name != "full_precision"},
        "teacher_forced": {name: tf.to_dict(seed=seed) for name, tf in teacher.items()},
        "generation": {"ran": skipped_reason is None, "skipped_reason": skipped_reason,
                       "max_new_tokens": EVAL_NEW_TOKENS},
        "meta": meta,
    }
    deltas: dict[str, Any] = {}
    fp_tf, fp_gen = teacher.get("full_precision"), generation.get("full_precision")
    for name in ("quantized", "uniform"):
        if name not in teacher:
            continue
        entry: dict[str, Any] = {"gold_nll": _paired(fp_tf.gold_nll_items, teacher[name].gold_nll_items, seed)}
        if fp_gen is not None and name in generation:
            for metric, attr in GENERATION_METRICS:
                entry[metric] = _paired(getattr(fp_gen, attr), getattr(generation[name], attr), seed)
        deltas[name] = entry
    data["delta_vs_full_precision"] = deltas
    return data


def evaluate_job(run) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluate stage of a `core.job_stages.JobRun`: (eval.json, generation summary)."""
    from core.pipeline import budget_tag, linear_bits
    from core.streaming.generate import installed, materialized

    spec, model, rows = run.spec, run.model, list(run.inputs.eval_rows)
    variants: list[EvalVariant] = []
    budgets = []
    for allocation in run.allocations:
        tag = budget_tag(allocation.budget)
        uniform = run.uniform_baseline(allocation)
        names = {"quantized": f"{tag}:quantized"}
        variants.append(EvalVariant(names["quantized"], linear_bits(model.layers, allocation)))
        if uniform is not None:
            names["uniform"] = f"{tag}:uniform"
            variants.append(EvalVariant(names["uniform"], linear_bits(model.layers, uniform)))
        budgets.append((allocation, uniform, names))
    tracker = run.tracker("evaluate")
    skipped = run.generation_skip_reason()
    teacher = teacher_forced_eval(model, rows, variants, run.codes, max_tokens=spec.max_tokens,
                                  tracker=tracker.span(0.0, 0.6 if skipped is None else 1.0), area=run.area)
    generated: dict[str, Any] = {}
    answered = [i for i, row in enumerate(rows) if row.answers]
    if skipped is None and answered:
        from core.data import tokenize_rows

        prompts = tokenize_rows([rows[i] for i in answered], model.tokenizer, spec.max_tokens)
        golds = [list(rows[i].answers) for i in answered]
        with materialized(model) as module:
            def generate():
                return evaluate_generation(module, model.tokenizer, prompts, golds, max_new_tokens=EVAL_NEW_TOKENS,
                                           device=str(model.device), seed=spec.seed)

            generated["full_precision"] = generate()
            for k, variant in enumerate(variants):
                run.tracker("evaluate").check()
                with installed(model, variant.bits, run.codes):
                    generated[variant.name] = generate()
                tracker.report(0.6 + 0.4 * (k + 1) / len(variants), f"generated with {variant.name}")
    elif skipped is None:
        skipped = "no eval row has gold answers"
    reports = []
    for allocation, uniform, names in budgets:
        teacher_b = {"full_precision": teacher["full_precision"],
                     **{kind: teacher[name] for kind, name in names.items()}}
        gen_b = ({"full_precision": generated["full_precision"],
                  **{kind: generated[name] for kind, name in names.items()}} if generated else {})
        meta = {"avg_bits": allocation.budget, "effective_bits": allocation.effective_bits,
                "uniform_effective_bits": uniform.effective_bits if uniform else None,
                "rows": len(rows), "rows_with_answers": len(answered)}
        reports.append(budget_report(spec, rows, teacher_b, gen_b, meta=meta, skipped_reason=skipped))
    report = reports[0] if len(reports) == 1 else {"budgets": reports}
    return report, {"ran": skipped is None, "skipped_reason": skipped}
