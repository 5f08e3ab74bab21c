"""Task score retained by each method at equal bit budgets, on a packaged model (CPU), in one run.

    python bench/bench_quality.py --suites capitals arithmetic python_eval \
        --avg-bits 4.25 4.5 5.0 6.0 --group-size 128 --methods uniform taq taq_kl taqo taq+gptq+clip \
        --peers rtn_matched gptq_matched hqq --cross-task capitals:arithmetic \
        --json bench/out/quality.json --markdown bench/out/quality.md --plot bench/out/quality.png

For every suite: the full-precision model is evaluated once on the suite's eval split; every
method runs the service's own pipeline (core.pipeline.run_job: the layer pass scores the suite's
calibration split and stores every layer's codes at every width, as a budget-sweep job does) once
per scoring setting; each budget and allocation unit is then allocated from that profile and its
codes read from the pass's checkpoints; the dequantized weights go into a working copy of the
model, which is greedy-evaluated (contains / F1 with 95 % bootstrap CIs) and compared with the
full-precision model's next-token distribution (mean KL, top-1 agreement). Modifiers after a method set spec fields: `+gptq` quantizes with the
error-compensating quantizer instead of round-to-nearest, `+clip` turns on clip search, `+linear`
allocates per linear (`allocation_unit: linear`), e.g. `taq+gptq+linear`. Peers (bench/peers.py)
spend each budget uniformly with 4-bit codes and the group size that reaches it (`rtn_matched`:
our round-to-nearest, `gptq_matched`: our GPTQ on the suite's calibration rows, `hqq`: HQQ from
PyPI).
`--cross-task SRC:DST` quantizes with the profile scored on SRC and evaluates on DST.
Identical weights (e.g. an allocation that came out all-4-bit, like `uniform`) are evaluated once.

Caveat: the packaged SmolLM2 weights are Q4_1 (asymmetric blocks of 32), so 4-bit asymmetric
groups of 32 (the 5.0-bit peers) reproduce them almost exactly and are flattered.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peers import UniformConfig, config_for_budget, peer_weights  # noqa: E402
from core.data import tokenize_rows  # noqa: E402
from core.evaluation import evaluate_generation, fidelity  # noqa: E402
from core.models import LoadedModel, load_model, resolve_model  # noqa: E402
from core.packaged_models import GEMMA3_ID, SMOLLM2_ID, assemble_gemma3, packaged_models  # noqa: E402
from core.job_stages import CheckpointWeights  # noqa: E402
from core.pipeline import LAYERS_PREFIX, JobInputs, allocate_stage, linear_bits, run_job  # noqa: E402
from core.quant.primitives import dequantize_weight  # noqa: E402
from core.spec import CalibrationRow, JobSpec  # noqa: E402
from core.streaming.checkpoints import MemoryStore  # noqa: E402
from core.types import BitAllocation, Profile  # noqa: E402

TASKS = ROOT / "bench" / "tasks"
#: the default sweep (`make bench-quality`): the RTN `uniform` baseline, then every method with
#: the service's strongest quantizer settings (GPTQ with clip search)
DEFAULT_METHODS = ["uniform", "uniform+gptq+clip", "taq+gptq+clip", "taq_kl+gptq+clip", "taqo+gptq+clip"]
MODELS_DIR = ROOT / "bench" / "out" / "models"


def read_rows(path: Path) -> list[CalibrationRow]:
    return [CalibrationRow.model_validate_json(line)
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
        messages = ([m.model_dump() for m in row.messages] if row.messages is not None
                    else [{"role": "user", "content": row.prompt}])
        out.append(CalibrationRow(messages=messages + [{"role": "assistant", "content": answer.strip()}],
                                  answers=row.answers))
    return out


@dataclass
class SuiteEval:
    """Evaluates weight sets on one suite with a single working copy of the model."""

    loaded: LoadedModel
    suite: str
    eval_limit: int
    fidelity_prompts: int
    work: torch.nn.Module = field(init=False)
    cache: dict[str, dict] = field(default_factory=dict)

    continuation: str = "none"

    def __post_init__(self) -> None:
        tok = self.loaded.tokenizer
        rows = read_rows(TASKS / self.suite / "eval.jsonl")[: self.eval_limit]
        self.calibration = with_continuation(self.loaded, read_rows(TASKS / self.suite / "calibration.jsonl"),
                                             self.continuation)
        # token ids (chat template applied when the tokenizer has one; plain prompts get the
        # tokenizer's BOS, which Gemma 3 needs and whose GGUF carries no chat template)
        self.prompts = tokenize_rows(rows, tok, 256)
        self.golds = [r.answers or [] for r in rows]
        self.fid_ids = tokenize_rows(rows[: self.fidelity_prompts], tok, 128)
        self.work = copy.deepcopy(self.loaded.model)
        self.n = len(rows)

    def _install(self, weights: dict[str, torch.Tensor]) -> None:
        modules = dict(self.work.named_modules())
        originals = dict(self.loaded.model.named_modules())
        with torch.no_grad():
            for ref in self.loaded.layers:
                for name in ref.linears:
                    source = weights.get(name, originals[name].weight)
                    modules[name].weight.copy_(source.to(modules[name].weight.dtype))

    def measure(self, weights: dict[str, torch.Tensor]) -> dict:
        key = weights_key(weights)
        if key in self.cache:
            return {**self.cache[key], "eval_s": 0.0, "reused": True}
        t0 = time.perf_counter()
        self._install(weights)
        ev = evaluate_generation(self.work, self.loaded.tokenizer, self.prompts, self.golds)
        fid = fidelity(self.loaded.model, self.work, self.fid_ids)
        result = {"contains": ev.contains_match.to_dict(), "f1": ev.f1_score.to_dict(),
                  "mean_kl": fid.mean_kl, "top1": fid.top1_agreement}
        self.cache[key] = result
        return {**result, "eval_s": time.perf_counter() - t0, "reused": False}

    def full_precision(self) -> dict:
        t0 = time.perf_counter()
        ev = evaluate_generation(self.loaded.model, self.loaded.tokenizer, self.prompts, self.golds)
        return {"contains": ev.contains_match.to_dict(), "f1": ev.f1_score.to_dict(),
                "mean_kl": 0.0, "top1": 1.0, "eval_s": time.perf_counter() - t0, "reused": False}


#: method-token modifiers and the JobSpec fields they set
MODIFIERS = {"gptq": {"quantizer": "gptq"}, "clip": {"clip_search": True},
             "linear": {"allocation_unit": "linear"}}


@dataclass(frozen=True)
class Variant:
    """A method token such as `taq+gptq+linear`: the method and the spec fields its modifiers set."""

    method: str
    options: tuple[tuple[str, object], ...]

    @property
    def scoring_options(self) -> dict:
        """The fields that change the profile's quant_error: the quantizer and clip search."""
        return {k: v for k, v in self.options if k in ("clip_search", "quantizer")}


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
    return JobSpec(model=model_id, method=method, calibration_dataset_id="bench",
                   bit_budget={"avg_bits": list(args.avg_bits) if len(args.avg_bits) > 1 else args.avg_bits[0]},
                   bit_choices=args.bit_choices, group_size=args.group_size,
                   max_calibration_rows=args.calibration_rows, max_tokens=128, seed=0, exports=[],
                   calibration_inputs=args.calibration_inputs, **options)


@dataclass
class Scored:
    """One layer pass: the profile, and the store holding every layer's codes at every width."""

    profile: Profile
    store: MemoryStore
    seconds: float


def run_pass(loaded: LoadedModel, spec: JobSpec, calibration: list[CalibrationRow]) -> Scored:
    """The service's pipeline on `calibration` (no exports, no evaluation)."""
    t0 = time.perf_counter()
    store = MemoryStore()
    outputs = run_job(JobInputs(spec=spec, source=loaded.source, rows=calibration), store)
    return Scored(outputs.profile.with_bits({}), store, time.perf_counter() - t0)


def dequantized(loaded: LoadedModel, scored: Scored, allocation: BitAllocation) -> dict[str, torch.Tensor]:
    """The dequantized weight of every linear below 16 bits under `allocation`, from the pass's
    checkpoints."""
    codes = CheckpointWeights(scored.store, LAYERS_PREFIX, loaded.layers, linear_bits(loaded.layers, allocation))
    return {name: dequantize_weight(codes[name], dtype=torch.float32) for name in codes}


def pipeline_rows(args, ctx: SuiteEval, model_id: str, label: str, variant: Variant, scored: Scored) -> list[dict]:
    spec = make_spec(args, model_id, variant.method, **dict(variant.options))
    rows = []
    for allocation in allocate_stage(spec, scored.profile):
        measured = ctx.measure(dequantized(ctx.loaded, scored, allocation))
        rows.append({"suite": ctx.suite, "method": label, "avg_bits": allocation.budget,
                     "effective_bits": allocation.effective_bits,
                     "bits": dict(allocation.bits), "score_s": scored.seconds, "quantize_s": 0.0, **measured})
        print_progress(rows[-1])
    return rows


def gptq_matched_weights(loaded: LoadedModel, model_id: str, config: UniformConfig,
                         calibration: list[CalibrationRow], args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Our GPTQ, every layer at 4 bits with the group size that spends the budget (calibrated on
    the suite's calibration rows: the error-compensating counterpart of `rtn_matched`)."""
    spec = JobSpec(model=model_id, method="uniform", quantizer="gptq", calibration_dataset_id="bench",
                   bit_budget={"avg_bits": config.effective_bits}, bit_choices=[config.bits],
                   group_size=config.group_size, max_calibration_rows=args.calibration_rows,
                   max_tokens=128, seed=0, exports=[], calibration_inputs=args.calibration_inputs)
    scored = run_pass(loaded, spec, calibration)
    return dequantized(loaded, scored, allocate_stage(spec, scored.profile)[0])


def print_progress(row: dict) -> None:
    print(f"  {row['suite']} · {row['method']} @ {row['avg_bits']}: contains "
          f"{row['contains']['mean']:.3f} eff {row['effective_bits']:.3f} kl {row['mean_kl']:.3f}"
          f"{' (same weights as an earlier row)' if row['reused'] else ''}", flush=True)


def scored(args, loaded: LoadedModel, model_id: str, suite: str, variant: Variant,
           calibration: list[CalibrationRow], profiles: dict) -> Scored:
    """The suite's layer pass for the variant's method, run once and reused by every variant and
    budget that shares it (the allocation unit does not change the pass; the quantizer and clip
    search change its codes and errors)."""
    key = (suite, variant.method, tuple(sorted(variant.scoring_options.items())))
    if key not in profiles:
        spec = make_spec(args, model_id, variant.method, **variant.scoring_options)
        profiles[key] = run_pass(loaded, spec, calibration)
    return profiles[key]


def run_suite(args, loaded: LoadedModel, model_id: str, suite: str,
              profiles: dict) -> list[dict]:
    ctx = SuiteEval(loaded, suite, args.eval_limit, args.fidelity_prompts, continuation=args.calibration_continuation)
    fp = ctx.full_precision()
    rows = [{"suite": suite, "method": "full precision", "avg_bits": None, "effective_bits": 16.0,
             "bits": {}, "score_s": 0.0, "quantize_s": 0.0, **fp}]
    print_progress(rows[0])
    for token in args.methods:
        variant = parse_method(token)
        rows += pipeline_rows(args, ctx, model_id, token, variant,
                              scored(args, loaded, model_id, suite, variant, ctx.calibration, profiles))
    for peer in args.peers:
        for budget in args.avg_bits:
            config = config_for_budget(budget)
            if config is None:
                continue
            t0 = time.perf_counter()
            if peer == "gptq_matched":
                weights = gptq_matched_weights(loaded, model_id, config, ctx.calibration, args)
            else:
                weights = peer_weights(loaded, peer, config)
            quantize_s = time.perf_counter() - t0
            rows.append({"suite": suite, "method": f"{peer} g{config.group_size}", "avg_bits": budget,
                         "effective_bits": config.effective_bits, "bits": {}, "score_s": 0.0,
                         "quantize_s": quantize_s, **ctx.measure(weights)})
            print_progress(rows[-1])
    for pair in args.cross_task:
        source, _, target = pair.partition(":")
        if target != suite:
            continue
        for token in args.cross_task_methods:
            variant = parse_method(token)
            source_rows = read_rows(TASKS / source / "calibration.jsonl")
            rows += pipeline_rows(args, ctx, model_id, f"{token} (profile from {source})", variant,
                                  scored(args, loaded, model_id, source, variant, source_rows, profiles))
    for row in rows:
        row["retained"] = row["contains"]["mean"] / fp["contains"]["mean"] if fp["contains"]["mean"] else None
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| suite | method | budget | effective bits | contains [95% CI] | retained vs FP | F1 | "
             "KL to FP | top-1 agree | score s | quantize s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["contains"]
        retained = f"{r['retained']:.2f}" if r["retained"] is not None else "—"
        lines.append(
            f"| {r['suite']} | {r['method']} | {r['avg_bits'] or '—'} | {r['effective_bits']:.3f} | "
            f"{c['mean']:.3f} [{c['low']:.3f}, {c['high']:.3f}] | {retained} | {r['f1']['mean']:.3f} | "
            f"{r['mean_kl']:.3f} | {r['top1']:.3f} | {r['score_s']:.0f} | {r['quantize_s']:.1f} | "
            f"{'=' if r['reused'] else format(r['eval_s'], '.0f')} |")
    return "\n".join(lines)


def series_name(method: str) -> str:
    """Peers are labelled with their group size per row ("hqq g64"); one plot series per peer."""
    head, _, tail = method.rpartition(" g")
    return head if head and tail.isdigit() else method


def plot(rows: list[dict], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    suites = list(dict.fromkeys(r["suite"] for r in rows))
    fig = Figure(figsize=(6.0 * len(suites), 6.5), dpi=100)
    FigureCanvasAgg(fig)
    markers = "os^vDP*Xh<>"
    for i, suite in enumerate(suites):
        ax = fig.add_subplot(1, len(suites), i + 1)
        ax.axhline(1.0, color="black", lw=0.8, ls=":", label="full precision")
        names = [m for m in dict.fromkeys(series_name(r["method"]) for r in rows if r["suite"] == suite)
                 if m != "full precision"]
        for k, name in enumerate(names):
            pts = sorted({(r["effective_bits"], r["retained"]) for r in rows
                          if r["suite"] == suite and series_name(r["method"]) == name and r["retained"] is not None})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)],
                    ls="--" if "gptq" not in name else "-", label=name)
        ax.set_title(suite)
        ax.set_xlabel("effective bits (codes + fp16 scale/zero per group)")
        ax.set_ylabel("task score retained vs full precision (contains)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=SMOLLM2_ID, choices=[SMOLLM2_ID, GEMMA3_ID])
    parser.add_argument("--suites", nargs="+", default=["capitals"])
    parser.add_argument("--avg-bits", type=float, nargs="+", default=[4.25, 4.5, 5.0, 6.0])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--bit-choices", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--methods", nargs="*", default=DEFAULT_METHODS)
    parser.add_argument("--peers", nargs="*", default=["hqq"])
    parser.add_argument("--cross-task", nargs="*", default=["arithmetic:capitals"], metavar="SRC:DST")
    parser.add_argument("--cross-task-methods", nargs="+", default=["taq_kl+gptq+clip"])
    parser.add_argument("--calibration-rows", type=int, default=128)
    parser.add_argument("--calibration-inputs", choices=["fp", "quantized"], default="fp",
                        help="calibrate each layer on full-precision activations or on the outputs of the "
                             "already-quantized layers before it (sequential)")
    parser.add_argument("--calibration-continuation", choices=["none", "gold", "self"], default="none",
                        help="append an assistant turn to every calibration row: the gold answer or "
                             "the full-precision model's own greedy answer")
    parser.add_argument("--eval-limit", type=int, default=150)
    parser.add_argument("--fidelity-prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    if "hqq" in (args.peers or []) and importlib.util.find_spec("hqq") is None:
        # fail before an hour of work, not at the first peer row
        parser.error("the hqq peer needs HQQ: pip install -e '.[bench]' (or leave it out: --peers rtn_matched)")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.0f}s", flush=True)
    profiles: dict = {}
    rows: list[dict] = []
    for suite in args.suites:
        rows += run_suite(args, loaded, args.model, suite, profiles)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2))
    heading = (f"{args.model}, group {args.group_size}, bit choices {args.bit_choices}, "
               f"{args.calibration_rows} calibration rows (continuation: {args.calibration_continuation}, "
               f"calibration inputs: {args.calibration_inputs}), "
               f"eval n ≤ {args.eval_limit}, "
               f"total {time.perf_counter() - t0:.0f}s")
    table = markdown(rows)
    print(f"\n{heading}\n\n{table}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"{heading}\n\n{table}\n")
    if args.plot:
        plot(rows, args.plot, f"{args.model} · group {args.group_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
