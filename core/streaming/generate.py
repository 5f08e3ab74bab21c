"""Greedy generation needs the whole model at once (every new token runs every layer), so it runs
only when the model fits the worker's memory: the skeleton is materialised in place (one copy of
the weights, no deep copies), a quantized variant is installed by overwriting its linears with
their dequantized codes, and the full-precision values are read back from the checkpoint
afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from core.modules import module_weight
from core.streaming.model import StreamedModel
from core.types import QuantizedWeight

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["greedy_token_ids", "installed", "materialized", "materialized_bytes"]


def materialized_bytes(model: StreamedModel, max_tokens: int) -> int:
    """Bytes greedy generation needs: the whole model at the compute dtype, the KV cache of a
    batch, activations and logits (core.memory.generation_bytes, so the preflight and the worker
    agree)."""
    from core.memory import generation_bytes
    from core.model_dims import ModelDims

    itemsize = torch.empty(0, dtype=model.dtype).element_size()
    params = sum(
        p.numel()
        for name, p in model.skeleton.named_parameters()
        if not (model.tied and name == model.head_name_in_skeleton)
    )
    dims = ModelDims.from_config(model.config.to_dict())
    return generation_bytes(dims, max_tokens=max_tokens, weight_bytes=itemsize, parameters=params)


@contextmanager
def materialized(model: StreamedModel) -> Iterator[PreTrainedModel]:
    module = model.materialize()
    try:
        yield module
    finally:
        model.release()


@contextmanager
def installed(
    model: StreamedModel, bits_by_linear: dict[str, int], codes: Callable[[int, int], dict[str, QuantizedWeight]]
) -> Iterator[None]:
    """In a materialised model, every linear below 16 bits carries its dequantized codes (read
    layer by layer with `codes(layer_index, bits)`); the checkpoint's full-precision values are
    read back afterwards, one tensor at a time, nothing cloned."""
    from core.quant.primitives import dequantize_weight

    done: list[str] = []
    try:
        with torch.no_grad():
            for ref in model.layers:
                for bits in sorted({bits_by_linear[n] for n in ref.linears} - {16}):
                    layer_codes = codes(ref.index, bits)
                    for name in ref.linears:
                        if bits_by_linear[name] == bits:
                            param = module_weight(model.skeleton, name)
                            param.copy_(
                                dequantize_weight(layer_codes[name], dtype=torch.float32).to(param.device, param.dtype)
                            )
                            done.append(name)
                    del layer_codes
        yield
    finally:
        with torch.no_grad():
            for name in done:
                param = module_weight(model.skeleton, name)
                param.copy_(model.reader.read(f"{name}.weight", dtype=param.dtype, device=param.device))


def _eos_ids(module: nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    config = getattr(module, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, int):
            ids.append(v)
    tok = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok, int) and tok not in ids:
        ids.append(tok)
    return ids


def greedy_token_ids(
    module: PreTrainedModel, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16
) -> list[list[int]]:
    """Each prompt's greedy continuation as token ids, up to and including the first EOS
    (batched, left-padded, longest first; the output keeps the input order)."""
    from transformers import GenerationConfig

    from core.calibration import pad_token_id

    device = next(module.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = _eos_ids(module, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos or None
    )
    # transformers' GenerationMixin.generate; without return_dict_in_generate it returns the ids
    generate = cast(Callable[..., torch.Tensor], module.generate)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        group = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for r, i in enumerate(group):
            seq = torch.as_tensor(list(prompts[i]), dtype=torch.long)
            ids[r, width - len(seq) :] = seq
            mask[r, width - len(seq) :] = 1
        with torch.no_grad():
            generated = generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for r, i in enumerate(group):
            answer: list[int] = []
            for t in generated[r, width:].tolist():
                answer.append(int(t))
                if t in eos:
                    break
            out[i] = answer
    return [out[i] for i in range(len(prompts))]
