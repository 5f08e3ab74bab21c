"""The shapes of a decoder-only transformer that the memory and disk preflights need, read without
loading anything: from `config.json` (a model directory) or from the GGUF header (a `.gguf` file,
parameters then counted exactly from the tensor shapes)."""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["ModelDims", "gguf_model_dims", "read_model_dims"]


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
    def linear_in_features(self) -> dict[str, int]:
        """in_features of a decoder layer's linears, one per distinct input (q/k/v and gate/up
        read the same one)."""
        return {
            "self_attn.q_proj": self.hidden_size,
            "self_attn.o_proj": self.attention_width,
            "mlp.down_proj": self.intermediate_size,
        }

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
