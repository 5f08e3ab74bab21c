"""What each inference runtime loads, so a job with `target_runtime` produces an artifact it serves.

One `RuntimeRules` entry per runtime (a new runtime is one entry). The spec validator refuses a menu
the runtime cannot load (`spec_problems`); the load stage and the submit check refuse a model whose
shapes the runtime's layout cannot carry (`shape_problems`); the HF export asks for the layout the
runtime reads (`hf_strategy`).

* **vLLM** (compressed-tensors W{4,8}A16, `CompressedTensorsWNA16`, as read from vLLM's source):
  weight-only integer schemes with strategy `group` or `channel` only (the `block` layout our
  asymmetric default writes is not served); 4 or 8 bits, symmetric (`uint4b8`/`uint8b128`) or with
  zero points (`uint4`/`uint8`); the Marlin kernels take group sizes 32, 64 and 128, and the group
  must divide every quantized linear's in_features; the shards vLLM fuses (q/k/v, gate/up) must
  share one scheme, which both allocation units guarantee (a layer, or a fused unit, gets one width).
* **llama.cpp** reads the `gguf` export: 4-bit groups become Q4_0/Q4_1, 5-bit Q5_0/Q5_1 and 8-bit
  Q8_0 blocks of 32 exactly when the group size is a multiple of 32; 2/3-bit widths would be stored
  as 4-bit blocks and 6/7-bit ones as Q8_0 (the budget would count bits the file does not save), so
  the menu is 4/5/8/16, and 6 with `k_quants` on a symmetric grid, where every quantized linear's
  in_features is a multiple of 256 (Q6_K super-blocks; the model's shapes are checked at submit
  and at load).
* **transformers** loads every width and both layouts of the `hf` export (block layout for
  asymmetric weights, see docs/ARTIFACTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from core.errors import InvalidSpec
from core.scheme import SUPER_BLOCK

__all__ = ["RUNTIMES", "RuntimeRules", "check_shapes", "hf_strategy", "shape_problems", "spec_problems"]

#: compressed-tensors layouts of the HF export (core.export.hf.Strategy)
HfStrategy = Literal["auto", "group", "block"]


@dataclass(frozen=True)
class RuntimeRules:
    """What one runtime loads: widths (16 = kept in float16), group sizes (None: any),
    a group-size multiple (None: any), the export format it reads and the HF layout it needs."""

    name: str
    bits: frozenset[int]
    group_sizes: frozenset[int] | None
    group_multiple: int | None
    export: str
    hf_strategy: HfStrategy
    #: the group size must divide every quantized linear's in_features
    group_divides_width: bool
    #: widths loaded only as K-quant super-blocks (`k_quants`): every quantized linear's
    #: in_features a multiple of SUPER_BLOCK
    k_quant_bits: frozenset[int] = frozenset()


RUNTIMES: dict[str, RuntimeRules] = {
    "vllm": RuntimeRules(
        name="vllm",
        bits=frozenset({4, 8, 16}),
        group_sizes=frozenset({32, 64, 128}),
        group_multiple=None,
        export="hf",
        hf_strategy="group",
        group_divides_width=True,
    ),
    "llama.cpp": RuntimeRules(
        name="llama.cpp",
        bits=frozenset({4, 5, 8, 16}),
        group_sizes=None,
        group_multiple=32,
        export="gguf",
        hf_strategy="auto",
        group_divides_width=False,
        k_quant_bits=frozenset({6}),
    ),
    "transformers": RuntimeRules(
        name="transformers",
        bits=frozenset({2, 3, 4, 5, 6, 7, 8, 16}),
        group_sizes=None,
        group_multiple=None,
        export="hf",
        hf_strategy="auto",
        group_divides_width=False,
    ),
}


def spec_problems(
    runtime: str,
    *,
    bit_choices: list[int],
    group_sizes: Sequence[int],
    exports: list[str],
    k_quant_widths: Sequence[int] = (),
) -> list[str]:
    """Why a spec's menu does not load in `runtime` (empty when it does), each a sentence a user
    can act on; `group_sizes`: those of the quantized widths; `k_quant_widths`: the widths the spec
    stores in K-quant super-blocks."""
    rules = RUNTIMES[runtime]
    problems: list[str] = []
    extra = sorted(set(bit_choices) - rules.bits - (rules.k_quant_bits & set(k_quant_widths)))
    if extra:
        also = (
            f" ({', '.join(map(str, sorted(rules.k_quant_bits)))} with k_quants on a symmetric grid)"
            if rules.k_quant_bits
            else ""
        )
        problems.append(
            f"target_runtime '{runtime}' loads widths {sorted(rules.bits)}{also}; remove {extra} from bit_choices"
        )
    for group_size in group_sizes:
        if rules.group_sizes is not None and group_size not in rules.group_sizes:
            problems.append(
                f"target_runtime '{runtime}' needs group_size in {sorted(rules.group_sizes)}, got {group_size}"
            )
        if rules.group_multiple is not None and group_size % rules.group_multiple:
            problems.append(
                f"target_runtime '{runtime}' needs group_size a multiple of {rules.group_multiple}, got {group_size}"
            )
    if rules.export not in exports:
        problems.append(f"target_runtime '{runtime}' loads the '{rules.export}' export; add it to exports")
    return problems


def shape_problems(
    runtime: str, *, in_features: Mapping[str, int], group_sizes: Sequence[int], k_quant_widths: Sequence[int] = ()
) -> list[str]:
    """Why the model's quantizable linears (name → in_features) cannot carry `runtime`'s layout
    with any of `group_sizes` (those of the quantized widths), or its K-quant-only widths among
    `k_quant_widths`."""
    rules = RUNTIMES[runtime]
    problems = _super_block_problems(runtime, rules, in_features, k_quant_widths)
    if rules.group_divides_width:
        problems += [p for g in group_sizes for p in _group_problems(runtime, rules, in_features, g)]
    return problems


def _super_block_problems(
    runtime: str, rules: RuntimeRules, in_features: Mapping[str, int], k_quant_widths: Sequence[int]
) -> list[str]:
    widths = sorted(rules.k_quant_bits & set(k_quant_widths))
    bad = {name: n for name, n in in_features.items() if n % SUPER_BLOCK}
    if not widths or not bad:
        return []
    name, width = next(iter(bad.items()))
    return [
        f"target_runtime '{runtime}' loads {widths}-bit weights only as K-quant super-blocks of {SUPER_BLOCK} "
        f"inputs, but {len(bad)} linears (e.g. {name}, in_features {width}) are not multiples of {SUPER_BLOCK}: "
        f"remove {widths} from bit_choices"
    ]


def _group_problems(runtime: str, rules: RuntimeRules, in_features: Mapping[str, int], group_size: int) -> list[str]:
    bad = {name: n for name, n in in_features.items() if n % group_size}
    if not bad:
        return []
    name, width = next(iter(bad.items()))
    widths = sorted(set(bad.values()))
    dividing = [g for g in sorted(rules.group_sizes or ()) if all(n % g == 0 for n in in_features.values())]
    hint = f"use group_size {dividing[-1]}" if dividing else "no group size it accepts divides them all"
    return [
        f"target_runtime '{runtime}' needs group_size to divide every quantized linear's in_features, "
        f"but {len(bad)} linears (e.g. {name}, in_features {width}; widths {widths}) are not multiples "
        f"of {group_size}: {hint}"
    ]


def check_shapes(
    runtime: str | None,
    *,
    in_features: Mapping[str, int],
    group_sizes: Sequence[int],
    k_quant_widths: Sequence[int] = (),
) -> None:
    """InvalidSpec naming the fix when `shape_problems` finds any (None: no target, nothing to check).
    The submit check passes the widths from the model's config, the load stage the real linears'."""
    if runtime is None:
        return
    problems = shape_problems(runtime, in_features=in_features, group_sizes=group_sizes, k_quant_widths=k_quant_widths)
    if problems:
        raise InvalidSpec("; ".join(problems))


def hf_strategy(runtime: str | None) -> HfStrategy:
    """The compressed-tensors layout the HF export writes for `runtime` (None: `auto`); the spec's
    `TargetRuntime` is a str enum, so it is passed as it is."""
    return "auto" if runtime is None else RUNTIMES[runtime].hf_strategy
