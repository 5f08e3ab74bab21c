"""A model opened for streaming: its module skeleton on the meta device, its tokenizer, and a lazy
weight reader. Nothing is materialised up front; decoder layers are onloaded one at a time at the
compute dtype (`onloaded`), the token embedding only as the rows a batch uses (`compact_embedding`),
and the LM head in vocabulary chunks (`head_rows`).

The skeleton comes from the checkpoint's own config (`config.json`, or a GGUF's metadata) through
transformers' `from_config` under accelerate's `init_empty_weights`, so every architecture
transformers knows runs its own layer code; buffers (rotary frequencies, embedding scales) are
real. Every parameter the skeleton has must exist in the checkpoint with the same shape
(`ModelInvalid` otherwise), except an LM head tied to the embedding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import ModelNotFound, UnsupportedModel
from core.models import LayerRef, ModelSource, default_dtype, layer_refs
from core.modules import DecoderStack, decoder_stack, get_module, module_weight, weight_name
from core.types import QuantizedWeight

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["StreamedModel", "open_streamed"]


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass
class StreamedModel:
    """See the module docstring. `layers` are the skeleton's decoder layers (meta parameters
    unless onloaded); parameter names are the skeleton's full dotted names."""

    source: ModelSource
    config: Any
    skeleton: PreTrainedModel
    tokenizer: Any
    reader: Any  # core.weights.WeightReader
    stack: DecoderStack
    layers: list[LayerRef]
    device: torch.device
    dtype: torch.dtype
    embed_name: str
    head_name: str
    tied: bool
    _onloaded: set[str] = field(default_factory=set)

    # ---- shapes -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.reader.infos()[self.embed_name].shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.reader.infos()[self.head_name].shape[0])

    @property
    def logit_softcap(self) -> float | None:
        cap = getattr(_text_config(self.config), "final_logit_softcapping", None)
        return float(cap) if cap else None

    @property
    def linear_names(self) -> list[str]:
        return [name for ref in self.layers for name in ref.linears]

    def parameter_names(self, module_name: str) -> list[str]:
        module = get_module(self.skeleton, module_name)
        return [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters()]

    # ---- onload / offload -------------------------------------------------------------------------
    def _set(self, name: str, value: torch.Tensor | None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        if value is None:
            set_module_tensor_to_device(self.skeleton, name, "meta")
            self._onloaded.discard(name)
        else:
            # the dtype is given: accelerate would otherwise cast to the skeleton's (config) dtype
            set_module_tensor_to_device(self.skeleton, name, self.device, value=value, dtype=value.dtype)
            self._onloaded.add(name)

    def onload(self, module_name: str) -> None:
        """Read every parameter of a module (a decoder layer, the final norm) onto the device."""
        for name in self.parameter_names(module_name):
            self._set(name, self.reader.read(name, dtype=self.dtype, device=self.device))

    def offload(self, module_name: str) -> None:
        for name in self.parameter_names(module_name):
            self._set(name, None)

    @contextmanager
    def onloaded(self, module_name: str) -> Iterator[nn.Module]:
        self.onload(module_name)
        try:
            yield get_module(self.skeleton, module_name)
        finally:
            self.offload(module_name)

    @contextmanager
    def swapped_linears(self, weights: Mapping[str, QuantizedWeight | torch.Tensor]) -> Iterator[None]:
        """Onloaded linears temporarily carry the dequantized `weights` (a quantized layer's
        forward; a tensor is taken as already dequantized, e.g. a third-party quantizer's output);
        the full-precision values are restored afterwards."""
        from core.quant.primitives import dequantize_weight

        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, q in weights.items():
                    param = module_weight(self.skeleton, name)
                    saved[name] = param.detach().clone()
                    value = q if isinstance(q, torch.Tensor) else dequantize_weight(q, dtype=torch.float32)
                    param.copy_(value.to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    module_weight(self.skeleton, name).copy_(original)

    # ---- embedding and head -----------------------------------------------------------------------
    @contextmanager
    def compact_embedding(self, input_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """The input embedding temporarily holds only the rows of the token ids in `input_ids`;
        yields the ids remapped onto those rows. The module's own forward (e.g. Gemma's
        sqrt(hidden) scale) still runs, so the result equals the full embedding's."""
        embed: Any = self.skeleton.get_input_embeddings()  # an embedding module of the model's own class
        unique, remapped = torch.unique(input_ids.cpu(), return_inverse=True)
        rows = self.reader.gather_rows(self.embed_name, unique, dtype=self.dtype, device=self.device)
        saved_weight, saved_padding = embed.weight, getattr(embed, "padding_idx", None)
        embed.weight = nn.Parameter(rows, requires_grad=False)
        if hasattr(embed, "padding_idx"):
            embed.padding_idx = None  # F.embedding checks it against the (compact) table size
        try:
            yield remapped.to(self.device)
        finally:
            embed.weight = saved_weight
            if hasattr(embed, "padding_idx"):
                embed.padding_idx = saved_padding

    def head_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the LM head weight (the embedding when tied), compute dtype."""
        rows: torch.Tensor = self.reader.read_rows(self.head_name, start, stop, dtype=self.dtype, device=self.device)
        return rows

    # ---- a whole model, for generation when it fits ---------------------------------------------------
    def materialize(self) -> PreTrainedModel:
        """Onload every parameter: the skeleton becomes the full model (used for greedy generation
        when the worker's memory allows it). `release()` returns it to the meta device."""
        head = self.head_name_in_skeleton
        for name, _ in self.skeleton.named_parameters():
            if name not in self._onloaded and not (self.tied and name == head):
                self._set(name, self.reader.read(name, dtype=self.dtype, device=self.device))
        if self.tied:
            head = self.skeleton.get_output_embeddings()
            head.weight = self.skeleton.get_input_embeddings().weight
        self.skeleton.eval()
        return self.skeleton

    def release(self) -> None:
        """Every parameter back to the meta device."""
        head = self.head_name_in_skeleton
        for name, _ in list(self.skeleton.named_parameters(remove_duplicate=False)):
            if name in self._onloaded or (self.tied and name == head):  # a tied head shares the embedding
                self._set(name, None)
        self._onloaded.clear()

    @property
    def head_name_in_skeleton(self) -> str:
        from core.export._common import output_embedding_name

        return output_embedding_name(self.skeleton) or "lm_head.weight"

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_streamed(
    source: ModelSource, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> StreamedModel:
    """Open a resolved model for streaming (tokenizer, config, skeleton, lazy weights): nothing
    but headers is read. Raises ModelInvalid (core.weights) for a broken checkpoint,
    UnsupportedModel for an architecture transformers cannot build or core cannot walk."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from core.weights import open_weights, validate_shapes

    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    common: dict[str, Any] = {"trust_remote_code": False, "local_files_only": True}
    if source.gguf_file:
        common["gguf_file"] = source.gguf_file
    if source.weights_format == "pickle":
        raise UnsupportedModel(
            f"model '{source.model_id}' has pickle weights only; streaming reads safetensors and GGUF checkpoints"
        )
    try:
        config = AutoConfig.from_pretrained(str(source.path), **common)
        tokenizer = AutoTokenizer.from_pretrained(str(source.path), **common)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise UnsupportedModel(f"model '{source.model_id}' cannot be built: {type(exc).__name__}") from exc
    except OSError as exc:
        raise ModelNotFound(f"model '{source.model_id}' files are incomplete (config or tokenizer)") from exc
    skeleton.eval()
    for name, buffer in list(skeleton.named_buffers()):
        if buffer.device != device:  # rotary frequencies, embedding scales: small and real
            from accelerate.utils import set_module_tensor_to_device

            set_module_tensor_to_device(skeleton, name, device)
    stack = decoder_stack(skeleton)
    refs = layer_refs(skeleton)
    if not refs or not any(ref.linears for ref in refs):
        raise UnsupportedModel(
            f"model '{source.model_id}' ({type(skeleton).__name__}) has no decoder layers with linear weights"
        )
    embed_name = weight_name(skeleton, skeleton.get_input_embeddings())
    head_name = weight_name(skeleton, skeleton.get_output_embeddings())
    if embed_name is None or head_name is None or stack.final_norm is None:
        raise UnsupportedModel(f"{type(skeleton).__name__}: no input embedding, LM head or final norm found")
    reader = open_weights(source.path, gguf_file=source.gguf_file, skeleton=skeleton)
    try:
        tied = bool(getattr(_text_config(config), "tie_word_embeddings", False)) or bool(
            getattr(config, "tie_word_embeddings", False)
        )
        tied = tied and head_name not in reader.infos()
        expected = {name: tuple(p.shape) for name, p in skeleton.named_parameters(remove_duplicate=False)}
        validate_shapes(reader, expected, optional={head_name} if tied else set())
    except Exception:
        reader.close()
        raise
    return StreamedModel(
        source=source,
        config=config,
        skeleton=skeleton,
        tokenizer=tokenizer,
        reader=reader,
        stack=stack,
        layers=refs,
        device=device,
        dtype=dtype,
        embed_name=embed_name,
        head_name=embed_name if tied else head_name,
        tied=tied,
    )
