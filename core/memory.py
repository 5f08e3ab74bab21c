"""Memory preflight: how much RAM (or VRAM) a job needs, estimated from the model's shapes alone.

Nothing is loaded: the shapes come from `config.json` (a model directory) or from the GGUF header
(a `.gguf` file; parameters are then counted exactly from the tensor shapes): core/model_dims.py. The estimate follows
the streaming pipeline (core/pipeline.py), which never holds the model: its peak is the runtime
plus the largest of its phases.

* **layer pass** (score, quantize) — one decoder layer's weights at the worker's compute dtype
  (float32 on CPU, 2 bytes on CUDA, plus a float32 working copy there); what its linears' inputs
  leave behind (`core.quant.layer.LayerInputs`: per distinct input min(tokens, in)·in float32: the
  raw rows when there are fewer tokens than features, else XᵀX); the layer's codes at every stored
  width until they are checkpointed; the error measurement's temporaries (RTN: a dequantized
  weight and its difference) or, when larger, GPTQ's working memory, within which its errors are
  measured (from the sweep's working copy, two [tokens, out] outputs at a time): for its worst group of linears
  sharing an input (`ModelDims.gptq_groups`) the inverse-Hessian factor, one [in, in] matrix
  factored in place (float64 up to 8192 inputs, with a float32 one beside it; float32 above),
  and the sweep's float32 working copy and uint8 codes (a group's widths are swept
  together only where that does not raise this peak); the carried hidden
  states (input and output of every stream, capped by `activation_ram_bytes`, beyond which they
  are spilled to disk) and one batch's activations inside the layer.
* **head** (taq_kl, taqo, taq_grad, evaluation) — the final hidden states of every scored stream at
  the scored positions and one vocabulary chunk of logits per query (`core.streaming.head`).
* **gradient sweep** (taq_grad) — the layers again from last to first: one layer's weights, its
  codes at every width, the kept layer inputs and the gradient stream (within
  `activation_ram_bytes`), one batch's forward activations kept for autograd and their gradients,
  every linear's input and output gradient of that batch, and one ΔW with its X·ΔWᵀ.
* **export** — the largest single tensor (usually the embedding or LM head) as read and as written.
* **closed loop** (`closed_loop: true`) — the evaluation's teacher-forced pass over the held-back
  quarter of the calibration rows, carrying full precision and up to seven candidates (its
  generation check is greedy generation, below).
* **generation** — greedy generation materialises the whole model once (weights at the compute
  dtype, the KV cache of a batch, last-position logits); it runs only when that fits the worker's
  limit, so it is reported separately (`generation_bytes`) and counted only when the caller says
  it will run.

Token counts are upper bounds (`rows × max_tokens`; real prompts are usually shorter), so the
estimate errs on the large side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.model_dims import ModelDims

__all__ = ["MemoryEstimate", "RUNTIME_BYTES", "estimate_job_memory", "gptq_group_bytes"]

GiB = 1 << 30
#: a worker process (interpreter, torch, transformers, Celery, SQLAlchemy, the tokenizer,
#: allocator slack) before any tensor of the job exists; calibrated against the measured peak of
#: a tiny-model job (BENCHMARKS.md, "Memory preflight")
RUNTIME_BYTES = 600 * (1 << 20)
#: padded tokens per batch the passes use (core.calibration.default_batch_tokens)
CPU_BATCH_TOKENS = 2048
CUDA_BATCH_TOKENS = 16384
#: logits held per query and vocabulary chunk, and head bytes read per chunk (core.streaming.head)
HEAD_CHUNK_ELEMENTS = 4 * 1024 * 1024
HEAD_WEIGHT_CHUNK_BYTES = 32 * 1024 * 1024
#: greedy generation (core.streaming.generate): prompts per batch, new tokens, and a fixed allowance
#: for generate()'s own bookkeeping on top of the weights, KV cache and last-position logits
GENERATION_BATCH = 16
GENERATION_NEW_TOKENS = 32
GENERATION_SLACK_BYTES = 64 * (1 << 20)
#: per vocabulary entry: a tokenizer built from a GGUF's metadata (held by the worker all along),
#: and the tokenizer metadata an export copies (a GGUF source's, read back with gguf's reader, or
#: written from the tokenizer)
GGUF_TOKENIZER_BYTES_PER_TOKEN = 2048
EXPORT_METADATA_BYTES_PER_TOKEN = {True: 4096, False: 1024}
#: GPTQ factors H in float64 up to this many inputs (core.quant.layer uses this constant)
FLOAT64_FACTOR_MAX_FEATURES = 8192
#: gold answers are scored on at most this many tokens
ANSWER_TOKENS = 32
#: methods whose sequences are a prompt and an answer (ANSWER_TOKENS more per row)
ANSWER_METHODS = ("taqo", "taq_grad")
#: methods whose scoring generates greedily with the whole model (one generation per layer)
GENERATING_METHODS = ("taqo_gen",)
#: methods that carry one more hidden stream per layer by the last layer: the probe streams of
#: taq_kl and taqo, the kept layer inputs of taq_grad (core/disk.py bounds their spill with these)
PER_LAYER_STREAM_METHODS = ("taq_kl", "taqo", "taq_grad")


def calibration_tokens(method: str, rows: int, max_tokens: int) -> int:
    """Tokens the layer pass runs (an upper bound): `max_tokens` per row, plus the answer for the
    methods that score prompt + answer."""
    return max(0, rows) * (max_tokens + (ANSWER_TOKENS if method in ANSWER_METHODS else 0))


def hidden_streams(method: str, num_layers: int, *, sequential: bool) -> int:
    """Hidden streams the layer pass carries at its last layer: the calibration stream, the
    sequentially quantized one (``calibration_inputs: quantized``), one per layer for the methods
    of PER_LAYER_STREAM_METHODS. Each holds a layer's input and output at once."""
    return 1 + int(sequential) + (num_layers if method in PER_LAYER_STREAM_METHODS else 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job needs at its peak: `runtime_bytes` plus the largest phase (`phase`);
    `breakdown` lists the peak phase's terms and adds up to `total_bytes`. `phases` has every
    phase's total; `generation_bytes` is what greedy generation would add to the runtime if it ran."""

    total_bytes: int
    phase: str
    terms: dict[str, int]
    phases: dict[str, int]
    runtime_bytes: int
    generation_bytes: int
    parameters: int
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def breakdown(self) -> dict[str, int]:
        return {**self.terms, "runtime": self.runtime_bytes}

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["breakdown"] = self.breakdown
        return out


def generation_bytes(dims: ModelDims, *, max_tokens: int, weight_bytes: int, parameters: int | None = None) -> int:
    """Greedy generation: the whole model at `weight_bytes`, the KV cache of a batch of prompts
    of `max_tokens` plus the new tokens, one layer's activations and last-position logits."""
    tokens = GENERATION_BATCH * (max_tokens + GENERATION_NEW_TOKENS)
    kv = 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * tokens * weight_bytes
    activations = tokens * (4 * dims.hidden_size + 3 * dims.intermediate_size) * 4
    logits = 2 * GENERATION_BATCH * dims.vocab_size * 4
    params = dims.parameters if parameters is None else parameters
    return params * weight_bytes + kv + activations + logits + GENERATION_SLACK_BYTES


def _factor_bytes(features: int) -> int:
    return 8 if features <= FLOAT64_FACTOR_MAX_FEATURES else 4


def gptq_group_bytes(in_features: int, out_features: int, widths: int = 1) -> int:
    """GPTQ's working memory for one group of linears sharing an input (`out_features` rows in
    all): the in-place [in, in] factor (a float32 matrix more for a float64 one) and a sweep of
    `widths` widths at once (core.quant.gptq.gptq_quantize_widths): per width a float32 working
    copy and uint8 codes (as swept, transposed, split: 4 + 3 bytes per weight); the block update
    accumulates into the working copy in place (no product temporary)."""
    n = in_features
    factor = n * n * (_factor_bytes(n) + (4 if _factor_bytes(n) == 8 else 0))
    return factor + n * out_features * max(1, widths) * (4 + 3)


def _gptq_bytes(dims: ModelDims) -> int:
    """GPTQ's peak over a layer's groups (one at a time): each group swept one width at a time.
    core.quant.layer sweeps a group's widths together only where that stays within this peak."""
    return max(gptq_group_bytes(n, out) for n, out in dims.gptq_groups)


def estimate_job_memory(
    dims: ModelDims,
    *,
    method: str,
    calibration_rows: int,
    max_tokens: int,
    evaluates: bool = False,
    weight_bytes: int = 4,
    batch_tokens: int = CPU_BATCH_TOKENS,
    quantizer: str = "rtn",
    widths: int = 2,
    sequential: bool = False,
    eval_rows: int = 0,
    budgets: int = 1,
    activation_ram_bytes: int = GiB,
    generation: bool = False,
    group_size: int = 128,
    source_bytes: int = 4,
    gguf_source: bool = False,
    closed_loop: bool = False,
) -> MemoryEstimate:
    """Peak bytes of one job (see the module docstring for every term).

    `calibration_rows` is the number of rows the pass will use (0: no calibration activations);
    `weight_bytes` 4 for a CPU worker (float32), 2 for a CUDA one (bf16); `widths` the stored bit
    widths below 16; `eval_rows` and `budgets` size the evaluation's streams; `generation` says
    whether greedy generation will run (the model fits the worker; a method in GENERATING_METHODS
    always generates, so the caller passes True for it); `source_bytes` the width the
    checkpoint stores its floats in (2 for bf16/fp16 safetensors, 4 otherwise); `gguf_source` whether
    the model is a GGUF file (its tokenizer is built from the file's metadata, and exports copy that
    metadata); `closed_loop` whether the allocate stage measures its candidates on held-back rows
    (and, when generation runs, lets them answer the calibration prompts)."""
    if weight_bytes not in (2, 4):
        raise ValueError("weight_bytes must be 2 or 4")
    f32 = 4
    h, inter, L = dims.hidden_size, dims.intermediate_size, dims.num_layers
    rows = max(0, int(calibration_rows))
    # taqo and taq_grad score prompt + answer: their sequences are longer by the answer
    tokens = calibration_tokens(method, rows, max_tokens)
    batch = max(max_tokens, min(tokens, batch_tokens)) if tokens else 0
    layer_params = dims.layer_linear_parameters
    largest = dims.largest_linear

    # ---- layer pass ----
    layer = {"layer_weights": layer_params * weight_bytes + (layer_params * f32 if weight_bytes == 2 else 0)}
    if tokens:
        layer["linear_inputs"] = sum(min(tokens, n) * n * f32 for n in dims.linear_inputs)
    layer["codes"] = widths * (layer_params + layer_params // group_size * 4)
    # the error measurement's temporaries (RTN: a dequantized weight, its difference, ...), or
    # GPTQ's working memory, within which its errors are measured (core.quant.layer)
    errors = 4 * largest * f32
    if quantizer == "gptq" and tokens:
        layer["gptq"] = max(_gptq_bytes(dims), errors)
    else:
        layer["error_measure"] = errors
    # one probe stream (taq_grad: one kept input) per layer by the last layer
    carried = 2 * hidden_streams(method, L, sequential=sequential) * tokens * h * weight_bytes
    per_batch_calls = rows * max_tokens * max_tokens  # a [B, 1, T, T] boolean mask per batch
    layer["activations"] = (
        min(carried, activation_ram_bytes)
        + 2 * batch * h * weight_bytes
        + batch * (3 * inter + 4 * h) * weight_bytes
        + batch * max_tokens * dims.num_heads * f32
        + per_batch_calls
    )
    phases = {"layer pass": layer}

    # ---- head (taq_kl / taqo scoring; evaluation) ----
    def head_phase(queries: int, positions: int) -> dict[str, int]:
        # the stored and normed hidden states of every query; about seven [positions, rows]
        # float32 arrays alive per chunk; the chunk of head rows as read (up to three copies)
        return {
            "head_queries": 2 * queries * positions * h * f32,
            "head_chunk": (7 * HEAD_CHUNK_ELEMENTS * f32 + 3 * HEAD_WEIGHT_CHUNK_BYTES) if positions else 0,
        }

    # the carried streams are the head's queries by then (head_queries counts them and their normed copy)
    if method == "taq_kl":  # the last prompt token of every row
        phases["scoring head"] = head_phase(L + 1, rows)
    elif method in ("taqo", "taq_grad"):
        phases["scoring head"] = head_phase(L + 1 if method == "taqo" else 2, rows * ANSWER_TOKENS)
    if method == "taq_grad" and tokens:
        batch_activations = batch * (3 * inter + 4 * h) * weight_bytes + batch * max_tokens * dims.num_heads * f32
        phases["gradient sweep"] = {
            "layer_weights": layer["layer_weights"],
            "codes": layer["codes"],
            "activations": min(2 * (L + 2) * tokens * h * weight_bytes, activation_ram_bytes)
            + 2 * batch_activations
            + batch * sum(dims.linear_inputs) * 2 * f32,
            "error_measure": 2 * largest * f32 + batch * max(inter, h) * 2 * f32,
        }

    def teacher_forced_phase(variants: int, tf_rows: int) -> dict[str, int]:
        tf_tokens = max(1, tf_rows) * (max_tokens + ANSWER_TOKENS)
        return {
            "layer_weights": layer_params * weight_bytes,
            "carried": min(2 * variants * tf_tokens * h * weight_bytes, activation_ram_bytes),
            **head_phase(variants, tf_tokens),
        }

    if evaluates:
        phases["evaluation"] = teacher_forced_phase(1 + 2 * max(1, budgets), eval_rows)
    if closed_loop:  # full precision + at most 7 candidates, on the held-back quarter of the rows
        phases["closed loop"] = teacher_forced_phase(8, max(4, -(-rows // 4)))

    # ---- export: the largest tensor as read (at most float32) and written (fp16), or a linear's codes ----
    biggest = max(dims.vocab_size * h, largest)
    # read at the source width; its float16 form goes out a slice of rows at a time
    phases["export"] = {
        "tensor": biggest * source_bytes,
        "encoding": largest * 8,
        "metadata": dims.vocab_size * EXPORT_METADATA_BYTES_PER_TOKEN[gguf_source],
    }

    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak = max(totals, key=lambda name: totals[name])
    generating = generation_bytes(dims, max_tokens=max_tokens, weight_bytes=weight_bytes)
    terms = dict(phases[peak])
    if generation and (evaluates or closed_loop or method in GENERATING_METHODS) and generating > totals[peak]:
        peak, terms = (
            "generation",
            {"model": dims.parameters * weight_bytes, "generation": generating - dims.parameters * weight_bytes},
        )
    runtime = RUNTIME_BYTES + (dims.vocab_size * GGUF_TOKENIZER_BYTES_PER_TOKEN if gguf_source else 0)
    total = sum(terms.values()) + runtime
    return MemoryEstimate(
        total_bytes=int(total),
        phase=peak,
        terms={k: int(v) for k, v in terms.items()},
        phases={k: int(v) for k, v in totals.items()},
        runtime_bytes=int(runtime),
        generation_bytes=int(generating),
        parameters=int(dims.parameters),
        assumptions={
            "weight_bytes": weight_bytes,
            "calibration_rows": rows,
            "max_tokens": max_tokens,
            "batch_tokens": batch,
            "method": method,
            "quantizer": quantizer,
            "widths": widths,
            "sequential": sequential,
            "evaluates": evaluates,
            "eval_rows": eval_rows,
            "budgets": budgets,
            "activation_ram_bytes": activation_ram_bytes,
            "generation": generation,
            "source_bytes": source_bytes,
            "gguf_source": gguf_source,
            "closed_loop": closed_loop,
        },
    )


# ---------------------------------------------------------------------------------------------
# reading the shapes
# ---------------------------------------------------------------------------------------------
