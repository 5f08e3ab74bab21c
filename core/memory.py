"""Memory preflight: how much RAM (or VRAM) a job needs, estimated from the model's shapes alone.

Nothing is loaded: the shapes come from `config.json` (a model directory) or from the GGUF header
(a `.gguf` file; parameters are then counted exactly from the tensor shapes). The estimate follows
the streaming pipeline (core/pipeline.py), which never holds the model: its peak is the runtime
plus the largest of its phases.

* **layer pass** (score, quantize) — one decoder layer's weights at the worker's compute dtype
  (float32 on CPU, 2 bytes on CUDA, plus a float32 working copy there); what its linears' inputs
  leave behind (`core.quant.layer.LayerInputs`: per distinct input min(tokens, in)·in float32: the
  raw rows when there are fewer tokens than features, else XᵀX); the layer's codes at every stored
  width until they are checkpointed; the error measurement's temporaries or, when larger, GPTQ's
  working memory, which is gone before the errors are measured: for its worst group of linears
  sharing an input (`ModelDims.gptq_groups`) the inverse-Hessian factor, one [in, in] matrix
  factored in place (float64 up to 8192 inputs, with a float32 one beside it; float32 above),
  and the sweep's float32 working copy and block update and uint8 codes; the carried hidden
  states (input and output of every stream, capped by `activation_ram_bytes`, beyond which they
  are spilled to disk) and one batch's activations inside the layer.
* **head** (taq_kl, taqo, evaluation) — the final hidden states of every scored stream at the
  scored positions and one vocabulary chunk of logits per query (`core.streaming.head`).
* **export** — the largest single tensor (usually the embedding or LM head) as read and as written.
* **generation** — greedy generation materialises the whole model once (weights at the compute
  dtype, the KV cache of a batch, last-position logits); it runs only when that fits the worker's
  limit, so it is reported separately (`generation_bytes`) and counted only when the caller says
  it will run.

Token counts are upper bounds (`rows × max_tokens`; real prompts are usually shorter), so the
estimate errs on the large side.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "MemoryEstimate",
    "ModelDims",
    "RUNTIME_BYTES",
    "estimate_job_memory",
    "gguf_model_dims",
    "read_model_dims",
]

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
#: GPTQ factors H in float64 up to this many inputs (core.quant.layer)
FLOAT64_FACTOR_MAX_FEATURES = 8192
#: gold answers are scored on at most this many tokens
ANSWER_TOKENS = 32


@dataclass(frozen=True)
class ModelDims:
    """The shapes of a decoder-only transformer that the estimate needs."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    #: exact parameter count when known (GGUF tensor shapes); otherwise computed from the shapes
    exact_parameters: int | None = None

    @property
    def attention_width(self) -> int:
        """in_features of o_proj: heads × head_dim (not always hidden_size, e.g. Gemma 3)."""
        return self.num_heads * self.head_dim

    @property
    def layer_linear_parameters(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = h * self.attention_width + 2 * h * kv + self.attention_width * h
        return attention + 3 * h * self.intermediate_size

    @property
    def linear_parameters(self) -> int:
        return self.num_layers * self.layer_linear_parameters

    @property
    def parameters(self) -> int:
        if self.exact_parameters is not None:
            return self.exact_parameters
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = self.num_layers * 2 * self.hidden_size + self.hidden_size
        return embeddings + self.linear_parameters + norms

    @property
    def linear_inputs(self) -> list[int]:
        """in_features of each distinct linear input of a layer: q/k/v share one, o_proj,
        gate/up share one, down_proj."""
        return [self.hidden_size, self.attention_width, self.hidden_size, self.intermediate_size]

    @property
    def largest_linear(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return max(h * self.attention_width, h * kv, h * self.intermediate_size)

    @property
    def gptq_groups(self) -> list[tuple[int, int]]:
        """(in_features, stacked out_features) of each group of linears GPTQ sweeps together (one
        shared input): q/k/v, o_proj, gate/up, down_proj."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return [
            (h, self.attention_width + 2 * kv),
            (self.attention_width, h),
            (h, 2 * self.intermediate_size),
            (self.intermediate_size, h),
        ]

    @property
    def hessian_elements_per_layer(self) -> int:
        h = self.hidden_size
        return h * h + self.attention_width**2 + h * h + self.intermediate_size**2

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelDims:
        """From a Hugging Face `config.json` dict (a nested `text_config` is used when present).
        Raises ValueError naming a missing field."""
        cfg = dict(config)
        text = cfg.get("text_config")
        if isinstance(text, Mapping) and "hidden_size" not in cfg:
            cfg = {**{"tie_word_embeddings": cfg.get("tie_word_embeddings")}, **dict(text)}

        def need(*names: str) -> int:
            for name in names:
                value = cfg.get(name)
                if isinstance(value, int) and value > 0:
                    return value
            raise ValueError(f"config has no positive '{names[0]}'")

        hidden = need("hidden_size", "n_embd", "d_model")
        heads = need("num_attention_heads", "n_head")
        kv_heads = cfg.get("num_key_value_heads")
        head_dim = cfg.get("head_dim")
        tie = cfg.get("tie_word_embeddings")
        return cls(
            hidden_size=hidden,
            intermediate_size=need("intermediate_size", "n_inner", "ffn_dim"),
            num_layers=need("num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads,
            head_dim=head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads,
            vocab_size=need("vocab_size"),
            tie_word_embeddings=True if tie is None else bool(tie),
        )


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


def _gptq_bytes(dims: ModelDims) -> int:
    """GPTQ's peak over a layer's groups (one at a time, core.quant.layer): the in-place [in, in]
    factor, a float32 matrix more for a float64 one, and the sweep's float32 working copy and
    block update and its uint8 codes (as swept, transposed, split: 2·4 + 3 bytes per weight)."""
    return max(
        n * n * (_factor_bytes(n) + (4 if _factor_bytes(n) == 8 else 0)) + n * out * (2 * 4 + 3)
        for n, out in dims.gptq_groups
    )


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
) -> MemoryEstimate:
    """Peak bytes of one job (see the module docstring for every term).

    `calibration_rows` is the number of rows the pass will use (0: no calibration activations);
    `weight_bytes` 4 for a CPU worker (float32), 2 for a CUDA one (bf16); `widths` the stored bit
    widths below 16; `eval_rows` and `budgets` size the evaluation's streams; `generation` says
    whether greedy generation will run (the model fits the worker); `source_bytes` the width the
    checkpoint stores its floats in (2 for bf16/fp16 safetensors, 4 otherwise); `gguf_source` whether
    the model is a GGUF file (its tokenizer is built from the file's metadata, and exports copy that
    metadata)."""
    if weight_bytes not in (2, 4):
        raise ValueError("weight_bytes must be 2 or 4")
    f32 = 4
    h, inter, L = dims.hidden_size, dims.intermediate_size, dims.num_layers
    rows = max(0, int(calibration_rows))
    prompt_tokens = rows * max_tokens
    # taqo scores prompt + answer: its sequences are longer by the answer
    tokens = rows * (max_tokens + ANSWER_TOKENS) if method == "taqo" else prompt_tokens
    batch = max(max_tokens, min(tokens, batch_tokens)) if tokens else 0
    layer_params = dims.layer_linear_parameters
    largest = dims.largest_linear

    # ---- layer pass ----
    layer = {"layer_weights": layer_params * weight_bytes + (layer_params * f32 if weight_bytes == 2 else 0)}
    if tokens:
        layer["linear_inputs"] = sum(min(tokens, n) * n * f32 for n in dims.linear_inputs)
    layer["codes"] = widths * (layer_params + layer_params // group_size * 4)
    # the error measurement's temporaries (a dequantized weight, its difference, ...), or GPTQ's
    # working memory, which is gone before the errors are measured
    errors = 4 * largest * f32
    if quantizer == "gptq" and tokens:
        layer["gptq"] = max(_gptq_bytes(dims), errors)
    else:
        layer["error_measure"] = errors
    streams = 1 + (1 if sequential else 0)
    if method in ("taq_kl", "taqo"):
        streams += L  # one probe stream per layer by the last layer
    carried = 2 * streams * tokens * h * weight_bytes
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
    if method == "taq_kl":
        phases["scoring head"] = head_phase(L + 1, prompt_tokens)
    elif method == "taqo":
        phases["scoring head"] = head_phase(L + 1, rows * ANSWER_TOKENS)
    if evaluates:
        variants = 1 + 2 * max(1, budgets)
        eval_tokens = max(1, eval_rows) * (max_tokens + ANSWER_TOKENS)
        phases["evaluation"] = {
            "layer_weights": layer_params * weight_bytes,
            "carried": min(2 * variants * eval_tokens * h * weight_bytes, activation_ram_bytes),
            **head_phase(variants, eval_tokens),
        }

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
    if generation and evaluates and generating > totals[peak]:
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
        },
    )


# ---------------------------------------------------------------------------------------------
# reading the shapes
# ---------------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _gguf_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """Scalar metadata and tensor shapes of a GGUF file (v2/v3), without reading tensor data.
    Arrays are skipped (their length is kept), so the tokenizer vocabulary costs nothing."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path.name} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        pos = 24

        def read(fmt: str) -> Any:
            nonlocal pos
            value = struct.unpack_from(fmt, buf, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def read_string() -> str:
            nonlocal pos
            n = read("<Q")
            value = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
            pos += n
            return value

        def read_value(kind: int) -> Any:
            nonlocal pos
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == _STRING:
                return read_string()
            if kind == _ARRAY:
                item, count = read("<I"), read("<Q")
                if item in _GGUF_SCALARS:
                    fmt = _GGUF_SCALARS[item]
                    values = struct.unpack_from(f"<{count}{fmt[1]}", buf, pos) if count else ()
                    pos += struct.calcsize(fmt) * count
                    return {"array_length": count, "max": max(values) if values else None}
                for _ in range(count):
                    read_value(item)
                return {"array_length": count}
            raise ValueError(f"unknown GGUF value type {kind}")

        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = read_string()
            meta[key] = read_value(read("<I"))
        shapes: dict[str, tuple[int, ...]] = {}
        for _ in range(n_tensors):
            name = read_string()
            dims = tuple(read("<Q") for _ in range(read("<I")))
            read("<I")  # ggml type
            read("<Q")  # offset
            shapes[name] = dims
        return meta, shapes


def _int(value: Any) -> int | None:
    if isinstance(value, dict):  # a per-layer array: the largest entry bounds the memory
        value = value.get("max")
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def gguf_model_dims(path: Path) -> ModelDims:
    """ModelDims from a GGUF header; the parameter count is exact (sum of tensor shapes)."""
    meta, shapes = _gguf_header(Path(path))
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError("GGUF has no general.architecture")

    def need(key: str) -> int:
        value = _int(meta.get(f"{arch}.{key}"))
        if value is None:
            raise ValueError(f"GGUF has no '{arch}.{key}'")
        return value

    hidden, heads = need("embedding_length"), need("attention.head_count")
    kv_heads = _int(meta.get(f"{arch}.attention.head_count_kv")) or heads
    head_dim = _int(meta.get(f"{arch}.attention.key_length")) or hidden // heads
    vocab = _int(meta.get(f"{arch}.vocab_size"))
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = _int(tokens.get("array_length")) if isinstance(tokens, dict) else None
    if vocab is None and "token_embd.weight" in shapes:
        vocab = max(shapes["token_embd.weight"])
    if vocab is None:
        raise ValueError("GGUF has no vocabulary size")
    params = 0
    for dims in shapes.values():
        n = 1
        for d in dims:
            n *= int(d)
        params += n
    return ModelDims(
        hidden_size=hidden,
        intermediate_size=need("feed_forward_length"),
        num_layers=need("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings="output.weight" not in shapes,
        exact_parameters=params,
    )


@lru_cache(maxsize=64)
def _cached_dims(path: str, is_gguf: bool, mtime_ns: int, size: int) -> ModelDims:
    if is_gguf:
        return gguf_model_dims(Path(path))
    return ModelDims.from_config(json.loads(Path(path).read_text()))


def read_model_dims(source: Any) -> ModelDims:
    """ModelDims of a resolved `core.models.ModelSource` (its config.json or GGUF header; cached
    per file version). Raises ValueError / OSError when the shapes cannot be read."""
    path = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path) / "config.json"
    stat = path.stat()
    return _cached_dims(str(path), bool(source.gguf_file), stat.st_mtime_ns, stat.st_size)
