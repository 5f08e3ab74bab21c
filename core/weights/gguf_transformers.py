"""transformers' own GGUF processing, used per tensor by `gguf_reader.GGUFWeightReader`: the
architecture's tensor processor (configured from the file's metadata with transformers'
GGUF_CONFIG_MAPPING table, as `load_gguf_checkpoint` builds it) and the GGUF -> HF name map."""

from __future__ import annotations

import functools
import threading
from typing import Any, cast

from torch import nn

from core.errors import UnsupportedModel

_NAME_MAP_LOCK = threading.Lock()


def tensor_processor(architecture: str, metadata: dict[str, object], file: str) -> tuple[Any, tuple[str, ...]]:
    """transformers' tensor processor for this architecture, configured as from_pretrained does;
    UnsupportedModel where processing is not per tensor (MoE merges, transposes, newer loaders)."""
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        BloomTensorProcessor,
        Gemma2TensorProcessor,
        LlamaTensorProcessor,
        NemotronTensorProcessor,
        T5TensorProcessor,
        TensorProcessor,
    )

    per_tensor = (
        TensorProcessor,
        LlamaTensorProcessor,
        Gemma2TensorProcessor,
        NemotronTensorProcessor,
        BloomTensorProcessor,
        T5TensorProcessor,
    )
    cls: Any = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
    try:  # architectures transformers loads through its newer GGUF path, with other conversions
        from transformers.integrations.gguf.utils import is_gguf_arch_supported

        newer = is_gguf_arch_supported(architecture)
    except ImportError:  # pragma: no cover - older transformers
        newer = False
    if cls not in per_tensor or newer:
        raise UnsupportedModel(
            f"streaming GGUF weights of architecture '{architecture}' is not supported "
            "(its tensors are merged or reshaped across tensors when loaded)",
            details={"file": file, "architecture": architecture},
        )
    row_moving = {LlamaTensorProcessor: (".attn_q.", ".attn_k."), BloomTensorProcessor: ("attn_qkv",)}
    return cls(config=processor_config(architecture, metadata)), row_moving.get(cls, ())


def processor_config(architecture: str, metadata: dict[str, object]) -> dict[str, object]:
    """The `<arch>.*` scalars renamed with transformers' GGUF_CONFIG_MAPPING: what the processors
    read (head counts, hidden size) from `load_gguf_checkpoint(...)["config"]`, without that
    function's second full parse of the vocabulary (seconds for a 128k-token file)."""
    from transformers.integrations import GGUF_CONFIG_MAPPING

    table = cast(dict[str, Any], GGUF_CONFIG_MAPPING.get(architecture, {}))  # per architecture: gguf key -> HF
    config: dict[str, object] = {}
    for key, value in metadata.items():
        prefix, _, sub = key.partition(".")
        renamed = table.get(sub) if prefix == architecture else None
        if renamed is not None and renamed != -1 and value is not None:
            config[renamed] = value
    return config


def hf_weights_map(skeleton: nn.Module, processor: Any) -> dict[str, str]:
    """transformers' GGUF -> HF name map. It rebuilds gguf's full tensor-name table once per
    submodule (seconds for a small model); a memoised table for the duration gives the same map."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    with _NAME_MAP_LOCK:
        original = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
        try:
            mapping: dict[str, str] = get_gguf_hf_weights_map(skeleton, processor)
            return mapping
        finally:
            gguf.get_tensor_name_map = original
