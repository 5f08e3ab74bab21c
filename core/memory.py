"""Memory preflight: how much RAM (or VRAM) a job needs, estimated from the model's shapes alone.

Nothing is loaded: the shapes come from `config.json` (a model directory) or from the GGUF header
(a `.gguf` file; parameters are then counted exactly from the tensor shapes). The estimate follows
what the worker actually holds at its peak:

* **weights** — every parameter at the dtype the worker loads (`core.models.default_dtype`: float32
  on CPU, 2 bytes on CUDA); GGUF files are dequantized on load, so their on-disk size does not count.
* **hessians** — `core.calibration.HessianCollector` keeps XᵀX (float32) of every distinct linear
  input of every decoder layer at once after the calibration pass: per layer hidden² (q/k/v share
  their input), (heads·head_dim)² (o_proj), hidden² (gate/up share theirs) and intermediate²
  (down_proj). Only when the job has calibration data.
* **activations** — one padded batch of `batch_tokens` tokens through a layer (hidden states, MLP,
  attention scores of `max_tokens` keys per token), full-vocabulary logits of that batch when the
  method or the evaluation needs them (×3: logits, log-probabilities, probabilities), and for the
  methods that replay cached layer inputs (taq_kl, taqo) the inputs and outputs of one layer for
  every calibration token (+ taq_kl's cached reference log-probabilities, capped at 1 GiB).
* **quantized** — the codes (one byte a weight) and fp16 scale/zero of every quantized linear.
* **evaluation** — two more copies of the weights (the quantized model and the uniform baseline
  are deep copies next to the full-precision one) when the job evaluates.
* **runtime** — a fixed allowance for the interpreter, torch and transformers themselves.

Token counts are upper bounds (`rows × max_tokens`; real prompts are usually shorter), so the
estimate errs on the large side. It is a preflight to refuse jobs that cannot fit, not a
promise that everything below it does.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "MemoryEstimate",
    "ModelDims",
    "RUNTIME_BYTES",
    "estimate_job_memory",
    "gguf_model_dims",
    "read_model_dims",
]

GiB = 1 << 30
#: interpreter + torch + transformers resident before any tensor of the job exists
RUNTIME_BYTES = 512 * (1 << 20)
#: taq_kl keeps the full-precision log-probabilities only up to this size (core.scorers.taq_kl)
LOGPROB_CACHE_CAP = 1 << 30
#: padded tokens per batch the scorers use (core.calibration.default_batch_tokens)
CPU_BATCH_TOKENS = 2048
CUDA_BATCH_TOKENS = 16384


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
    def hessian_elements_per_layer(self) -> int:
        h = self.hidden_size
        return h * h + self.attention_width ** 2 + h * h + self.intermediate_size ** 2

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelDims":
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
        return cls(hidden_size=hidden,
                   intermediate_size=need("intermediate_size", "n_inner", "ffn_dim"),
                   num_layers=need("num_hidden_layers", "n_layer"),
                   num_heads=heads,
                   num_kv_heads=kv_heads if isinstance(kv_heads, int) and kv_heads > 0 else heads,
                   head_dim=head_dim if isinstance(head_dim, int) and head_dim > 0 else hidden // heads,
                   vocab_size=need("vocab_size"),
                   tie_word_embeddings=True if tie is None else bool(tie))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a job needs at its peak; `breakdown` adds up to `total_bytes`."""

    total_bytes: int
    weights_bytes: int
    hessian_bytes: int
    activation_bytes: int
    quantized_bytes: int
    evaluation_bytes: int
    runtime_bytes: int
    parameters: int
    assumptions: dict[str, Any] = field(default_factory=dict)

    @property
    def breakdown(self) -> dict[str, int]:
        return {"weights": self.weights_bytes, "hessians": self.hessian_bytes,
                "activations": self.activation_bytes, "quantized": self.quantized_bytes,
                "evaluation": self.evaluation_bytes, "runtime": self.runtime_bytes}

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GiB

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["breakdown"] = self.breakdown
        return out


def estimate_job_memory(dims: ModelDims, *, method: str, calibration_rows: int, max_tokens: int,
                        evaluates: bool = False, weight_bytes: int = 4,
                        batch_tokens: int = CPU_BATCH_TOKENS) -> MemoryEstimate:
    """Peak bytes of one job (see the module docstring for every term).

    `calibration_rows` is the number of rows the scorer will use (0: no calibration pass, no
    Hessians); `weight_bytes` is 4 for a CPU worker (float32), 2 for a CUDA one (bf16/fp16);
    `batch_tokens` the padded tokens per batch (2048 on CPU, 16384 on CUDA)."""
    if weight_bytes not in (2, 4):
        raise ValueError("weight_bytes must be 2 or 4")
    f32 = 4
    params = dims.parameters
    weights = params * weight_bytes
    rows = max(0, int(calibration_rows))
    tokens = rows * max_tokens
    batch = max(max_tokens, min(tokens, batch_tokens)) if rows or evaluates else 0

    hessians = dims.num_layers * dims.hessian_elements_per_layer * f32 if rows else 0

    h, inter = dims.hidden_size, dims.intermediate_size
    per_token = 6 * h + 3 * inter + dims.attention_width + 2 * dims.num_kv_heads * dims.head_dim
    forward = batch * per_token * f32 + batch * max_tokens * dims.num_heads * f32
    full_logits = method in ("taq_kl", "taqo") or evaluates
    logits = 3 * batch * dims.vocab_size * f32 if full_logits else 0
    cached = 2 * tokens * h * f32 if method in ("taq_kl", "taqo") else 0
    if method == "taq_kl":
        cached += tokens * h * f32 + min(LOGPROB_CACHE_CAP, tokens * dims.vocab_size * f32)
    activations = forward + logits + cached

    # uint8 codes + fp16 scale and zero per group of (at least) 32 weights
    quantized = dims.linear_parameters + dims.linear_parameters * 4 // 32
    evaluation = 2 * weights if evaluates else 0
    total = weights + hessians + activations + quantized + evaluation + RUNTIME_BYTES
    return MemoryEstimate(
        total_bytes=int(total), weights_bytes=int(weights), hessian_bytes=int(hessians),
        activation_bytes=int(activations), quantized_bytes=int(quantized), evaluation_bytes=int(evaluation),
        runtime_bytes=RUNTIME_BYTES, parameters=int(params),
        assumptions={"weight_bytes": weight_bytes, "calibration_rows": rows, "max_tokens": max_tokens,
                     "batch_tokens": batch, "method": method, "evaluates": evaluates})


# ---------------------------------------------------------------------------------------------
# reading the shapes
# ---------------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                 11: "<q", 12: "<d"}
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
            value = bytes(buf[pos:pos + n]).decode("utf-8", errors="replace")
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
    return ModelDims(hidden_size=hidden, intermediate_size=need("feed_forward_length"),
                     num_layers=need("block_count"), num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=head_dim, vocab_size=vocab, tie_word_embeddings="output.weight" not in shapes,
                     exact_parameters=params)


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
