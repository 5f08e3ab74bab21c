"""GGUF metadata of an export: the llama hyperparameters of the model (checked against a source
GGUF), the source GGUF's metadata copied verbatim (tokenizer included) or, without a source, the
hyperparameters and tokenizer written from the model config and the HF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from core.errors import ExportError
from core.export._common import text_config

if TYPE_CHECKING:
    from gguf import GGUFWriter

ARCH = "llama"
QUANTIZATION_VERSION = 2
# token types of llama.cpp's vocabulary
_NORMAL, _UNUSED, _CONTROL, _USER_DEFINED = 1, 5, 3, 4


class LlamaHyper:
    """The llama hyperparameters of the model being exported."""

    def __init__(self, model: nn.Module) -> None:
        cfg = text_config(model)
        if getattr(cfg, "model_type", None) != ARCH:
            raise ExportError(
                f"GGUF export supports llama-architecture models; this one is "
                f"'{getattr(cfg, 'model_type', type(model).__name__)}'"
            )
        self.hidden = int(cfg.hidden_size)
        self.layers = int(cfg.num_hidden_layers)
        self.ffn = int(cfg.intermediate_size)
        self.n_head = int(cfg.num_attention_heads)
        self.n_head_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_head)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.hidden // self.n_head)
        self.context = int(cfg.max_position_embeddings)
        self.eps = float(cfg.rms_norm_eps)
        self.vocab = int(cfg.vocab_size)
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", None):
            raise ExportError(f"GGUF export does not support rope scaling '{rope_type}'")
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        self.rope_theta = float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))

    def expected_metadata(self) -> dict[str, float | int]:
        return {
            f"{ARCH}.block_count": self.layers,
            f"{ARCH}.embedding_length": self.hidden,
            f"{ARCH}.feed_forward_length": self.ffn,
            f"{ARCH}.attention.head_count": self.n_head,
            f"{ARCH}.attention.head_count_kv": self.n_head_kv,
        }


def copy_source_metadata(writer: GGUFWriter, source: Path, hyper: LlamaHyper, file_type: int) -> None:
    """Every key of the source GGUF in its order, with our file type; strings copied as raw bytes."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    fields = reader.fields
    arch = fields.get("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise ExportError(f"source GGUF {source.name} is not a llama-architecture file")
    for key, expected in hyper.expected_metadata().items():
        field = fields.get(key)
        if field is None or int(field.contents()) != expected:
            raise ExportError(
                f"source GGUF {source.name} does not describe this model: {key} is "
                f"{None if field is None else field.contents()}, the model has {expected}"
            )
    seen = set()
    for key, field in fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        seen.add(key)
        main = field.types[0]
        if key == "general.file_type":
            writer.add_uint32(key, file_type)
        elif key == "general.quantization_version":
            writer.add_uint32(key, QUANTIZATION_VERSION)
        elif main == GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), main)
        elif main == GGUFValueType.ARRAY:
            sub = field.types[-1]
            if len(field.types) != 2:
                raise ExportError(f"source GGUF key {key} is a nested array, which is not supported")
            values = [bytes(field.parts[i]) for i in field.data] if sub == GGUFValueType.STRING else field.contents()
            if values:
                writer.add_key_value(key, values, main, sub_type=sub)
        else:
            writer.add_key_value(key, field.contents(), main)
    if "general.file_type" not in seen:
        writer.add_uint32("general.file_type", file_type)
    if "general.quantization_version" not in seen:
        writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)


def pre_tokenizer_name(backend: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer id for a byte-level BPE tokenizer.json, recognised by structure:
    digits split one by one before ByteLevel is SmolLM's (also StarCoder's) rule."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    return "default"


def tokenizer_metadata(writer: GGUFWriter, tokenizer: Any, hyper: LlamaHyper) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary."""
    backend_tok = getattr(tokenizer, "backend_tokenizer", None)
    if backend_tok is None:
        raise ExportError("GGUF export from an HF directory needs a fast (tokenizers) tokenizer")
    backend = json.loads(backend_tok.to_str())
    model = backend.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(backend.get("pre_tokenizer")):
        raise ExportError(
            "GGUF export from an HF directory supports byte-level BPE tokenizers only; "
            "export from the model's GGUF to carry another tokenizer"
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {int(i): tok for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special_ids = set(getattr(tokenizer, "all_special_ids", []))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(hyper.vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(_CONTROL if (added[i].special or i in special_ids) else _USER_DEFINED)
        else:
            types.append(_CONTROL if i in special_ids else _NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_bool("tokenizer.ggml.add_space_prefix", False)
    probe = tokenizer("a")["input_ids"]
    writer.add_bool(
        "tokenizer.ggml.add_bos_token", tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    )
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    for key, value in (
        ("bos_token_id", tokenizer.bos_token_id),
        ("eos_token_id", tokenizer.eos_token_id),
        ("unknown_token_id", tokenizer.unk_token_id),
        ("padding_token_id", tokenizer.pad_token_id),
    ):
        if value is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}", int(value))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_string("tokenizer.chat_template", template)


def hf_metadata(writer: GGUFWriter, tokenizer: Any, hyper: LlamaHyper, name: str, file_type: int) -> None:
    writer.add_string("general.type", "model")
    writer.add_string("general.name", name)
    writer.add_uint32(f"{ARCH}.block_count", hyper.layers)
    writer.add_uint32(f"{ARCH}.context_length", hyper.context)
    writer.add_uint32(f"{ARCH}.embedding_length", hyper.hidden)
    writer.add_uint32(f"{ARCH}.feed_forward_length", hyper.ffn)
    writer.add_uint32(f"{ARCH}.attention.head_count", hyper.n_head)
    writer.add_uint32(f"{ARCH}.attention.head_count_kv", hyper.n_head_kv)
    writer.add_float32(f"{ARCH}.rope.freq_base", hyper.rope_theta)
    writer.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", hyper.eps)
    writer.add_uint32("general.file_type", file_type)
    writer.add_uint32(f"{ARCH}.vocab_size", hyper.vocab)
    writer.add_uint32(f"{ARCH}.rope.dimension_count", hyper.head_dim)
    if hyper.head_dim * hyper.n_head != hyper.hidden:
        writer.add_uint32(f"{ARCH}.attention.key_length", hyper.head_dim)
        writer.add_uint32(f"{ARCH}.attention.value_length", hyper.head_dim)
    if tokenizer is None:
        raise ExportError("GGUF export from an HF directory needs the tokenizer")
    tokenizer_metadata(writer, tokenizer, hyper)
    writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
