"""Streaming exports: a meta-device skeleton + a TensorFetcher + lazily loaded weights give the same
bytes as the in-memory export, each tensor and weight is read once and dropped after writing,
sharded HF directories load in transformers, returned hashes are the files' hashes, and the
streaming safetensors writer reads back exactly (tiny random Llama)."""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from export_helpers import MIXED, make_spec, quantize_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from core.export import export_gguf, export_hf
from core.export._common import Fp16Parts, to_fp16
from core.export.manifest import hf_storage
from core.export.safetensors_stream import SafetensorsStreamWriter, TensorSpec, write_safetensors

pytestmark = pytest.mark.unit


def skeleton(model):
    """The model's structure on the meta device: names, shapes and order, no values."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model.config)
    assert all(p.device.type == "meta" for p in empty.parameters())
    return empty


class Tracker:
    """Counts reads and holds weak references to what was handed out; every read checks that
    nothing handed out before is still alive (at most one source tensor / weight at a time)."""

    def __init__(self) -> None:
        self.reads: dict[str, int] = {}
        self.refs: list[weakref.ref] = []
        self.max_alive = 0

    def hand_out(self, name: str, tensor: torch.Tensor) -> None:
        self.max_alive = max(self.max_alive, self.alive())
        self.reads[name] = self.reads.get(name, 0) + 1
        self.refs.append(weakref.ref(tensor))

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.refs)


class Fetcher:
    """A TensorFetcher over a state dict that hands out fresh copies, as a checkpoint reader would."""

    def __init__(self, model, tracker: Tracker) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.tracker = tracker

    def __call__(self, name: str) -> torch.Tensor:
        tensor = self.state[name].clone()
        self.tracker.hand_out(name, tensor)
        return tensor


class LazyWeights(Mapping):
    """Quantized weights that 'load from storage' on each access (fresh tensors every time)."""

    def __init__(self, weights, tracker: Tracker) -> None:
        self._weights, self.tracker = weights, tracker

    def __getitem__(self, name):
        q = self._weights[name]
        q = replace(q, codes=q.codes.clone(), scale=q.scale.clone(), zero=None if q.zero is None else q.zero.clone())
        self.tracker.hand_out(name, q.codes)
        return q

    def __iter__(self):
        return iter(self._weights)

    def __len__(self):
        return len(self._weights)


def untied(model):
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


def expected_fetches(model, weights) -> set[str]:
    tied = model.config.tie_word_embeddings
    return {
        k
        for k in model.state_dict()
        if k.removesuffix(".weight") not in weights and not (tied and k == "lm_head.weight")
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------ exports


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_skeleton_fetcher_and_lazy_weights_give_the_in_memory_bytes(tiny, tmp_path, head):
    model, tokenizer = tiny
    model = model if head == "tied" else untied(model)
    bits, weights = quantize_model(model, MIXED, 32, False)
    spec = make_spec(32, False)
    empty = skeleton(model)

    for kind in ("hf", "gguf"):
        tracker = Tracker()
        lazy, fetch = LazyWeights(weights, tracker), Fetcher(model, tracker)
        if kind == "hf":
            ref = export_hf(model, tokenizer, weights, bits, spec, tmp_path / "ref-hf")
            got = export_hf(empty, tokenizer, lazy, bits, spec, tmp_path / "hf", tensors=fetch)
            assert [(f.name, f.size, f.sha256) for f in got] == [(f.name, f.size, f.sha256) for f in ref]
        else:
            ref = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "ref.gguf")
            got = export_gguf(empty, tokenizer, lazy, bits, spec, tmp_path / "m.gguf", tensors=fetch)
            assert (got.size, got.sha256) == (ref.size, ref.sha256)
            assert got.path.read_bytes() == ref.path.read_bytes()
        assert tracker.reads == {**dict.fromkeys(expected_fetches(model, weights), 1), **dict.fromkeys(weights, 1)}, (
            kind
        )
        # one tensor or weight handed out at a time, none kept after the export
        assert tracker.max_alive == 0 and tracker.alive() == 0, kind


def test_float16_tensors_written_by_row_slices_give_the_same_bytes(tiny, tmp_path, monkeypatch):
    from core.export import _common

    model, tokenizer = tiny
    model = untied(model)
    bits, weights = quantize_model(model, MIXED, 32, False)
    spec = make_spec(32, False)
    whole_hf = export_hf(model, tokenizer, weights, bits, spec, tmp_path / "hf")
    whole_gguf = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "m.gguf")
    monkeypatch.setattr(_common, "_FINITE_CHECK_ELEMENTS", 100)  # many slices of a few rows each
    assert len(list(Fp16Parts("w", model.get_input_embeddings().weight.detach()))) > 3
    sliced_hf = export_hf(model, tokenizer, weights, bits, spec, tmp_path / "hf-sliced")
    sliced_gguf = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "sliced.gguf")
    assert [(f.name, f.sha256) for f in sliced_hf] == [(f.name, f.sha256) for f in whole_hf]
    assert sliced_gguf.sha256 == whole_gguf.sha256


@pytest.mark.parametrize(
    "widths, group_size, symmetric",
    [((2, 3, 16, 8), 16, False), ((4, 8, 4, 16), 64, True)],
    ids=["requantized-g16", "padded-g64"],
)
def test_one_fetched_tensor_or_weight_alive_at_a_time(tiny, tmp_path, widths, group_size, symmetric):
    """Nothing the exporters read is kept: when the next tensor or weight is read, every earlier
    one has been freed (weak references), through every conversion path and with shards."""
    model, tokenizer = tiny
    bits, weights = quantize_model(model, widths, group_size, symmetric)
    spec = make_spec(group_size, symmetric)
    empty = skeleton(model)
    runs = {
        "hf": lambda w, f: export_hf(empty, tokenizer, w, bits, spec, tmp_path / "hf", tensors=f),
        "hf-sharded": lambda w, f: export_hf(
            empty, tokenizer, w, bits, spec, tmp_path / "sh", tensors=f, max_shard_bytes=100_000
        ),
        "gguf": lambda w, f: export_gguf(empty, tokenizer, w, bits, spec, tmp_path / "m.gguf", tensors=f),
    }
    for kind, run in runs.items():
        tracker = Tracker()
        run(LazyWeights(weights, tracker), Fetcher(model, tracker))
        assert len(tracker.refs) == len(expected_fetches(model, weights)) + len(weights), kind
        assert tracker.max_alive == 0 and tracker.alive() == 0, kind


def test_sharded_directory_loads_in_transformers_like_the_single_file(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 32, False)
    spec = make_spec(32, False)
    single = export_hf(model, tokenizer, weights, bits, spec, tmp_path / "one")
    tracker = Tracker()
    sharded = export_hf(
        skeleton(model),
        tokenizer,
        LazyWeights(weights, tracker),
        bits,
        spec,
        tmp_path / "many",
        tensors=Fetcher(model, tracker),
        max_shard_bytes=200_000,
    )
    assert tracker.max_alive == 0

    names = [f.name for f in sharded]
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert {f.name for f in single} - {"model.safetensors"} == set(names) - set(shards) - {
        "model.safetensors.index.json"
    }

    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    stored, total = {}, 0
    for shard in shards:
        data, modules = 0, set()
        with safe_open(str(tmp_path / "many" / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - a safe_open handle has keys(), no __iter__
                tensor = f.get_tensor(key)
                stored[key] = (shard, tensor)
                data += tensor.numel() * tensor.element_size()
                modules.add(key.rsplit(".", 1)[0])
        total += data
        # within the limit, or one tensor / one linear larger than it (the 9.4 MB embedding)
        assert data <= 200_000 or len(modules) == 1, (shard, data, modules)
    assert index["weight_map"] == {k: shard for k, (shard, _) in stored.items()}
    assert index["metadata"] == {"total_size": total}
    # a quantized linear's tensors stay in one file
    for key in stored:
        if key.endswith(".weight_packed"):
            module = key.removesuffix(".weight_packed")
            assert {index["weight_map"][k] for k in index["weight_map"] if k.startswith(module + ".")} == {
                index["weight_map"][key]
            }
    with safe_open(str(tmp_path / "one" / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(stored)
        for key in f.keys():  # noqa: SIM118 - a safe_open handle has keys(), no __iter__
            assert torch.equal(f.get_tensor(key), stored[key][1]), key
    assert hf_storage(tmp_path / "many") == hf_storage(tmp_path / "one")

    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one", dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "many", dtype=torch.float32).eval()
    batch = tokenizer(["The capital of France is", "1, 2, 3,"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(a(**batch).logits, b(**batch).logits)


def test_returned_sizes_and_hashes_are_the_files(tiny, tmp_path):
    model, tokenizer = tiny
    bits, weights = quantize_model(model, MIXED, 64, True)
    spec = make_spec(64, True)
    for out, shard_bytes in ((tmp_path / "one", 2 * 1024**3), (tmp_path / "many", 300_000)):
        files = export_hf(model, tokenizer, weights, bits, spec, out, max_shard_bytes=shard_bytes)
        on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        assert [f.name for f in files] == on_disk
        for f in files:
            assert f.path == out / f.name
            assert (f.size, f.sha256) == (f.path.stat().st_size, sha(f.path)), f.name
    gguf = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "g" / "model.gguf")
    assert gguf.name == "model.gguf" and gguf.path == tmp_path / "g" / "model.gguf"
    assert (gguf.size, gguf.sha256) == (gguf.path.stat().st_size, sha(gguf.path))
    assert Path(gguf) == gguf.path  # os.PathLike, for callers that expected a Path


def test_streaming_gguf_equals_gguf_py_in_memory_writer(tiny, tmp_path):
    """The same tensors given to GGUFWriter.add_tensor + write_tensors_to_file (how the exporter
    wrote before it streamed) give the same bytes as the streamed file."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from core.export import gguf as g
    from core.export._common import model_tensors, plan_linears

    model, tokenizer = tiny
    for group_size, symmetric in ((32, False), (64, True), (16, False)):
        bits, weights = quantize_model(model, (4, 8, 16, 3), group_size, symmetric)
        spec = make_spec(group_size, symmetric)
        streamed = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "s.gguf")

        hyper = g.LlamaHyper(model)
        planned = g._plan(model, plan_linears(model, weights, bits), spec)
        writer = GGUFWriter(path=None, arch=g.ARCH)
        g.hf_metadata(writer, tokenizer, hyper, spec.model, g._file_type(planned))
        fetch = model_tensors(model)
        for entry in planned:
            raw = None if entry.qtype in ("F16", "F32") else GGMLQuantizationType[entry.qtype]
            data = g._array(entry, fetch, weights, spec, hyper)
            if isinstance(data, Fp16Parts):  # converted whole here, by slices in the exporter
                data = to_fp16(data.name, data.value).numpy()
            writer.add_tensor(entry.name, np.ascontiguousarray(data), raw_dtype=raw)
        writer.write_header_to_file(path=tmp_path / "m.gguf")
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        assert streamed.path.read_bytes() == (tmp_path / "m.gguf").read_bytes(), (group_size, symmetric)


# ------------------------------------------------------------------------------------------ safetensors writer


def sample_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "odd.int8": torch.randint(-128, 127, (3, 5), dtype=torch.int8, generator=gen),  # 15 bytes: misaligns the rest
        "a.f16": torch.randn(4, 6, generator=gen).half(),
        "b.bf16": torch.randn(7, generator=gen).bfloat16(),
        "c.f32": torch.randn(2, 3, 4, generator=gen),
        "d.i64": torch.tensor([96, 192]),
        "e.i32": torch.randint(-(2**31), 2**31 - 1, (3, 2), dtype=torch.int32, generator=gen),
        "f.u8": torch.arange(9, dtype=torch.uint8),
        "g.bool": torch.tensor([True, False, True]),
        "h.scalar": torch.tensor(3.5),
        "i.empty": torch.zeros(0, 4),
        "j.f64": torch.randn(3, generator=gen, dtype=torch.float64),
        "ünïcode.name": torch.ones(2),
    }


def test_streaming_safetensors_round_trip_and_determinism(tmp_path):
    tensors = sample_tensors()
    first = write_safetensors(tmp_path / "a.safetensors", tensors, {"format": "pt"})
    second = write_safetensors(tmp_path / "b.safetensors", tensors, {"format": "pt"})
    data = first.path.read_bytes()
    assert data == second.path.read_bytes()
    assert (first.size, first.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    header_len = int.from_bytes(data[:8], "little")
    assert header_len % 8 == 0
    with safe_open(str(first.path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(got, tensor), name
    # stored in the order given
    header = json.loads(data[8 : 8 + header_len])
    assert [k for k in header if k != "__metadata__"] == list(tensors)


def test_same_bytes_as_the_safetensors_library_in_its_order(tmp_path):
    """Given the library's tensor order, the streamed file is byte-identical to save_file's."""
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    data = (tmp_path / "lib.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    ours = write_safetensors(tmp_path / "ours.safetensors", {k: tensors[k] for k in order}, {"format": "pt"})
    assert ours.path.read_bytes() == data


def test_streaming_writer_refuses_what_was_not_planned(tmp_path):
    specs = [TensorSpec("a", torch.float16, (2, 2)), TensorSpec("b", torch.int32, (3,))]
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs, {"format": "pt"}, "x.safetensors")
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="expected a"):
        writer.write("a", torch.zeros(2, 2))  # float32, planned float16
    with pytest.raises(ValueError, match="6 bytes written, planned 8"):  # a part missing
        writer.write_parts("a", torch.float16, (2, 2), [torch.zeros(3, dtype=torch.float16)])
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs, {"format": "pt"}, "x.safetensors")
    with pytest.raises(ValueError, match="a part of dtype torch.float32"):
        writer.write_parts("a", torch.float16, (2, 2), [torch.zeros(2)])
    writer = SafetensorsStreamWriter(tmp_path / "x.safetensors", specs, {"format": "pt"}, "x.safetensors")
    writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match="not written"):
        writer.close()
    with pytest.raises(ValueError, match="duplicate"):
        SafetensorsStreamWriter(tmp_path / "y.safetensors", specs + specs[:1], {}, "y.safetensors")


def test_fp16_conversion_refuses_overflow_in_any_slice_and_passes_source_nan(monkeypatch) -> None:
    from core.errors import ExportError
    from core.export import _common

    monkeypatch.setattr(_common, "_FINITE_CHECK_ELEMENTS", 4)  # 3 slices of a 3×4 tensor
    value = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    assert torch.equal(_common.to_fp16("w", value), value.to(torch.float16))
    over = value.clone()
    over[2, 1] = 1e6  # only the last slice overflows
    with pytest.raises(ExportError, match="w has values outside the float16 range"):
        _common.to_fp16("w", over)
    nan = value.clone()
    nan[1, 0] = float("nan")  # a NaN the source already had is carried, not refused
    assert torch.isnan(_common.to_fp16("w", nan)[1, 0])
