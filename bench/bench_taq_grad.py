"""taq_grad on a real model: does its prediction rank the measured loss increase, and what does it cost?

    python bench/bench_taq_grad.py --suite capitals --json bench/out/taq_grad.json

One run, SmolLM2-135M (CPU), the suite's calibration split, RTN at the job defaults (group 128,
asymmetric, widths 4 and 8):
* the layer pass with the taq_grad scorer (the service's own `run_layer_pass` + `finish`), timed:
  the pass (forward + quantization of every width) and `finish` (the head gradient and the
  backward sweep) separately;
* one plain streamed forward over the same batches (every layer onloaded once, nothing else), the
  unit of "forward-pass equivalents": cost = finish / forward;
* the measured task-loss increase of the model with ONE layer quantized at each width (the stored
  codes swapped into the materialised model, teacher-forced loss of the same sequences), for every
  layer × width, against the prediction: Spearman's rank correlation over all of them and over the
  layers at the lowest width, and the ratio measured / predicted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_quality import TASKS, read_rows  # noqa: E402
from core.calibration import StageProgress, make_batches, pad_token_id  # noqa: E402
from core.models import resolve_model  # noqa: E402
from core.packaged_models import SMOLLM2_ID, packaged_models  # noqa: E402
from core.quant.primitives import dequantize_weight  # noqa: E402
from core.scorers.common import SequencePlan, build_profile, select_rows  # noqa: E402
from core.scorers.taq_grad import TaqGradScorer  # noqa: E402
from core.spec import JobSpec  # noqa: E402
from core.stats import spearman  # noqa: E402
from core.streaming.capture import capture_inputs, run_layer  # noqa: E402
from core.streaming.checkpoints import MemoryStore, load_codes  # noqa: E402
from core.streaming.hidden import SpillArea  # noqa: E402
from core.streaming.layer_pass import PassSettings, run_layer_pass  # noqa: E402
from core.streaming.model import StreamedModel, open_streamed  # noqa: E402


def plain_forward(model: StreamedModel, batches: list) -> float:
    """Seconds of one streamed forward: capture the layer-0 inputs, then every layer once."""
    t0 = time.perf_counter()
    captured = capture_inputs(model, batches)
    hidden = list(captured.hidden)
    for index, ref in enumerate(model.layers):
        with model.onloaded(ref.name) as layer:
            hidden = [run_layer(layer, h, captured.calls[b][index]) for b, h in enumerate(hidden)]
    return time.perf_counter() - t0


def task_loss(module: torch.nn.Module, plan: SequencePlan, batches: list) -> float:
    """Mean over sequences of each sequence's mean answer NLL (the scorer's L), batched."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
            logprob = torch.log_softmax(logits, dim=-1)
            for r, s in enumerate(batch.rows):
                start, tokens = plan.starts[s], plan.sequences[s]
                assert start is not None
                gold = torch.tensor(tokens[start:])
                picked = logprob[r, start - 1 : len(tokens) - 1].gather(1, gold[:, None])[:, 0]
                total += float(-picked.double().mean())
                count += 1
    return total / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="capitals")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-measure", action="store_true", help="time the scorer only, no measured loss increases")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = read_rows(TASKS / args.suite / "calibration.jsonl")
    spec = JobSpec(
        model=SMOLLM2_ID,
        method="taq_grad",
        calibration_dataset_id="bench",
        max_calibration_rows=args.rows,
        bit_budget={"avg_bits": 5.0},
        bit_choices=[4, 8, 16],
        max_tokens=128,
        seed=0,
        exports=[],
    )
    model = open_streamed(resolve_model(SMOLLM2_ID, [], packaged_models()), device="cpu", dtype=torch.float32)
    scorer = TaqGradScorer(spec)
    chosen = select_rows(rows, spec)
    plan = scorer.plan(model.tokenizer, chosen, spec)
    batches = make_batches(plan.sequences, pad_token_id(model.tokenizer), model.device, max_batch_tokens=2048)
    settings = PassSettings(
        widths=(4, 8),
        scheme=spec.scheme,
        gptq=False,
        clip_search=False,
        sequential=False,
        reference_bits=None,
        pass_key="bench",
    )
    forward_s = plain_forward(model, batches)
    store = MemoryStore()
    with SpillArea(4 << 30) as area:
        t0 = time.perf_counter()
        result = run_layer_pass(model, batches, scorer, settings, store, StageProgress(), area)
        pass_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = scorer.finish(model, result)
        finish_s = time.perf_counter() - t0
        profile = build_profile(spec, "taq_grad", scores, result.records)
    cost = {"plain_forward": forward_s, "layer_pass": pass_s, "finish": finish_s}
    if args.no_measure:
        print(json.dumps({"seconds": cost, "finish_forward_equivalents": finish_s / forward_s}, indent=1))
        return 0
    module = model.materialize()
    base = task_loss(module, plan, batches)
    predicted, measured, low_pred, low_meas = [], [], [], []
    for layer in profile.layers:
        ref = model.layers[layer.index]
        for bits in (4, 8):
            saved = {n: lin.weight.detach().clone() for n, lin in ref.linears.items()}
            with torch.no_grad():
                for n, q in load_codes(store, "layers", layer.index, bits).items():
                    ref.linears[n].weight.copy_(dequantize_weight(q))
            increase = task_loss(module, plan, batches) - base
            with torch.no_grad():
                for n, w in saved.items():
                    ref.linears[n].weight.copy_(w)
            predicted.append(layer.predicted_loss[bits])
            measured.append(increase)
            if bits == 4:
                low_pred.append(layer.predicted_loss[bits])
                low_meas.append(increase)
    model.release()
    ratio = sum(low_meas) / sum(low_pred) if sum(low_pred) > 0 else float("nan")
    report = {
        "suite": args.suite,
        "rows": len(chosen),
        "sequences": len(plan.sequences),
        "fp_loss": base,
        "seconds": cost,
        "finish_forward_equivalents": finish_s / forward_s,
        "spearman_all": spearman(predicted, measured),
        "spearman_4bit_layers": spearman(low_pred, low_meas),
        "measured_over_predicted_4bit": ratio,
        "layers": [
            {"layer": l.index, "predicted_4": l.predicted_loss[4], "measured_4": m}
            for l, m in zip(profile.layers, low_meas, strict=True)
        ],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "layers"}, indent=1))
    for row in report["layers"]:
        print(f"  layer {row['layer']:2d}  predicted {row['predicted_4']:.5f}  measured {row['measured_4']:+.5f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
