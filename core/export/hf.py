"""Hugging Face export: a model directory in the compressed-tensors ``pack-quantized`` format.

Layout (see docs/ARTIFACTS.md for the reasoning and the runtime matrix):

- ``config.json``: the source config with ``dtype: float16`` and a ``quantization_config`` holding
  one config group per bit-width (``int4``, ``int8``, ...). A group's ``targets`` are the full
  module names of exactly the linears at that width; 16-bit layers' linears and the LM head are in
  ``ignore``.
- ``model.safetensors``: per quantized linear ``weight_packed`` (int32, codes packed densely along
  the input dim by `core.quant.packing.pack_int32`, the layout of compressed-tensors >= 0.18;
  for 2, 4 and 8 bits it equals older versions' 32//b codes a word, for 3 bits it does not), ``weight_scale``
  (float16 [out, n_groups]), ``weight_shape`` (int64 [2]) and, for asymmetric weights,
  ``weight_zero_point``. Every other floating tensor (embeddings, norms, 16-bit layers, an untied
  LM head) is stored in float16. A tied LM head is not stored; ``tie_word_embeddings`` says so.
- ``generation_config.json`` and the tokenizer files.

compressed-tensors stores signed codes ``code - 2**(b-1)`` and packs them with that offset added
back, so the packed nibbles are exactly our unsigned codes and its zero point is ``zero - 2**(b-1)``.

Two strategies describe our group grid (groups of ``group_size`` along the input dim):

- ``group``: the standard W{4,8}A16 layout vLLM serves. compressed-tensors 0.20 raises when
  ``group_size`` does not divide ``in_features``, and transformers 5.x cannot load asymmetric
  ``group`` checkpoints (the compressed module is built with an unpacked zero point, so the packed
  checkpoint tensor is a size mismatch), so it is only usable for symmetric weights with dividing
  groups in transformers; asymmetric ``group`` exports are for vLLM.
- ``block`` with ``block_structure [1, group_size]``: the same grid as 1-row blocks. compressed-tensors
  pads the last partial block and drops the padding after dequantizing, which is exactly our padded
  last group, and keeps the zero point unpacked (int8), which transformers loads. vLLM does not
  serve integer block weights.

``strategy="auto"`` picks ``group`` when transformers can load it (symmetric, every quantized
``in_features`` divisible by the group size) and ``block`` otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from core.errors import ExportError
from core.export._common import (
    LinearPlan,
    check_spec_grid,
    embeddings_tied,
    output_embedding_name,
    plan_linears,
    text_config,
    to_fp16,
    write_json,
)
from core.quant.packing import pack_int32
from core.spec import JobSpec
from core.types import QuantizedWeight

Strategy = Literal["auto", "group", "block"]
STRATEGIES = ("auto", "group", "block")

WEIGHTS_FILE = "model.safetensors"
#: fixed safetensors header metadata: nothing run-dependent goes into the file
SAFETENSORS_METADATA = {"format": "pt"}
#: config keys that name local paths or the in-memory dtype; dropped so the artifact is portable
_DROP_CONFIG_KEYS = ("_name_or_path", "torch_dtype", "quantization_config", "_commit_hash")


def choose_strategy(plans: list[LinearPlan], requested: str = "auto") -> str:
    """The compressed-tensors strategy for this export (see the module docstring)."""
    if requested not in STRATEGIES:
        raise ExportError(f"unknown compressed-tensors strategy '{requested}'; choose from {list(STRATEGIES)}")
    quantized = [p for p in plans if p.q is not None]
    if not quantized:
        return "group"
    dividing = all(p.q.shape[1] % p.q.group_size == 0 for p in quantized)
    symmetric = all(p.q.symmetric for p in quantized)
    if requested == "group":
        if not dividing:
            bad = next(p for p in quantized if p.q.shape[1] % p.q.group_size != 0)
            raise ExportError(
                f"compressed-tensors 'group' strategy needs group_size to divide in_features, but "
                f"{bad.name} has in_features {bad.q.shape[1]} and group_size {bad.q.group_size}; "
                "use a group size that divides every in_features or the 'block' strategy",
                details={"linear": bad.name, "in_features": bad.q.shape[1], "group_size": bad.q.group_size})
        return "group"
    if requested == "block":
        return "block"
    return "group" if (dividing and symmetric) else "block"


def quantized_tensors(q: QuantizedWeight, strategy: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one linear (names without the module prefix)."""
    out_features, in_features = q.shape
    codes = q.codes[:, :in_features].cpu().contiguous()  # padding columns are not stored
    tensors = {
        "weight_packed": pack_int32(codes, q.bits),
        "weight_scale": q.scale.detach().cpu().to(torch.float16).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if not q.symmetric:
        zero = q.zero_points().cpu()
        if strategy == "group":
            # packed along the output dim, as compressed-tensors and vLLM expect for group strategy
            tensors["weight_zero_point"] = pack_int32(zero.t().contiguous(), q.bits).t().contiguous()
        else:
            # block strategy keeps the zero point unpacked, signed like the codes
            tensors["weight_zero_point"] = (zero.to(torch.int16) - 2 ** (q.bits - 1)).to(torch.int8).contiguous()
    return tensors


def _weights_args(bits: int, group_size: int, symmetric: bool, strategy: str) -> dict:
    args = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False, "strategy": strategy}
    if strategy == "group":
        args["group_size"] = group_size
    else:
        args["block_structure"] = [1, group_size]
    return args


def quantization_config(plans: list[LinearPlan], lm_head: str | None, strategy: str) -> dict:
    """compressed-tensors ``quantization_config``: one config group per bit-width."""
    by_bits: dict[int, list[LinearPlan]] = {}
    for p in plans:
        if p.q is not None:
            by_bits.setdefault(p.bits, []).append(p)
    groups = {}
    for bits in sorted(by_bits):
        members = by_bits[bits]
        first = members[0].q
        groups[f"int{bits}"] = {
            "targets": [p.name for p in members],
            "weights": _weights_args(bits, first.group_size, first.symmetric, strategy),
            "input_activations": None,
            "output_activations": None,
        }
    ignore = [p.name for p in plans if p.q is None]
    if lm_head is not None:
        ignore.append(lm_head)
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _state_dict(model: nn.Module, plans: list[LinearPlan], strategy: str, skip: set[str]) -> dict[str, torch.Tensor]:
    by_weight = {f"{p.name}.weight": p for p in plans if p.q is not None}
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        plan = by_weight.get(key)
        if plan is not None:
            for suffix, tensor in quantized_tensors(plan.q, strategy).items():
                tensors[f"{plan.name}.{suffix}"] = tensor
        elif value.is_floating_point():
            tensors[key] = to_fp16(key, value)
        else:
            tensors[key] = value.detach().cpu().contiguous()
    return tensors


def _config_dict(model: nn.Module, qconfig: dict, tied: bool) -> dict:
    # only what differs from the class defaults, as save_pretrained writes it
    config = model.config.to_diff_dict()
    config["model_type"] = model.config.model_type
    for key in _DROP_CONFIG_KEYS:
        config.pop(key, None)
    config["dtype"] = "float16"
    config["architectures"] = [type(model).__name__]
    config["tie_word_embeddings"] = tied
    if qconfig["config_groups"]:
        config["quantization_config"] = qconfig
    # with every layer at 16 bits the directory is a plain float16 model, so it carries no
    # quantization_config (compressed-tensors needs at least one group to mean anything)
    return config


def _generation_config(model: nn.Module) -> dict:
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    if gen is None:
        gen = GenerationConfig.from_model_config(text_config(model))
    return gen.to_diff_dict()


def export_hf(model: nn.Module, tokenizer, weights: dict[str, QuantizedWeight], bit_map: dict[str, int],
              spec: JobSpec, out_dir: Path, *, strategy: Strategy = "auto") -> list[Path]:
    """Write a compressed-tensors HF model directory to `out_dir`; returns the files written.

    `weights` maps full linear names to their QuantizedWeight; `bit_map` maps every decoder
    layer, or every decoder linear (per-linear allocation), to 2/3/4/8/16. 16-bit linears,
    embeddings, norms and an untied LM head are stored in float16. Same inputs give byte-identical
    files. Raises ExportError when the weights, the bit map and the spec disagree, or the chosen
    strategy cannot represent the grid.
    """
    plans = plan_linears(model, weights, bit_map)
    check_spec_grid(plans, spec)
    chosen = choose_strategy(plans, strategy)
    tied = embeddings_tied(model)
    lm_head = output_embedding_name(model)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = {lm_head} if (tied and lm_head) else set()
    tensors = _state_dict(model, plans, chosen, skip)
    weights_path = out_dir / WEIGHTS_FILE
    save_file(tensors, str(weights_path), metadata=dict(SAFETENSORS_METADATA))

    lm_head_module = lm_head.rsplit(".", 1)[0] if lm_head else None
    written = [weights_path,
               write_json(out_dir / "config.json",
                          _config_dict(model, quantization_config(plans, lm_head_module, chosen), tied)),
               write_json(out_dir / "generation_config.json", _generation_config(model))]
    if tokenizer is not None:
        written += [Path(p) for p in tokenizer.save_pretrained(str(out_dir))]
    root = out_dir.resolve()
    files = sorted({Path(p).resolve() for p in written if Path(p).is_file()})
    outside = [p for p in files if root not in p.parents]
    if outside:
        raise ExportError(f"export wrote outside its directory: {outside[:1]}")
    return [out_dir / p.relative_to(root) for p in files]
