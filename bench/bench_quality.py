"""Does task-aware allocation beat task-agnostic allocation at equal bits? One run, one model (CPU).

    python bench/bench_quality.py --suites capitals arithmetic capitals_mc \
        --avg-bits 5.0 --methods taq_grad+gptq taq_grad+gptq+loop --controls uniform error_only random \
        --cross-task arithmetic:capitals \
        --json bench/out/quality.json --markdown bench/out/quality.md --plot bench/out/quality.png

For every suite, every method runs the service's own pipeline (core.pipeline.run_job: the layer
pass scores the suite's calibration split and stores every layer's codes at every width) once
per scoring setting, and each budget is allocated from that profile. The controls use the first
method's pass (the same quantizer and calibration, hence the same codes and measured errors) at
the same budget with the task taken out (core/controls.py): `uniform` (the widest single width
plus as many layers one width higher as the budget pays for, spread over the depth), `error_only`
(the same exact knapsack with every sensitivity 1) and `random` (seeded random layers). A
cross-task row `SRC:DST` allocates with the sensitivities of SRC's profile and DST's own measured
errors and codes (GPTQ calibrated on DST), so it isolates the allocation. Peers (`--peers`:
HQQ, our RTN or GPTQ at matched bits) quantize every linear at 4 bits with the group size that
spends the budget; they are controls too, their dequantized weights swapped into the same passes.

Every variant of a suite is then measured on the whole eval split:
* gold-answer NLL per item (teacher-forced, best alias) and KL / top-1 agreement against full
  precision at the answer positions, all variants in one streamed layer pass
  (core.streaming.evaluate, the service's evaluate stage);
* greedy generation scored with `contains` and exact match per item (core.answers).
Then every method row is compared with every control, cross-task and peer row of the same
budget, item by item: the
paired-bootstrap mean difference with its 95 % interval; "beats" means the interval excludes zero
at no more effective bits. Effective bits count padded partial groups and the int8 zero points;
full precision is the packaged source as stored (SmolLM2: GGUF Q4_1, about 5 bits), said in its row.
Identical allocations from the same pass are measured once.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import PEER_BITS, UniformConfig, config_for_budget, peer_weights  # noqa: E402
from bench.quality_tables import comparison_table, comparisons, plot, variant_table, verdict_summary  # noqa: E402
from core.allocation import LayerCost, allocate_budget, layer_costs_from_profile  # noqa: E402
from core.calibration import StageProgress  # noqa: E402
from core.controls import allocate_error_only, allocate_random, allocate_uniform_mix  # noqa: E402
from core.data import tokenize_rows  # noqa: E402
from core.eval_report import describe_allocation, source_precision  # noqa: E402
from core.evaluation import GenerationEval, evaluate_generation  # noqa: E402
from core.job_export import CheckpointWeights  # noqa: E402
from core.models import LoadedModel, load_model, resolve_model  # noqa: E402
from core.packaged_models import GEMMA3_ID, SMOLLM2_ID, assemble_gemma3, packaged_models  # noqa: E402
from core.pipeline import LAYERS_PREFIX, JobInputs, allocate_stage, run_job  # noqa: E402
from core.quant.primitives import dequantize_weight  # noqa: E402
from core.spec import CalibrationRow, JobSpec  # noqa: E402
from core.stats import bootstrap_ci, paired_difference, paired_ratio  # noqa: E402
from core.streaming.checkpoints import MemoryStore, load_codes  # noqa: E402
from core.streaming.evaluate import EvalVariant, teacher_forced_eval  # noqa: E402
from core.streaming.hidden import SpillArea  # noqa: E402
from core.streaming.model import StreamedModel, open_streamed  # noqa: E402
from core.types import BitAllocation, Profile  # noqa: E402

TASKS = ROOT / "bench" / "tasks"
#: the default sweep (`make bench-quality`): taq_grad with GPTQ, alone and with the job's closed
#: loop, and the three controls (taq+gptq / taq_kl+gptq are the earlier sweep, `--methods`)
DEFAULT_METHODS = ["taq_grad+gptq", "taq_grad+gptq+loop"]
DEFAULT_SUITES = ["capitals", "arithmetic", "capitals_mc"]
CONTROLS = {"uniform": allocate_uniform_mix, "error_only": allocate_error_only, "random": allocate_random}
MODELS_DIR = ROOT / "bench" / "out" / "models"


def read_rows(path: Path) -> list[CalibrationRow]:
    return [
        CalibrationRow.model_validate_json(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]


def load(model_id: str) -> LoadedModel:
    registry = packaged_models()
    if model_id == GEMMA3_ID:
        assemble_gemma3(MODELS_DIR)
        registry = packaged_models(MODELS_DIR)
    return load_model(resolve_model(model_id, [], registry), device="cpu", dtype=torch.float32)


def weights_key(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def with_continuation(loaded: LoadedModel, rows: list[CalibrationRow], how: str) -> list[CalibrationRow]:
    """Calibration rows as given (`none`), or with an assistant turn appended: the first gold
    answer (`gold`) or the full-precision model's own greedy answer (`self`), so calibration
    activations also cover the answer tokens."""
    if how == "none":
        return rows
    if how == "gold":
        answers = [(r.answers or [""])[0] for r in rows]
    else:
        ids = tokenize_rows(rows, loaded.tokenizer, 256)
        answers = evaluate_generation(loaded.model, loaded.tokenizer, ids, [[] for _ in rows]).generations
    out = []
    for row, answer in zip(rows, answers, strict=True):
        messages = (
            [m.model_dump() for m in row.messages]
            if row.messages is not None
            else [{"role": "user", "content": row.prompt}]
        )
        out.append(
            CalibrationRow(messages=messages + [{"role": "assistant", "content": answer.strip()}], answers=row.answers)
        )
    return out


#: method-token modifiers and the JobSpec fields they set
MODIFIERS = {
    "gptq": {"quantizer": "gptq"},
    "clip": {"clip_search": True},
    "linear": {"allocation_unit": "linear"},
    # the job's closed loop (core/closed_loop.py): its pass scores without the held-back rows and
    # its allocation is the one the loop ships
    "loop": {"closed_loop": True},
    # sequential calibration (issue 14 part 6): each layer calibrated on the already-quantized
    # outputs of the layers before it; compared item by item with the same token without +seq
    "seq": {"calibration_inputs": "quantized"},
    # float zero points (fp16 offsets, GGUF Q4_1/Q5_1) for widths up to 5 bits; compared item by
    # item with the same token without +fz
    "fz": {"zero_point": "float"},
    # 8-bit weights in groups of 128 (the other widths keep --group-size); compared item by item
    # with the same token without +g8w128 (pairs, not a dict, so a variant stays hashable)
    "g8w128": {"group_size_by_bits": ((8, 128),)},
    # GGUF K-quant super-blocks (with +fz, --group-size 32): 4/5-bit linears with 256 | in as
    # Q4_K/Q5_K at 4.5/5.5 bits; compared item by item with the same token without +kq
    "kq": {"k_quants": True},
}


@dataclass(frozen=True)
class Variant:
    """A method token such as `taq+gptq+linear`: the method and the spec fields its modifiers set."""

    method: str
    options: tuple[tuple[str, object], ...]

    @property
    def scoring_options(self) -> dict:
        """The fields that change the pass: the quantizer, clip search and the closed loop (rows held back)."""
        fields = (
            "clip_search",
            "quantizer",
            "closed_loop",
            "calibration_inputs",
            "zero_point",
            "group_size_by_bits",
            "k_quants",
        )
        return {k: v for k, v in self.options if k in fields}


def parse_method(token: str) -> Variant:
    method, *modifiers = token.split("+")
    unknown = [m for m in modifiers if m not in MODIFIERS]
    if unknown:
        raise SystemExit(f"unknown modifier(s) {unknown} in {token!r}; known: {sorted(MODIFIERS)}")
    options: dict = {}
    for m in modifiers:
        options.update(MODIFIERS[m])
    return Variant(method, tuple(sorted(options.items())))


def make_spec(args: argparse.Namespace, model_id: str, method: str, **options) -> JobSpec:
    options = {"calibration_inputs": args.calibration_inputs, **options}  # a +seq token overrides the flag
    if "group_size_by_bits" in options:
        options["group_size_by_bits"] = dict(options["group_size_by_bits"])
    return JobSpec(
        model=model_id,
        method=method,
        calibration_dataset_id="bench",
        bit_budget={"avg_bits": list(args.avg_bits) if len(args.avg_bits) > 1 else args.avg_bits[0]},
        bit_choices=args.bit_choices,
        group_size=args.group_size,
        max_calibration_rows=args.calibration_rows,
        max_tokens=128,
        seed=0,
        exports=[],
        **options,
    )


@dataclass
class Scored:
    """One layer pass: the profile, and the store holding every layer's codes at every width."""

    profile: Profile
    store: MemoryStore
    seconds: float
    allocations: list[BitAllocation] = field(default_factory=list)  # what the job itself allocated


def run_pass(loaded: LoadedModel, spec: JobSpec, calibration: list[CalibrationRow]) -> Scored:
    """The service's pipeline on `calibration` (no exports, no evaluation)."""
    t0 = time.perf_counter()
    store = MemoryStore()
    outputs = run_job(JobInputs(spec=spec, source=loaded.source, rows=calibration), store)
    return Scored(outputs.profile.without_bits(), store, time.perf_counter() - t0, list(outputs.allocations))


def dequantized(loaded: LoadedModel, scored: Scored, allocation: BitAllocation) -> dict[str, torch.Tensor]:
    """The dequantized weight of every linear below 16 bits under `allocation`, from the pass's
    checkpoints."""
    codes = CheckpointWeights(scored.store, LAYERS_PREFIX, loaded.layers, allocation.bit_map.linear_bits(loaded.layers))
    return {name: dequantize_weight(codes[name], dtype=torch.float32) for name in codes}


@dataclass
class Candidate:
    """One weight variant of a suite before it is measured."""

    label: str
    kind: str
    method: str
    budget: float | None
    allocation: BitAllocation | None = None
    scored: Scored | None = None
    weights: dict[str, torch.Tensor] | None = None  # peers: dequantized weights, no codes
    effective_bits: float = 0.0
    seconds: float = 0.0


@dataclass
class SuiteEval:
    """Greedy generation of weight variants on one suite with a single working copy of the model."""

    loaded: LoadedModel
    rows: list[CalibrationRow]
    max_new_tokens: int
    work: torch.nn.Module = field(init=False)
    cache: dict[str, GenerationEval] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # token ids (chat template applied when the tokenizer has one; plain prompts get the
        # tokenizer's BOS, which Gemma 3 needs and whose GGUF carries no chat template)
        self.prompts = tokenize_rows(self.rows, self.loaded.tokenizer, 256)
        self.golds = [r.answers or [] for r in self.rows]
        self.work = copy.deepcopy(self.loaded.model)

    def generate(self, weights: dict[str, torch.Tensor] | None) -> GenerationEval:
        model = self.loaded.model
        if weights is not None:
            key = weights_key(weights)
            if key in self.cache:
                return self.cache[key]
            modules = dict(self.work.named_modules())
            originals = dict(self.loaded.model.named_modules())
            with torch.no_grad():
                for ref in self.loaded.layers:
                    for name in ref.linears:
                        modules[name].weight.copy_(weights.get(name, originals[name].weight))
            model = self.work
        result = evaluate_generation(
            model, self.loaded.tokenizer, self.prompts, self.golds, max_new_tokens=self.max_new_tokens
        )
        if weights is not None:
            self.cache[key] = result
        return result


def cross_allocation(spec: JobSpec, source: Profile, target: Profile) -> list[BitAllocation]:
    """The sensitivities (or, for a method that predicts it, the predicted loss) of `source`
    (another task's profile) with the errors and shapes of `target` (this task's pass), allocated
    as the method allocates."""
    sens = {l.name: l.sensitivity for l in source.layers}
    predicted = {l.name: dict(l.predicted_loss) or None for l in source.layers}
    layers = [
        LayerCost(c.name, c.params, sens[c.name], c.quant_error, c.shapes, predicted[c.name])
        for c in layer_costs_from_profile(target)
    ]
    return [allocate_budget(layers, b, list(spec.bit_choices), spec.scheme) for b in spec.budgets]


def gptq_matched_weights(
    loaded: LoadedModel,
    model_id: str,
    config: UniformConfig,
    calibration: list[CalibrationRow],
    args: argparse.Namespace,
) -> dict[str, torch.Tensor]:
    """Our GPTQ, every layer at 4 bits with the group size that spends the budget (calibrated on
    the suite's calibration rows: the error-compensating counterpart of `rtn_matched`)."""
    spec = JobSpec(
        model=model_id,
        method="uniform",
        quantizer="gptq",
        calibration_dataset_id="bench",
        bit_budget={"avg_bits": math.ceil(config.model_effective_bits(loaded) * 1e6) / 1e6},
        bit_choices=[config.bits],
        group_size=config.group_size,
        max_calibration_rows=args.calibration_rows,
        max_tokens=128,
        seed=0,
        exports=[],
        calibration_inputs=args.calibration_inputs,
    )
    scored = run_pass(loaded, spec, calibration)
    return dequantized(loaded, scored, allocate_stage(spec, scored.profile)[0])


def scored_pass(args, loaded: LoadedModel, model_id: str, suite: str, variant: Variant, profiles: dict) -> Scored:
    """The suite's layer pass for the variant's method, run once and reused by every budget and
    control that shares it (the allocation unit does not change the pass; the quantizer and clip
    search change its codes and errors)."""
    key = (suite, variant.method, tuple(sorted(variant.scoring_options.items())))
    if key not in profiles:
        calibration = with_continuation(
            loaded, read_rows(TASKS / suite / "calibration.jsonl"), args.calibration_continuation
        )
        spec = make_spec(args, model_id, variant.method, **variant.scoring_options)
        profiles[key] = run_pass(loaded, spec, calibration)
        print(
            f"  {suite} · {variant.method} {variant.scoring_options or ''} pass: {profiles[key].seconds:.0f}s",
            flush=True,
        )
    return profiles[key]


def candidates(args, loaded: LoadedModel, model_id: str, suite: str, profiles: dict) -> list[Candidate]:
    """Methods at every budget; the controls on the first method's pass and on the pass of every
    later method with another grid (`+fz`, `+g8w128`: equal-bits controls on that grid); cross-task
    rows, peers."""
    out: list[Candidate] = []
    control_passes: dict[object, tuple[str, Variant, Scored]] = {}
    for token in args.methods:
        variant = parse_method(token)
        scored = scored_pass(args, loaded, model_id, suite, variant, profiles)
        spec = make_spec(args, model_id, variant.method, **dict(variant.options))
        control_passes.setdefault(spec.scheme, (token, variant, scored))
        allocations = scored.allocations if spec.closed_loop else allocate_stage(spec, scored.profile)
        for allocation in allocations:
            out.append(Candidate(token, "method", token, allocation.budget, allocation, scored))
    for token, variant, scored in control_passes.values():
        suffix = "".join(f"+{m}" for m in token.split("+")[1:] if m != "linear")  # same codes as that pass
        spec = make_spec(args, model_id, variant.method, **dict(variant.options))
        layers = layer_costs_from_profile(scored.profile)
        for name in args.controls:
            make = partial(CONTROLS[name], seed=0) if name == "random" else CONTROLS[name]
            for budget in spec.budgets:
                allocation = make(layers, budget, list(spec.bit_choices), spec.scheme)
                out.append(Candidate(f"{name}{suffix}", "control", name, budget, allocation, scored))
    for pair in args.cross_task:
        source, _, target = pair.partition(":")
        if target != suite:
            continue
        variant = parse_method(args.cross_task_method or args.methods[0])
        spec = make_spec(args, model_id, variant.method, **dict(variant.options))
        mine = scored_pass(args, loaded, model_id, suite, variant, profiles)
        theirs = scored_pass(args, loaded, model_id, source, variant, profiles)
        for allocation in cross_allocation(spec, theirs.profile, mine.profile):
            out.append(
                Candidate(
                    f"{args.cross_task_method or args.methods[0]} (profile from {source})",
                    "cross-task",
                    variant.method,
                    allocation.budget,
                    allocation,
                    mine,
                )
            )
    for peer in args.peers:
        for budget in args.avg_bits:
            config = config_for_budget(budget)
            if config is None:
                continue
            t0 = time.perf_counter()
            if peer == "gptq_matched":
                calibration = read_rows(TASKS / suite / "calibration.jsonl")
                weights = gptq_matched_weights(loaded, model_id, config, calibration, args)
            else:
                weights = peer_weights(loaded, peer, config)
            out.append(
                Candidate(
                    f"{peer} g{config.group_size}",
                    "peer",
                    peer,
                    budget,
                    weights=weights,
                    effective_bits=config.model_effective_bits(loaded),
                    seconds=time.perf_counter() - t0,
                )
            )
    for c in out:
        if c.allocation is not None:
            c.effective_bits = c.allocation.effective_bits
    return out


def teacher_forced(streamed: StreamedModel, rows: list[CalibrationRow], found: list[Candidate]) -> dict:
    """Gold NLL / KL / top-1 of every candidate, in one streamed layer pass: codes of a layer pass,
    or a peer's dequantized weights swapped in as they are."""
    variants, names = [], {}
    seen: dict[tuple, str] = {}
    sources: dict[int, partial] = {}  # one codes source per pass, so a layer's codes are decoded once per width
    for i, c in enumerate(found):
        if c.weights is not None:
            names[i] = f"v{i}"
            variants.append(
                EvalVariant(
                    names[i],
                    {name: PEER_BITS for ref in streamed.layers for name in ref.linears},
                    codes=partial(peer_layer_weights, streamed, c.weights),
                )
            )
            continue
        if c.allocation is None:
            continue
        bits = c.allocation.bit_map.linear_bits(streamed.layers)
        key = (id(c.scored), tuple(sorted(bits.items())))
        if key not in seen:
            seen[key] = f"v{i}"
            source = sources.setdefault(id(c.scored), partial(load_codes, c.scored.store, LAYERS_PREFIX))
            variants.append(EvalVariant(seen[key], bits, codes=source))
        names[i] = seen[key]
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        area = SpillArea(8 * 2**30, Path(tmp))
        try:
            results = teacher_forced_eval(
                streamed, rows, variants, codes=None, max_tokens=256, tracker=StageProgress(stage="evaluate"), area=area
            )
        finally:
            area.close()
    return {"full_precision": results["full_precision"], **{i: results[name] for i, name in names.items()}}


def peer_layer_weights(streamed: StreamedModel, weights: dict[str, torch.Tensor], index: int, bits: int) -> dict:
    """A peer's dequantized weights of layer `index` (one width: every linear at PEER_BITS)."""
    return {name: weights[name] for name in streamed.layers[index].linears}


def measure_suite(args, loaded: LoadedModel, model_id: str, suite: str, profiles: dict) -> list[dict]:
    rows = read_rows(TASKS / suite / "eval.jsonl")[: args.eval_limit]
    found = candidates(args, loaded, model_id, suite, profiles)
    t0 = time.perf_counter()
    with open_streamed(loaded.source, device="cpu", dtype=torch.float32) as streamed:
        teacher = teacher_forced(streamed, rows, found)
        source = source_precision(streamed)
    print(
        f"  {suite}: teacher-forced pass over {len(rows)} items x {len(teacher)} variants in "
        f"{time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    gen = SuiteEval(loaded, rows, args.max_new_tokens)
    fp_gen = gen.generate(None)
    fp_label = "/".join(sorted(source["formats"])) or "source"
    out = [
        summarise(
            suite,
            "full precision",
            "full precision",
            "source",
            None,
            source["bits"] or 16.0,
            teacher["full_precision"],
            fp_gen,
            fp_gen,
            teacher["full_precision"],
            source=fp_label,
        )
    ]
    print_progress(out[-1])
    for i, c in enumerate(found):
        t0 = time.perf_counter()
        weights = c.weights if c.weights is not None else dequantized(loaded, c.scored, c.allocation)
        generated = gen.generate(weights)
        tf = teacher.get(i)
        row = summarise(
            suite,
            c.label,
            c.kind,
            c.method,
            c.budget,
            c.effective_bits,
            tf,
            generated,
            fp_gen,
            teacher["full_precision"],
        )
        row["seconds"] = {"pass": c.scored.seconds if c.scored else c.seconds, "eval": time.perf_counter() - t0}
        row["bits_histogram"] = describe_allocation(c.allocation)["bits_histogram"] if c.allocation else {"4": "all"}
        if c.allocation is not None and c.allocation.closed_loop is not None:
            loop = c.allocation.closed_loop
            row["closed_loop"] = {
                "shipped": loop["shipped"],
                "held_back_nll": {x["name"]: x["measured_gold_nll"] for x in loop["candidates"]},
                "calibration_contains": {x["name"]: x.get("calibration_contains") for x in loop["candidates"]},
                "answers_fewer": [x["name"] for x in loop["candidates"] if x.get("answers_fewer")],
            }
        out.append(row)
        print_progress(row)
    return out


def summarise(
    suite,
    label,
    kind,
    method,
    budget,
    effective_bits,
    tf,
    generated: GenerationEval,
    fp_gen: GenerationEval,
    fp_tf,
    source: str | None = None,
) -> dict:
    nll_items = tf.gold_nll_items if tf is not None else [None] * generated.n
    answered = [v for v in nll_items if v is not None]
    row = {
        "suite": suite,
        "label": label,
        "kind": kind,
        "method": method,
        "budget": budget,
        "effective_bits": effective_bits,
        "source": source,
        "gold_nll": bootstrap_ci(answered).to_dict() if answered else None,
        "delta_nll": (
            paired_difference(fp_tf.gold_nll_items, nll_items).to_dict()
            if tf is not None and kind != "full precision"
            else None
        ),
        "contains": generated.contains_match.to_dict(),
        "exact_match": generated.exact_match.to_dict(),
        "retained": (
            None
            if kind == "full precision"
            else (r.to_dict() if (r := paired_ratio(generated.contains, fp_gen.contains)) else None)
        ),
        "mean_kl": tf.mean_kl if tf is not None else float("nan"),
        "top1": tf.top1_agreement if tf is not None else float("nan"),
        "items": {
            "gold_nll": nll_items,
            "contains": generated.contains,
            "exact_match": generated.em,
            "prediction": generated.predictions,
        },
    }
    return row


def print_progress(row: dict) -> None:
    nll = row["gold_nll"]["mean"] if row["gold_nll"] else float("nan")
    print(
        f"  {row['suite']} · {row['label']} @ {row['budget']}: eff {row['effective_bits']:.3f} "
        f"gold NLL {nll:.3f} contains {row['contains']['mean']:.3f} kl {row['mean_kl']:.4f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2_ID, choices=[SMOLLM2_ID, GEMMA3_ID])
    parser.add_argument("--suites", nargs="+", default=DEFAULT_SUITES)
    parser.add_argument("--avg-bits", type=float, nargs="+", default=[5.0])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bit-choices", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--controls", nargs="*", default=list(CONTROLS), choices=list(CONTROLS))
    parser.add_argument("--peers", nargs="*", default=[], choices=["rtn_matched", "gptq_matched", "hqq"])
    parser.add_argument("--cross-task", nargs="*", default=["arithmetic:capitals"], metavar="SRC:DST")
    parser.add_argument(
        "--cross-task-method",
        default=None,
        help="method token of the cross-task rows (default: the first of --methods)",
    )
    parser.add_argument("--calibration-rows", type=int, default=128)
    parser.add_argument("--calibration-inputs", choices=["fp", "quantized"], default="fp")
    parser.add_argument("--calibration-continuation", choices=["none", "gold", "self"], default="none")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N eval rows (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if "hqq" in args.peers and importlib.util.find_spec("hqq") is None:
        parser.error("the hqq peer needs HQQ: pip install -e '.[bench]' (or leave it out)")
    missing = [s for s in args.suites if not (TASKS / s / "eval.jsonl").exists()]
    if missing:
        parser.error(f"no task suite {missing} under {TASKS}")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.0f}s", flush=True)
    profiles: dict = {}
    rows: list[dict] = []
    for suite in args.suites:
        rows += measure_suite(args, loaded, args.model, suite, profiles)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rows": rows, "comparisons": comparisons(rows)}, indent=1))
    compared = comparisons(rows)
    heading = (
        f"{args.model}, group {args.group_size}, bit choices {args.bit_choices}, budgets {args.avg_bits}, "
        f"{args.calibration_rows} calibration rows, eval: all rows of each suite's eval split"
        f"{'' if args.eval_limit is None else f' (first {args.eval_limit})'}, greedy {args.max_new_tokens} "
        f"new tokens, total {time.perf_counter() - t0:.0f}s"
    )
    text = f"{heading}\n\n{verdict_summary(compared)}\n\n{comparison_table(compared)}\n\n{variant_table(rows)}\n"
    print(f"\n{text}")
    if args.json:
        args.json.write_text(json.dumps({"heading": heading, "rows": rows, "comparisons": compared}, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.plot:
        plot(rows, args.plot, f"{args.model} · group {args.group_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
