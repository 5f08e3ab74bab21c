"""GGUF export for llama-architecture models: one file llama.cpp and transformers (``gguf_file=``) load.

Tensor types (docs/ARTIFACTS.md has the full mapping and its exactness):
- quantized linears: 6-8 bits -> Q8_0, 5 bits -> Q5_1 / Q5_0, <= 4 bits -> Q4_1 (asymmetric) /
  Q4_0 (symmetric), float zero points -> Q4_1 / Q5_1 (d = scale, m = offset), under `k_quants`
  4/5-bit float zero points (symmetric 6-bit weights) of linears with 256 | in_features -> Q4_K /
  Q5_K (Q6_K)
  (`core.export.ggml_kquants`, always exact), encoded from our codes exactly where the block
  format allows (`core.export.ggml_blocks`); a linear whose
  ``in_features`` is not a multiple of 32 cannot be block-quantized and is stored F16;
- 16-bit layers' linears, the token embedding and an untied LM head: F16 (the same float16 values
  the HF export stores); norms: F32.

llama.cpp applies rope to q/k in its interleaved-pair convention, so (like its converter) we store
q_proj / k_proj rows permuted per head; transformers' GGUF loader undoes it. Rows move as a whole
and groups run along the input dim, so the permutation moves codes, scales and zeros together and
the exact mapping survives.

Metadata: from a GGUF source (SmolLM2) every key of the source is copied (hyperparameters,
tokenizer, general.*) except the file type, which describes our tensors. From an HF directory the
llama hyperparameters and a byte-level BPE ("gpt2") tokenizer are written from the config and the
tokenizer. Same inputs give byte-identical files.

Streaming: every tensor's name, type and size is planned first; GGUFWriter writes header, metadata
and tensor infos, then each tensor is produced just before it is written.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from core.errors import ExportError
from core.export._common import (
    ExportedFile,
    Fp16Parts,
    HashingWriter,
    LinearPlan,
    OutputGuard,
    TensorFetcher,
    load_weight,
    model_tensors,
    plan_linears,
    state_entries,
    to_fp16,
)
from core.export.ggml_blocks import BLOCK, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, encode_quantized, target_type
from core.export.ggml_kquants import Q4_K, Q5_K, Q6_K, SUPER_BLOCK_BYTES, encode_super_blocks, super_type
from core.export.gguf_metadata import ARCH, LlamaHyper, copy_source_metadata, hf_metadata
from core.spec import JobSpec
from core.types import BitMap, QuantizedWeight

if TYPE_CHECKING:
    from gguf import GGUFEndian, GGUFWriter


_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_NORM_SUFFIX = "_norm.weight"


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of an HF llama parameter (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``); ExportError for tensors llama.cpp's llama graph has no slot for."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    match = _LAYER_RE.match(hf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"blk.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"
    raise ExportError(f"no GGUF llama tensor for '{hf_name}' (biases and extra modules are not supported)")


def rope_row_permutation(rows: int, n_head: int) -> torch.Tensor:
    """Row order llama.cpp expects for a q/k projection: within each head, the first and second
    half of the rotary dims are interleaved ([0, h, 1, h+1, ...] with h = head_dim / 2)."""
    head_dim = rows // n_head
    if head_dim * n_head != rows or head_dim % 2:
        raise ExportError(f"cannot permute {rows} rows into {n_head} heads for rope")
    idx = torch.arange(rows).reshape(n_head, 2, head_dim // 2)
    return idx.transpose(1, 2).reshape(rows)


def _permute_q(q: QuantizedWeight, idx: torch.Tensor) -> QuantizedWeight:
    return replace(
        q,
        codes=q.codes[idx],
        scale=q.scale[idx],
        zero=None if q.zero is None else q.zero[idx],
        offset=None if q.offset is None else q.offset[idx],
    )


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Planned:
    """One GGUF tensor before its data exists: state-dict name, GGUF name, GGML type, [rows, cols]."""

    key: str
    name: str
    qtype: str
    shape: tuple[int, ...]
    linear: LinearPlan | None


def _plan(model: nn.Module, plans: list[LinearPlan], spec: JobSpec) -> list[_Planned]:
    """Every tensor of the file in state-dict order (a tied LM head is not stored)."""
    by_weight = {f"{p.name}.weight": p for p in plans}
    planned = []
    for key, value in state_entries(model):
        name, plan = gguf_tensor_name(key), by_weight.get(key)
        if plan is None:
            qtype = "F32" if name.endswith(_NORM_SUFFIX) else "F16"
        elif not plan.quantized or plan.shape[1] % BLOCK != 0:
            qtype = "F16"  # GGML blocks need rows of whole 32-blocks: such a linear is kept dequantized
        elif spec.scheme.superblocks_at(plan.bits, plan.shape[1]):
            qtype = super_type(plan.bits)
        else:
            qtype = target_type(plan.bits, spec.symmetric)
        planned.append(_Planned(key, name, qtype, tuple(int(s) for s in value.shape), plan))
    return planned


def _array(
    entry: _Planned, fetch: TensorFetcher, weights: Mapping[str, QuantizedWeight], spec: JobSpec, hyper: LlamaHyper
) -> np.ndarray | Fp16Parts:
    """One tensor's data; q/k rows permuted for llama.cpp's rope."""
    from core.quant.primitives import dequantize_weight

    linear, idx = entry.linear, None
    if linear is not None and linear.name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        heads = hyper.n_head if linear.name.endswith("q_proj") else hyper.n_head_kv
        idx = rope_row_permutation(linear.shape[0], heads)
    if linear is None or not linear.quantized:
        value = fetch(entry.key)
        if entry.qtype == "F32":
            return value.detach().cpu().to(torch.float32).numpy()
        return Fp16Parts(entry.key, value[idx] if idx is not None else value)
    q = load_weight(linear, weights, spec)
    q = _permute_q(q, idx) if idx is not None else q
    if entry.qtype == "F16":
        return to_fp16(linear.name, dequantize_weight(q, torch.float32)).numpy()
    encoded = encode_super_blocks(q) if entry.qtype in SUPER_BLOCK_BYTES else encode_quantized(q)
    if encoded is None:
        raise ExportError(
            f"{linear.name}: its scales (and offsets) are not on K-quant super-blocks (k_quants); "
            "the checkpoint was quantized on another grid"
        )
    if encoded.qtype != entry.qtype:
        raise ExportError(f"{linear.name}: encoded as {encoded.qtype}, planned {entry.qtype}")
    return encoded.data


def _file_type(planned: list[_Planned]) -> int:
    """general.file_type: the GGML type holding most of the decoder linears' weights."""
    from gguf import LlamaFileType

    file_types = {
        Q4_0: LlamaFileType.MOSTLY_Q4_0,
        Q4_1: LlamaFileType.MOSTLY_Q4_1,
        Q5_0: LlamaFileType.MOSTLY_Q5_0,
        Q5_1: LlamaFileType.MOSTLY_Q5_1,
        Q8_0: LlamaFileType.MOSTLY_Q8_0,
        Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
        Q5_K: LlamaFileType.MOSTLY_Q5_K_S,
        Q6_K: LlamaFileType.MOSTLY_Q6_K,
        "F16": LlamaFileType.MOSTLY_F16,
    }
    counts: Counter[str] = Counter()
    for entry in planned:
        if entry.linear is not None:
            counts[entry.qtype] += entry.linear.shape[0] * entry.linear.shape[1]
    # ties broken by type name so the choice never depends on iteration order
    best = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else "F16"
    return int(file_types[best])


def _hashing_writer(sink: HashingWriter) -> GGUFWriter:
    """A GGUFWriter writing through `sink`. Its tensor data goes out with numpy's tofile, which
    writes to the file descriptor past any wrapper (unhashed), so here it goes out with write()."""
    from gguf import GGUFWriter
    from gguf.gguf_writer import WriterState

    file: Any = sink  # what GGUFWriter writes to: a file, as far as it is concerned

    class _Writer(GGUFWriter):
        def open_output_file(self, path: Path | None = None) -> None:
            if self.state is WriterState.NO_FILE:
                self.fout = [file]
                self.state = WriterState.EMPTY

        def write_tensor_data(
            self, tensor: np.ndarray[Any, Any] | Fp16Parts, tensor_endianess: GGUFEndian | None = None
        ) -> None:
            if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS):
                raise ValueError(f"tensor data before tensor info ({self.state})")
            info = self.tensors[0].pop(next(iter(self.tensors[0])))
            if info.nbytes != tensor.nbytes:
                raise ExportError(f"tensor data of {tensor.nbytes} bytes, planned {info.nbytes}")
            self.write_padding(file, sink.tell())
            if isinstance(tensor, Fp16Parts):
                for part in tensor:
                    sink.write(part.numpy().reshape(-1).view(np.uint8))
            else:
                sink.write(np.ascontiguousarray(tensor).reshape(-1).view(np.uint8))
            self.write_padding(file, tensor.nbytes)
            self.state = WriterState.WEIGHTS

    return _Writer(path=None, arch=ARCH)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    weights: Mapping[str, QuantizedWeight],
    bit_map: BitMap,
    spec: JobSpec,
    out_path: Path,
    source_gguf: Path | None = None,
    *,
    tensors: TensorFetcher | None = None,
) -> ExportedFile:
    """Write one llama GGUF file to `out_path`; returns it with its size and sha256.

    `model` gives config, structure and state-dict order (it may be a meta-device skeleton);
    `tensors` fetches each non-quantized tensor's values (default: `model`'s own). `weights` may
    load lazily: each is read once, when written. `source_gguf`: the GGUF the model was loaded
    from; its metadata (tokenizer included) is copied. Without it the hyperparameters and
    tokenizer are written from the model config and `tokenizer`. Raises ExportError for non-llama
    models, inconsistent weights / bit map, or a source GGUF that does not describe this model;
    a failed export leaves no partial file.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    hyper = LlamaHyper(model)
    plans = plan_linears(model, weights, bit_map)
    planned = _plan(model, plans, spec)
    file_type = _file_type(planned)
    fetch = tensors if tensors is not None else model_tensors(model)

    out_path = Path(out_path)
    with OutputGuard(out_path.parent) as guard:
        guard.paths.append(out_path)
        sink = HashingWriter(out_path)
        writer = _hashing_writer(sink)
        try:
            if source_gguf is not None:
                copy_source_metadata(writer, Path(source_gguf), hyper, file_type)
            else:
                hf_metadata(writer, tokenizer, hyper, spec.model, file_type)
            for e in planned:  # shapes and sizes as add_tensor would record the arrays
                if e.qtype in ("F16", "F32"):
                    dtype = np.dtype(np.float16 if e.qtype == "F16" else np.float32)
                    writer.add_tensor_info(e.name, e.shape, dtype, int(np.prod(e.shape)) * dtype.itemsize)
                else:  # block types: a uint8 array of the bytes
                    raw = GGMLQuantizationType[e.qtype]
                    byte_shape = quant_shape_to_byte_shape(e.shape, raw)
                    writer.add_tensor_info(e.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for entry in planned:
                # one tensor alive at a time: produced, written, dropped
                # _Writer.write_tensor_data also takes the Fp16Parts _array returns for big float tensors
                writer.write_tensor_data(_array(entry, fetch, weights, spec, hyper))  # type: ignore[arg-type]
        finally:
            writer.close()
            sink.close()
    return sink.result(out_path.name)
