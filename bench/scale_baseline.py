"""The time a quantization job cannot beat: one streamed forward pass over the calibration rows
plus the quantizer over every layer at one width (bench_scale.py compares each job with it).

    python bench/scale_baseline.py --model-root bench/out/scale --model llama-1b-shape --rows 8 \
        --max-tokens 128 --quantizer gptq

Each decoder layer is onloaded once (the same lazy reader and skeleton as the service), the
calibration batches run through it while its linears' inputs are recorded, and its linears are
quantized at 4 bits (GPTQ: one inverse-Hessian factor per shared input, one sweep; RTN: round to
nearest). Nothing is measured, checkpointed or exported. Prints one JSON line: seconds for
the whole run, the forward passes, the quantizer and the rest (reading and converting weights).

`--allocator worker` (the default) sets glibc's allocator as the worker process does
(`worker.resources.tune_allocator`: mmap and trim thresholds of 128 KiB, so freed temporaries go
back to the kernel and new ones are mapped fresh), so the baseline runs in the job's environment;
`default` leaves glibc's own dynamic thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CALIBRATION = ROOT / "bench" / "tasks" / "capitals" / "calibration.jsonl"


def baseline(
    model_root: Path, model_id: str, rows: int, max_tokens: int, quantizer: str, bits: int = 4, group_size: int = 128
) -> dict:
    import torch

    from core.calibration import default_batch_tokens, make_batches, pad_token_id
    from core.data import tokenize_rows
    from core.models import resolve_model
    from core.quant.gptq import gptq_quantize_weights, inverse_hessian_factor
    from core.quant.layer import FLOAT64_FACTOR_MAX_FEATURES, LayerInputs
    from core.quant.primitives import quantize_weight
    from core.spec import CalibrationRow
    from core.streaming.capture import capture_inputs, run_layer
    from core.streaming.model import open_streamed

    t0 = time.perf_counter()
    model = open_streamed(resolve_model(model_id, [model_root], {}))
    calibration = [
        CalibrationRow.model_validate_json(line) for line in CALIBRATION.read_text().splitlines() if line.strip()
    ][:rows]
    batches = make_batches(
        tokenize_rows(calibration, model.tokenizer, max_tokens),
        pad_token_id(model.tokenizer),
        model.device,
        max_batch_tokens=default_batch_tokens(model.device),
    )
    n_tokens = sum(b.n_tokens for b in batches)
    opened = time.perf_counter()
    captured = capture_inputs(model, batches)
    hidden = list(captured.hidden)
    forward_s = quantize_s = 0.0
    for index, ref in enumerate(model.layers):
        with model.onloaded(ref.name) as layer:
            inputs = LayerInputs(ref.linears, n_tokens) if quantizer == "gptq" else None
            t = time.perf_counter()
            with inputs.recording() if inputs is not None else nullcontext():
                for b, batch in enumerate(batches):
                    if inputs is not None:
                        inputs.set_batch(batch.valid)
                    hidden[b] = run_layer(layer, hidden[b], captured.calls[b][index])
            forward_s += time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                if inputs is not None:
                    for lead, names in inputs.groups().items():
                        width = ref.linears[lead].in_features
                        dtype = torch.float64 if width <= FLOAT64_FACTOR_MAX_FEATURES else torch.float32
                        # in place from a fresh H, as the job's layer pass does (core.quant.layer)
                        upper = inverse_hessian_factor(lambda _lead=lead: inputs.hessian(_lead), dtype=dtype)  # noqa: B023
                        gptq_quantize_weights(
                            {n: ref.linears[n].weight.detach() for n in names},
                            None,
                            bits,
                            group_size,
                            False,
                            upper=upper,
                        )
                    inputs.clear()
                else:
                    for linear in ref.linears.values():
                        quantize_weight(linear.weight.detach().float(), bits, group_size, False)
            quantize_s += time.perf_counter() - t
    total = time.perf_counter() - t0
    model.close()
    return {
        "model": model_id,
        "rows": rows,
        "max_tokens": max_tokens,
        "quantizer": quantizer,
        "bits": bits,
        "tokens": n_tokens,
        "total_s": round(total, 2),
        "open_s": round(opened - t0, 2),
        "forward_s": round(forward_s, 2),
        "quantize_s": round(quantize_s, 2),
        "read_and_rest_s": round(total - (opened - t0) - forward_s - quantize_s, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-root", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--quantizer", choices=["rtn", "gptq"], default="gptq")
    parser.add_argument("--allocator", choices=["worker", "default"], default="worker")
    args = parser.parse_args(argv)
    tuned = False
    if args.allocator == "worker":
        from worker.resources import tune_allocator

        tuned = tune_allocator()
    result = baseline(args.model_root, args.model, args.rows, args.max_tokens, args.quantizer)
    print(json.dumps({**result, "allocator": args.allocator, "allocator_tuned": tuned}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
