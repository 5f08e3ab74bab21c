"""`eval.json` of a job: every budget's quantized model and the task-agnostic controls at the same
budget against full precision on the eval rows.

* controls (`control_allocations`, core/controls.py): `uniform` (the widest single width plus the
  most layers one width higher the budget pays for, spread over the depth: uniform at equal bits),
  and with `eval_controls` `error_only` (the same knapsack, every sensitivity 1) and `random`
  (seeded random layers); a control that is the job's own rule is left out;
* teacher-forced metrics for every variant, streamed layer by layer in one pass
  (`core.streaming.evaluate`): gold-answer NLL, next-token KL and top-1 agreement at the answer
  positions;
* greedy generation (exact match, F1, contains) when the whole model fits the worker's memory
  (`core.streaming.generate`); otherwise `generation.skipped_reason` says why;
* paired-bootstrap intervals: each variant minus full precision, the quantized model minus each
  control (`comparisons`, with a verdict), and the share of full precision's `contains` each
  variant retains. Variants with identical bits are evaluated once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from core.errors import TaqError
from core.evaluation import GenerationEval, evaluate_generation
from core.spec import CalibrationRow, JobSpec, Method
from core.stats import compare, paired_difference, paired_ratio
from core.streaming.evaluate import EvalVariant, TeacherForced, teacher_forced_eval
from core.types import BitAllocation, Profile

if TYPE_CHECKING:
    from core.job_stages import JobRun
    from core.streaming.model import StreamedModel

__all__ = ["budget_report", "control_allocations", "describe_allocation", "evaluate_job", "source_precision"]

EVAL_NEW_TOKENS = 32
GENERATION_METRICS = (("exact_match", "em"), ("f1", "f1"), ("contains", "contains"))
CONTROLS = ("uniform", "error_only", "random")


def control_allocations(spec: JobSpec, profile: Profile | None, allocation: BitAllocation) -> dict[str, BitAllocation]:
    """The controls of one allocation, per layer, at its budget (the paper rule: at its effective
    bits). None for method `uniform`; a control whose budget cannot be met is left out."""
    from core.allocation import layer_costs_from_profile
    from core.controls import allocate_error_only, allocate_random, allocate_uniform_mix

    if spec.method == Method.uniform or profile is None:
        return {}
    makers = {"uniform": allocate_uniform_mix}
    if spec.eval_controls:
        makers |= {"error_only": allocate_error_only, "random": partial(allocate_random, seed=spec.seed)}
    budget = allocation.budget if allocation.budget is not None else allocation.effective_bits
    layers = layer_costs_from_profile(profile)
    out = {}
    for name, make in makers.items():
        if allocation.rule == name:
            continue
        try:
            out[name] = make(layers, budget, list(spec.bit_choices), spec.scheme)
        except (TaqError, ValueError):  # a budget it cannot meet, or a reused profile without those widths
            continue
    return out


def source_precision(model: StreamedModel) -> dict[str, Any]:
    """What "full precision" is: the stored type(s) of the decoder linears of the source and their
    mean stored bits per weight (a Q4_1 GGUF is about 5 bits, not 16)."""
    infos = model.reader.infos()
    names = [name for ref in model.layers for name in ref.linears]
    weights = [infos[f"{n}.weight"] for n in names if f"{n}.weight" in infos]
    if not weights:
        return {"formats": {}, "bits": None}
    numel = sum(math.prod(w.shape) for w in weights)
    return {
        "formats": dict(Counter(w.dtype for w in weights)),
        "bits": sum(w.nbytes for w in weights) * 8 / numel if numel else None,
    }


def describe_allocation(allocation: BitAllocation) -> dict[str, Any]:
    histogram = Counter(allocation.bits.values())
    return {
        "rule": allocation.rule.value,
        "budget": allocation.budget,
        "effective_bits": allocation.effective_bits,
        "solver": allocation.solver,
        "unit": allocation.unit.value,
        "bits_histogram": {str(b): histogram[b] for b in sorted(histogram)},
    }


def budget_report(
    spec: JobSpec,
    rows: list[CalibrationRow],
    teacher: dict[str, TeacherForced],
    generation: dict[str, Any],
    *,
    meta: dict[str, Any],
    skipped_reason: str | None,
    allocations: dict[str, BitAllocation] | None = None,
) -> dict[str, Any]:
    """One budget's report; `teacher` and `generation` are keyed full_precision / quantized / the
    controls, `allocations` quantized / the controls."""
    seed = spec.seed
    allocations = allocations or {}
    data: dict[str, Any] = {
        "dataset": spec.eval_dataset_id or f"holdout:{spec.eval_fraction}",
        "n_items": len(rows),
        "variants": {name: describe_allocation(a) for name, a in allocations.items()},
        "metrics": {name: ev.to_dict(include_items=True) for name, ev in generation.items()},
        "fidelity": {
            name: {"mean_kl": tf.mean_kl, "top1_agreement": tf.top1_agreement, "n_tokens": tf.n_tokens}
            for name, tf in teacher.items()
            if name != "full_precision"
        },
        "teacher_forced": {name: tf.to_dict(seed=seed) for name, tf in teacher.items()},
        "generation": {
            "ran": skipped_reason is None,
            "skipped_reason": skipped_reason,
            "max_new_tokens": EVAL_NEW_TOKENS,
        },
        "meta": meta,
    }
    fp_tf, fp_gen = teacher.get("full_precision"), generation.get("full_precision")
    quantized = [n for n in teacher if n != "full_precision"]
    deltas: dict[str, Any] = {}
    retained: dict[str, Any] = {}
    for name in quantized:
        assert fp_tf is not None  # teacher_forced_eval always scores full precision
        entry = {"gold_nll": _difference(fp_tf.gold_nll_items, teacher[name].gold_nll_items, seed)}
        if fp_gen is not None and name in generation:
            for metric, attr in GENERATION_METRICS:
                entry[metric] = _difference(getattr(fp_gen, attr), getattr(generation[name], attr), seed)
            ratio = paired_ratio(generation[name].contains, fp_gen.contains, seed=seed)
            retained[name] = None if ratio is None else ratio.to_dict()
        deltas[name] = entry
    data["delta_vs_full_precision"] = deltas
    data["retained"] = retained
    data["comparisons"] = _comparisons(teacher, generation, allocations, seed)
    return data


def _difference(a: Sequence[float | None], b: Sequence[float | None], seed: int) -> dict[str, Any] | None:
    try:
        return paired_difference(a, b, seed=seed).to_dict()
    except ValueError:  # no item with a value in both
        return None


def _comparisons(
    teacher: dict[str, TeacherForced], generation: dict[str, Any], allocations: dict[str, BitAllocation], seed: int
) -> list[dict[str, Any]]:
    """The quantized model against each control: gold NLL and, when generated, contains / EM / F1."""
    out = []
    bits = {name: a.effective_bits for name, a in allocations.items()}
    for control in CONTROLS:
        if control not in teacher or "quantized" not in teacher:
            continue
        pairs = [("gold_nll", teacher["quantized"].gold_nll_items, teacher[control].gold_nll_items)]
        if "quantized" in generation and control in generation:
            pairs += [
                (metric, getattr(generation["quantized"], attr), getattr(generation[control], attr))
                for metric, attr in GENERATION_METRICS
            ]
        for metric, mine, theirs in pairs:
            try:
                out.append(
                    compare(
                        "quantized",
                        control,
                        metric,
                        mine,
                        theirs,
                        variant_bits=bits.get("quantized"),
                        baseline_bits=bits.get(control),
                        seed=seed,
                    ).to_dict()
                )
            except ValueError:
                continue
    return out


def _variants(
    run: JobRun,
) -> tuple[list[EvalVariant], list[tuple[BitAllocation, dict[str, BitAllocation], dict[str, str]]]]:
    """The distinct weight variants of every budget (identical bits evaluated once) and, per
    budget, its allocations and the variant name of each."""
    from core.pipeline import budget_tag

    variants: list[EvalVariant] = []
    seen: dict[tuple[tuple[str, int], ...], str] = {}
    budgets = []
    for allocation in run.allocations:
        tag = budget_tag(allocation.budget)
        entries = {"quantized": allocation, **control_allocations(run.spec, run.profile, allocation)}
        names = {}
        for kind, entry in entries.items():
            bits = entry.bit_map.linear_bits(run.loaded.layers)
            key = tuple(sorted(bits.items()))
            if key not in seen:
                seen[key] = f"{tag}:{kind}"
                variants.append(EvalVariant(seen[key], bits))
            names[kind] = seen[key]
        budgets.append((allocation, entries, names))
    return variants, budgets


def evaluate_job(run: JobRun) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluate stage of a `core.job_stages.JobRun`: (eval.json, generation summary)."""
    from core.job_generation import generation_skip_reason
    from core.streaming.generate import installed, materialized

    spec, model, rows = run.spec, run.loaded, list(run.inputs.eval_rows)
    variants, budgets = _variants(run)
    tracker = run.tracker("evaluate")
    skipped = generation_skip_reason(run)
    teacher = teacher_forced_eval(
        model,
        rows,
        variants,
        run.codes,
        max_tokens=spec.max_tokens,
        tracker=tracker.span(0.0, 0.6 if skipped is None else 1.0),
        area=run.area,
    )
    generated: dict[str, Any] = {}
    answered = [i for i, row in enumerate(rows) if row.answers]
    if skipped is None and answered:
        from core.data import tokenize_rows

        prompts = tokenize_rows([rows[i] for i in answered], model.tokenizer, spec.max_tokens)
        golds = [list(rows[i].answers or []) for i in answered]
        with materialized(model) as module:

            def generate() -> GenerationEval:
                return evaluate_generation(
                    module,
                    model.tokenizer,
                    prompts,
                    golds,
                    max_new_tokens=EVAL_NEW_TOKENS,
                    device=str(model.device),
                    seed=spec.seed,
                )

            generated["full_precision"] = generate()
            for k, variant in enumerate(variants):
                run.tracker("evaluate").check()
                with installed(model, variant.bits, run.codes):
                    generated[variant.name] = generate()
                tracker.report(0.6 + 0.4 * (k + 1) / len(variants), f"generated with {variant.name}")
    elif skipped is None:
        skipped = "no eval row has gold answers"
    source = source_precision(model)
    reports = []
    for allocation, entries, names in budgets:
        teacher_b = {
            "full_precision": teacher["full_precision"],
            **{kind: teacher[name] for kind, name in names.items()},
        }
        gen_b = (
            {"full_precision": generated["full_precision"], **{kind: generated[name] for kind, name in names.items()}}
            if generated
            else {}
        )
        meta = {
            "avg_bits": allocation.budget,
            "effective_bits": allocation.effective_bits,
            "uniform_effective_bits": None,  # present (null) also when no uniform control fits the budget
            **{f"{kind}_effective_bits": entries[kind].effective_bits for kind in entries if kind != "quantized"},
            "full_precision": source,
            "rows": len(rows),
            "rows_with_answers": len(answered),
        }
        reports.append(
            budget_report(spec, rows, teacher_b, gen_b, meta=meta, skipped_reason=skipped, allocations=entries)
        )
    report = reports[0] if len(reports) == 1 else {"budgets": reports}
    return report, {"ran": skipped is None, "skipped_reason": skipped}
