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
  Above ``max_shard_bytes`` the tensors go to ``model-0000i-of-0000N.safetensors`` shards with a
  ``model.safetensors.index.json`` (the Hugging Face convention). Written streaming: one source
  tensor and one quantized weight at a time, in state-dict order.
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

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from core.errors import ExportError
from core.export._common import (
    ExportedFile,
    Fp16Parts,
    LinearPlan,
    OutputGuard,
    TensorFetcher,
    embeddings_tied,
    hashed_file,
    load_weight,
    model_tensors,
    output_embedding_name,
    plan_linears,
    state_entries,
    text_config,
    write_json,
)
from core.export.safetensors_stream import SafetensorsStreamWriter, TensorSpec, plan_shards
from core.quant.packing import pack_int32
from core.scheme import QuantScheme
from core.spec import JobSpec
from core.types import BitMap, QuantizedWeight

Strategy = Literal["auto", "group", "block"]
STRATEGIES = ("auto", "group", "block")

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
#: fixed safetensors header metadata: nothing run-dependent goes into the file
SAFETENSORS_METADATA = {"format": "pt"}
#: config keys that name local paths or the in-memory dtype; dropped so the artifact is portable
_DROP_CONFIG_KEYS = ("_name_or_path", "torch_dtype", "quantization_config", "_commit_hash")


def choose_strategy(plans: list[LinearPlan], scheme: QuantScheme, requested: str = "auto") -> str:
    """The compressed-tensors strategy for this export (see the module docstring); the quantized
    linears' grid is the spec's (`load_weight` enforces it)."""
    if requested not in STRATEGIES:
        raise ExportError(f"unknown compressed-tensors strategy '{requested}'; choose from {list(STRATEGIES)}")
    quantized = [p for p in plans if p.quantized]
    if not quantized:
        return "group"
    not_dividing = [p for p in quantized if p.shape[1] % scheme.group_size_at(p.bits) != 0]
    if requested == "group":
        if not_dividing:
            bad = not_dividing[0]
            group_size = scheme.group_size_at(bad.bits)
            raise ExportError(
                f"compressed-tensors 'group' strategy needs group_size to divide in_features, but "
                f"{bad.name} has in_features {bad.shape[1]} and group_size {group_size}; "
                "use a group size that divides every in_features or the 'block' strategy",
                details={"linear": bad.name, "in_features": bad.shape[1], "group_size": group_size},
            )
        return "group"
    if requested == "block":
        return "block"
    return "group" if (not not_dividing and scheme.symmetric) else "block"


def quantized_tensors(q: QuantizedWeight, strategy: str) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one linear (names without the module prefix)."""
    out_features, in_features = q.shape
    codes = q.codes[:, :in_features].cpu().contiguous()  # padding columns are not stored
    tensors = {
        "weight_packed": pack_int32(codes, q.bits),
        "weight_scale": q.scale.detach().cpu().to(torch.float16).contiguous(),
        "weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),
    }
    if q.offset is not None:
        raise ExportError("compressed-tensors has no float zero point; export zero_point 'float' as gguf")
    if not q.symmetric:
        zero = q.zero_points().cpu()
        if strategy == "group":
            # packed along the output dim, as compressed-tensors and vLLM expect for group strategy
            tensors["weight_zero_point"] = pack_int32(zero.t().contiguous(), q.bits).t().contiguous()
        else:
            # block strategy keeps the zero point unpacked, signed like the codes
            tensors["weight_zero_point"] = (zero.to(torch.int16) - 2 ** (q.bits - 1)).to(torch.int8).contiguous()
    return tensors


def quantized_specs(plan: LinearPlan, group_size: int, symmetric: bool, strategy: str) -> list[TensorSpec]:
    """Names, dtypes and shapes `quantized_tensors` gives for this linear, known before loading it;
    widest dtype first, so the data of most tensors stays naturally aligned."""
    out_features, in_features = plan.shape
    groups = math.ceil(in_features / group_size)
    specs = [
        TensorSpec("weight_shape", torch.int64, (2,)),
        TensorSpec("weight_packed", torch.int32, (out_features, math.ceil(in_features * plan.bits / 32))),
        TensorSpec("weight_scale", torch.float16, (out_features, groups)),
    ]
    if not symmetric:
        if strategy == "group":
            specs.insert(
                2, TensorSpec("weight_zero_point", torch.int32, (math.ceil(out_features * plan.bits / 32), groups))
            )
        else:
            specs.append(TensorSpec("weight_zero_point", torch.int8, (out_features, groups)))
    return [TensorSpec(f"{plan.name}.{s.name}", s.dtype, s.shape) for s in specs]


def _weights_args(bits: int, group_size: int, symmetric: bool, strategy: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "dynamic": False,
        "strategy": strategy,
    }
    if strategy == "group":
        args["group_size"] = group_size
    else:
        args["block_structure"] = [1, group_size]
    return args


def quantization_config(
    plans: list[LinearPlan], lm_head: str | None, strategy: str, scheme: QuantScheme
) -> dict[str, Any]:
    """compressed-tensors ``quantization_config``: one config group per bit-width (each with its
    width's group size)."""
    by_bits: dict[int, list[LinearPlan]] = {}
    for p in plans:
        if p.quantized:
            by_bits.setdefault(p.bits, []).append(p)
    groups = {}
    for bits in sorted(by_bits):
        groups[f"int{bits}"] = {
            "targets": [p.name for p in by_bits[bits]],
            "weights": _weights_args(bits, scheme.group_size_at(bits), scheme.symmetric, strategy),
            "input_activations": None,
            "output_activations": None,
        }
    ignore = [p.name for p in plans if not p.quantized]
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


#: (state-dict name, its plan if quantized, the tensors stored for it)
_Group = tuple[str, LinearPlan | None, list[TensorSpec]]


def _tensor_groups(model: nn.Module, plans: list[LinearPlan], spec: JobSpec, strategy: str) -> list[_Group]:
    """[(state-dict name, its plan if quantized, the tensors stored for it)] in state-dict order."""
    by_weight = {f"{p.name}.weight": p for p in plans if p.quantized}
    scheme = spec.scheme
    groups: list[_Group] = []
    for key, value in state_entries(model):
        plan = by_weight.get(key)
        if plan is not None:
            specs = quantized_specs(plan, scheme.group_size_at(plan.bits), scheme.symmetric, strategy)
        else:
            dtype = torch.float16 if value.is_floating_point() else value.dtype
            specs = [TensorSpec(key, dtype, tuple(value.shape))]
        groups.append((key, plan, specs))
    return groups


def _shards(groups: list[_Group], max_shard_bytes: int) -> list[list[_Group]]:
    """Consecutive groups per file (a linear's tensors stay in one file)."""
    sizes = [sum(s.nbytes for s in specs) for _, _, specs in groups]
    return [[groups[k] for k in shard] for shard in plan_shards(sizes, max_shard_bytes)]


def _write_shard(
    path: Path,
    name: str,
    shard: list[_Group],
    fetch: TensorFetcher,
    weights: Mapping[str, QuantizedWeight],
    spec: JobSpec,
    strategy: str,
) -> ExportedFile:
    writer = SafetensorsStreamWriter(path, [s for _, _, specs in shard for s in specs], SAFETENSORS_METADATA, name)
    try:
        for key, plan, specs in shard:
            if plan is not None:
                stored = quantized_tensors(load_weight(plan, weights, spec), strategy)
                for s in specs:
                    writer.write(s.name, stored.pop(s.name.rsplit(".", 1)[1]))
                if stored:
                    raise ExportError(f"{plan.name}: unplanned tensors {sorted(stored)}")
                del stored
            else:
                value = fetch(key)
                if value.is_floating_point():
                    writer.write_parts(key, torch.float16, tuple(value.shape), Fp16Parts(key, value))
                else:
                    writer.write(key, value.detach().cpu().contiguous())
                del value  # not alive while the next tensor is read
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _config_dict(model: nn.Module, qconfig: dict[str, Any], tied: bool) -> dict[str, Any]:
    # only what differs from the class defaults, as save_pretrained writes it
    model_config: Any = model.config  # a transformers PretrainedConfig
    config: dict[str, Any] = model_config.to_diff_dict()
    config["model_type"] = model_config.model_type
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


def _generation_config(model: nn.Module) -> dict[str, Any]:
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    if gen is None:
        gen = GenerationConfig.from_model_config(text_config(model))
    diff: dict[str, Any] = gen.to_diff_dict()
    return diff


def export_hf(
    model: nn.Module,
    tokenizer: Any,
    weights: Mapping[str, QuantizedWeight],
    bit_map: BitMap,
    spec: JobSpec,
    out_dir: Path,
    *,
    strategy: Strategy = "auto",
    tensors: TensorFetcher | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[ExportedFile]:
    """Write a compressed-tensors HF model directory to `out_dir`; returns its files sorted by name.

    `model` gives config, structure and state-dict order (it may be a meta-device skeleton);
    `tensors` fetches each non-quantized tensor's values (default: `model`'s own). `weights` maps
    full linear names to QuantizedWeights and may load lazily: each is read once, when written.
    `bit_map` gives every decoder layer, or every decoder linear, a width (2/3/4/8/16). Same inputs give
    byte-identical files. Raises ExportError when the weights, the bit map and the spec disagree
    or the strategy cannot represent the grid; a failed export leaves no partial files.
    """
    plans = plan_linears(model, weights, bit_map)
    chosen = choose_strategy(plans, spec.scheme, strategy)
    tied = embeddings_tied(model)
    lm_head = output_embedding_name(model)
    fetch = tensors if tensors is not None else model_tensors(model)
    groups = _tensor_groups(model, plans, spec, chosen)
    shards = _shards(groups, max_shard_bytes)

    out_dir = Path(out_dir)
    written: list[ExportedFile] = []
    with OutputGuard(out_dir) as guard:
        names = (
            [WEIGHTS_FILE] if len(shards) == 1 else [SHARD_FILE.format(i + 1, len(shards)) for i in range(len(shards))]
        )
        for name, shard in zip(names, shards):
            guard.paths.append(out_dir / name)
            written.append(_write_shard(out_dir / name, name, shard, fetch, weights, spec, chosen))
        small = {}
        if len(shards) > 1:
            weight_map = {s.name: name for name, shard in zip(names, shards) for _, _, specs in shard for s in specs}
            total = sum(s.nbytes for _, _, specs in groups for s in specs)
            small[INDEX_FILE] = {"metadata": {"total_size": total}, "weight_map": weight_map}
        lm_head_module = lm_head.rsplit(".", 1)[0] if lm_head else None
        qconfig = quantization_config(plans, lm_head_module, chosen, spec.scheme)
        small["config.json"] = _config_dict(model, qconfig, tied)
        small["generation_config.json"] = _generation_config(model)
        for name, obj in small.items():
            guard.paths.append(out_dir / name)
            written.append(hashed_file(write_json(out_dir / name, obj), name))
        if tokenizer is not None:
            root = out_dir.resolve()
            for p in sorted({Path(p).resolve() for p in tokenizer.save_pretrained(str(out_dir))}):
                if root not in p.parents:
                    raise ExportError(f"export wrote outside its directory: {p}")
                guard.paths.append(p)
                if p.is_file():
                    rel = p.relative_to(root).as_posix()
                    written.append(hashed_file(out_dir / rel, rel))
    return sorted({f.name: f for f in written}.values(), key=lambda f: f.name)
