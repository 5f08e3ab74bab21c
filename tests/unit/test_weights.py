"""Lazy weight readers (core.weights): values equal what transformers loads, every broken-checkpoint
case is a ModelInvalid naming the file or tensor (never a server path), headers are checked without
reading tensor data, nothing is memory-mapped and RSS stays bounded while streaming a checkpoint."""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
from pathlib import Path

import accelerate
import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from core.errors import ModelInvalid
from core.weights import inspect_checkpoint, open_weights, validate_shapes
from core.weights.gguf_reader import parse_gguf_header

pytestmark = pytest.mark.unit

EMBED = "model.embed_tokens.weight"
INDEX = "model.safetensors.index.json"


# ---- helpers ------------------------------------------------------------------------------------


def _tiny_llama_config(**kw) -> LlamaConfig:
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**base, **kw})


def _raw_safetensors(path: Path, header: object, data: bytes, *, header_bytes: bytes | None = None) -> None:
    body = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _two_tensor_header() -> dict:
    return {
        "a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "b": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 128]},
    }


def _sharded(directory: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for file, tensors in shards.items():
        save_file(tensors, str(directory / file))
    if weight_map is None:
        weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _two_shards(directory: Path) -> None:
    g = torch.Generator().manual_seed(1)
    _sharded(
        directory,
        {
            "s1.safetensors": {"a": torch.randn(4, 4, generator=g)},
            "s2.safetensors": {"b": torch.randn(2, 3, generator=g)},
        },
    )


def _read_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (offset, length) of every positioned read."""
    calls: list[tuple[int, int]] = []
    real_pread, real_preadv = os.pread, os.preadv

    def pread(fd, n, offset):
        out = real_pread(fd, n, offset)
        calls.append((offset, len(out)))
        return out

    def preadv(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        calls.append((offset, got))
        return got

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _mapped(path: Path) -> bool:
    return str(path.resolve()) in Path("/proc/self/maps").read_text()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _write_gguf(path: Path, arch: str, skeleton: torch.nn.Module, types: dict[str, Q], extra) -> dict[str, np.ndarray]:
    """A GGUF of random weights for `skeleton`'s parameters (GGUF names from gguf-py's own map),
    quantized per name fragment in `types`; returns the float32 values written, by GGUF name."""
    cfg = skeleton.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    extra(writer)
    gguf_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    g = torch.Generator().manual_seed(0)
    written: dict[str, np.ndarray] = {}
    for name, param in skeleton.state_dict().items():
        if name == "lm_head.weight":  # tied: llama.cpp stores no output.weight
            continue
        base, suffix = name.rsplit(".", 1)
        gname = f"{names.get_name(base)}.{suffix}"
        values = torch.randn(param.shape, generator=g).numpy().astype(np.float32)
        written[gname] = values
        qtype = next((t for key, t in types.items() if key in gname), Q.F32) if values.ndim == 2 else Q.F32
        if qtype == Q.F32:
            writer.add_tensor(gname, values)
        elif qtype == Q.F16:
            writer.add_tensor(gname, values.astype(np.float16))
        else:
            writer.add_tensor(gname, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


GGUF_TYPES = {
    "token_embd": Q.Q8_0,
    "attn_q.": Q.Q4_0,
    "attn_k.": Q.Q4_1,
    "attn_v": Q.F16,
    "attn_output": Q.BF16,
    "ffn_down": Q.Q5_0,
    "ffn": Q.Q8_0,
}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    directory = tmp_path_factory.mktemp("tiny-gguf")
    with accelerate.init_empty_weights():
        model = LlamaForCausalLM(_tiny_llama_config(vocab_size=256, num_hidden_layers=2, tie_word_embeddings=True))
    written = _write_gguf(directory / "tiny.gguf", "llama", model, GGUF_TYPES, lambda w: w.add_rope_dimension_count(16))
    return directory / "tiny.gguf", written


def _skeleton(directory: Path, gguf_file: str) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(directory, gguf_file=gguf_file)
    with accelerate.init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


# ---- safetensors: values ------------------------------------------------------------------------


def test_single_file_reads_equal_transformers(tiny, tiny_llama_dir: Path) -> None:
    state = tiny[0].state_dict()
    with open_weights(tiny_llama_dir) as reader:
        infos = reader.infos()
        assert set(infos) == set(state) - {"lm_head.weight"}  # tied: save_pretrained drops the head
        for name, info in infos.items():
            assert info.file == "model.safetensors" and info.dtype == "F32"
            assert info.shape == tuple(state[name].shape) and info.nbytes == state[name].numel() * 4
            value = reader.read(name)
            assert value.dtype == torch.float32 and torch.equal(value, state[name])
        q = "model.layers.1.self_attn.q_proj.weight"
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(reader.read(q, dtype=dtype), state[q].to(dtype))
        assert reader.read(q, dtype=None).dtype == torch.float32  # None keeps the stored type
        embed = state[EMBED]
        assert torch.equal(reader.read_rows(EMBED, 7, 300), embed[7:300])
        assert reader.read_rows(EMBED, 5, 5).shape == (0, embed.shape[1])
        ids = torch.tensor([[9000, 3, 3], [49151, 0, 4097]])
        assert torch.equal(reader.gather_rows(EMBED, ids, chunk_rows=4096), embed[ids])
        assert torch.equal(
            reader.gather_rows(EMBED, ids, dtype=torch.bfloat16, chunk_rows=7), embed[ids].to(torch.bfloat16)
        )
        assert reader.gather_rows(EMBED, torch.tensor([], dtype=torch.long)).shape == (0, embed.shape[1])
        file_size = (tiny_llama_dir / "model.safetensors").stat().st_size
        assert file_size - 100_000 < reader.total_bytes < file_size
        with pytest.raises(ValueError):
            reader.read_rows(EMBED, 10, 5)
        with pytest.raises(ValueError):
            reader.read_rows("model.norm.weight", 0, 1)  # 1-D
        with pytest.raises(IndexError):
            reader.gather_rows(EMBED, torch.tensor([embed.shape[0]]))
        with pytest.raises(KeyError):
            reader.read("lm_head.weight")
    with pytest.raises(ValueError, match="closed"):
        reader.read(EMBED)


def test_sharded_bf16_checkpoint_equals_transformers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and (tmp_path / INDEX).exists()
    state = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).state_dict()
    with open_weights(tmp_path) as reader:
        infos = reader.infos()
        assert set(infos) == set(state) and {i.file for i in infos.values()} == set(shards)
        assert {i.dtype for i in infos.values()} == {"BF16"}
        for name in infos:
            assert torch.equal(reader.read(name, dtype=None), state[name])
            assert torch.equal(reader.read(name), state[name].float())
    summary = inspect_checkpoint(tmp_path)
    assert (summary.files, summary.tensors, summary.dtypes) == (len(shards), len(state), {"BF16": len(state)})
    assert summary.total_bytes == sum(t.numel() * 2 for t in state.values())


def test_single_safetensors_file_path_and_zero_size_tensor(tmp_path: Path) -> None:
    save_file(
        {"e": torch.zeros(0, 3, dtype=torch.bfloat16), "w": torch.arange(6.0).reshape(2, 3)},
        str(tmp_path / "weights.safetensors"),
    )
    with open_weights(tmp_path / "weights.safetensors") as reader:
        assert reader.read("e").shape == (0, 3)
        assert torch.equal(reader.read("w", dtype=torch.float64), torch.arange(6.0, dtype=torch.float64).reshape(2, 3))
    with open_weights(tmp_path) as reader:  # no index, no model.safetensors: every *.safetensors
        assert set(reader.infos()) == {"e", "w"}


# ---- safetensors: validation ----------------------------------------------------------------------


def _assert_invalid(exc: pytest.ExceptionInfo, tmp_path: Path, *fragments: str) -> None:
    message = str(exc.value)
    assert exc.value.code == "model_invalid"
    for fragment in fragments:
        assert fragment in message, message
    assert str(tmp_path) not in message and str(tmp_path) not in json.dumps(exc.value.details)


def _header_mutation(mutate):
    def build(d: Path) -> None:
        header = _two_tensor_header()
        mutate(header)
        _raw_safetensors(d / "model.safetensors", header, bytes(128))

    return build


def _gap(d: Path) -> None:
    header = _two_tensor_header()
    header["b"]["data_offsets"] = [72, 136]
    _raw_safetensors(d / "model.safetensors", header, bytes(136))


def _truncated(d: Path) -> None:
    _raw_safetensors(d / "model.safetensors", _two_tensor_header(), bytes(128))
    os.truncate(d / "model.safetensors", (d / "model.safetensors").stat().st_size - 10)


SINGLE_FILE_CASES = {
    "too short": (lambda d: (d / "model.safetensors").write_bytes(b"abc"), ["model.safetensors", "too short"]),
    "header longer than file": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 5000) + b"{}"),
        ["model.safetensors", "5000-byte header", "truncated"],
    ),
    "absurd header": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 200_000_000) + b"{}" * 8),
        ["model.safetensors", "limit"],
    ),
    "not json": (
        lambda d: _raw_safetensors(d / "model.safetensors", None, b"", header_bytes=b"{nope"),
        ["model.safetensors", "not valid JSON"],
    ),
    "not an object": (
        lambda d: _raw_safetensors(d / "model.safetensors", [1, 2], b""),
        ["model.safetensors", "not a JSON object"],
    ),
    "duplicate key": (
        lambda d: _raw_safetensors(
            d / "model.safetensors",
            None,
            bytes(64),
            header_bytes=b'{"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},'
            b' "a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}',
        ),
        ["model.safetensors", "duplicate key 'a'"],
    ),
    "unknown dtype": (_header_mutation(lambda h: h["a"].update(dtype="Q7")), ["tensor a", "unknown dtype 'Q7'"]),
    "bad entry": (_header_mutation(lambda h: h["b"].pop("data_offsets")), ["tensor b", "model.safetensors"]),
    "shape vs bytes": (
        _header_mutation(lambda h: h["a"].update(shape=[3, 5])),
        ["tensor a", "model.safetensors", "needs 60 bytes", "span 64"],
    ),
    "negative offset": (_header_mutation(lambda h: h["a"].update(data_offsets=[-64, 0])), ["tensor a"]),
    "truncated": (_truncated, ["tensor b lies past the end of model.safetensors (truncated?)"]),
    "past the end": (
        _header_mutation(
            lambda h: (
                h["b"].update(data_offsets=[64, 128], shape=[4, 4])
                or h.update(c={"dtype": "F32", "shape": [1], "data_offsets": [128, 132]})
            )
        ),
        ["tensor c lies past the end of model.safetensors"],
    ),
    "overlap": (_header_mutation(lambda h: h["b"].update(data_offsets=[32, 96])), ["tensor b overlaps tensor a"]),
    "gap": (_gap, ["8 unused bytes before tensor b"]),
    "trailing bytes": (
        lambda d: _raw_safetensors(d / "model.safetensors", _two_tensor_header(), bytes(144)),
        ["model.safetensors", "16 bytes after its last tensor"],
    ),
    "no weights": (lambda d: (d / "config.json").write_text("{}"), ["no *.safetensors"]),
    "fifo": (lambda d: os.mkfifo(d / "model.safetensors"), ["model.safetensors is not a regular file"]),
}


def _index_case(weight_map: dict, *, shards: bool = True):
    def build(d: Path) -> None:
        _two_shards(d)
        (d / INDEX).write_text(json.dumps({"weight_map": weight_map}))

    return build


def _symlink_outside(d: Path) -> None:
    _two_shards(d)
    outside = d.parent / f"{d.name}-outside"
    outside.mkdir()
    shutil.move(str(d / "s2.safetensors"), outside / "s2.safetensors")
    (d / "s2.safetensors").symlink_to(outside / "s2.safetensors")


def _duplicate_tensor(d: Path) -> None:
    _sharded(
        d,
        {"s1.safetensors": {"a": torch.ones(2)}, "s2.safetensors": {"a": torch.zeros(2), "c": torch.ones(1)}},
        weight_map={"a": "s1.safetensors", "c": "s2.safetensors"},
    )


INDEX_CASES = {
    "index not json": (lambda d: _two_shards(d) or (d / INDEX).write_text("{weight_map"), [INDEX, "not valid JSON"]),
    "index without weight_map": (
        lambda d: _two_shards(d) or (d / INDEX).write_text('{"weight_map": [1]}'),
        [INDEX, "weight_map"],
    ),
    "path separator": (
        _index_case({"a": "s1.safetensors", "b": "sub/s2.safetensors"}),
        ["sub/s2.safetensors", "outside the model directory"],
    ),
    "dot dot": (_index_case({"a": "s1.safetensors", "b": ".."}), ["'..'", "outside the model directory"]),
    "absolute": (
        lambda d: _index_case({"a": "s1.safetensors", "b": str(d / "s2.safetensors")})(d),
        ["absolute path", "s2.safetensors", "outside the model directory"],
    ),
    "symlink outside": (_symlink_outside, ["shard s2.safetensors resolves outside the model directory"]),
    "missing shard": (_index_case({"a": "s1.safetensors", "b": "s3.safetensors"}), ["missing shard s3.safetensors"]),
    "wrong shard": (
        _index_case({"a": "s2.safetensors", "b": "s2.safetensors"}),
        [INDEX, "tensor a", "shard s2.safetensors, whose header does not contain it"],
    ),
    "unknown tensor": (
        _index_case({"a": "s1.safetensors", "b": "s2.safetensors", "zz": "s2.safetensors"}),
        ["tensor zz", "s2.safetensors"],
    ),
    "tensor in two shards": (_duplicate_tensor, ["tensor a is defined in both s1.safetensors and s2.safetensors"]),
}


@pytest.mark.parametrize("case", sorted({**SINGLE_FILE_CASES, **INDEX_CASES}))
def test_broken_checkpoints_raise_model_invalid(case: str, tmp_path: Path) -> None:
    build, fragments = {**SINGLE_FILE_CASES, **INDEX_CASES}[case]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    build(model_dir)
    fds = _open_fds()
    with pytest.raises(ModelInvalid) as opened:
        open_weights(model_dir)
    _assert_invalid(opened, tmp_path, *fragments)
    with pytest.raises(ModelInvalid) as inspected:
        inspect_checkpoint(model_dir)
    assert str(inspected.value) == str(opened.value)
    assert _open_fds() == fds  # nothing leaked on the error paths


def test_validate_shapes_names_missing_and_mismatched_tensors(tmp_path: Path) -> None:
    _two_shards(tmp_path)
    with open_weights(tmp_path) as reader:
        validate_shapes(reader, {"a": (4, 4), "b": (2, 3), "lm_head.weight": (9, 9)}, optional={"lm_head.weight"})
        with pytest.raises(ModelInvalid) as missing:
            validate_shapes(reader, {"a": (4, 4), "c": (1,)})
        assert str(missing.value) == "tensor c is missing from the checkpoint"
        with pytest.raises(ModelInvalid) as wrong:
            validate_shapes(reader, {"b": (3, 2)})
        assert str(wrong.value) == (
            "tensor b has shape (2, 3) in the checkpoint (s2.safetensors), the model config says (3, 2)"
        )


# ---- header-only inspection, descriptors, no mapping, bounded RSS ------------------------------


def test_inspect_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _sharded(
        tmp_path,
        {
            "s1.safetensors": {"a": torch.ones(300, 40), "b": torch.ones(7, dtype=torch.bfloat16)},
            "s2.safetensors": {"c": torch.ones(100, 100, dtype=torch.float16)},
        },
    )
    headers = sum(
        8 + struct.unpack("<Q", (tmp_path / f).read_bytes()[:8])[0] for f in ("s1.safetensors", "s2.safetensors")
    )
    calls = _read_calls(monkeypatch)
    fds = _open_fds()
    summary = inspect_checkpoint(tmp_path)
    assert _open_fds() == fds
    assert summary.files == 2 and summary.tensors == 3
    assert summary.total_bytes == 300 * 40 * 4 + 7 * 2 + 100 * 100 * 2
    assert summary.dtypes == {"F32": 1, "BF16": 1, "F16": 1}
    assert sum(n for _, n in calls) <= headers + (tmp_path / INDEX).stat().st_size


def test_reader_never_maps_files_and_close_releases_descriptors(tmp_path: Path, tiny_gguf) -> None:
    _two_shards(tmp_path)
    fds = _open_fds()
    reader = open_weights(tmp_path)
    assert _open_fds() == fds + 2  # one descriptor per shard
    reader.read("a")
    reader.read("b")
    assert not _mapped(tmp_path / "s1.safetensors") and not _mapped(tmp_path / "s2.safetensors")
    reader.close()
    reader.close()  # idempotent
    assert _open_fds() == fds
    path, _ = tiny_gguf
    with open_weights(path.parent, gguf_file=path.name, skeleton=_skeleton(path.parent, path.name)) as reader:
        for name in reader.infos():
            reader.read(name)
        assert not _mapped(path)
    assert _open_fds() == fds


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def test_streaming_a_checkpoint_keeps_rss_bounded(tmp_path: Path) -> None:
    # 32 tensors of 1M bf16 values (64 MB on disk) over 4 shards: a reader that mapped the files
    # or kept what it read would grow RSS by at least that; one that streams holds ~ one tensor.
    g = torch.Generator().manual_seed(0)
    shards = {
        f"s{s}.safetensors": {f"t{s}_{i}": torch.randn(1024, 1024, generator=g).to(torch.bfloat16) for i in range(8)}
        for s in range(4)
    }
    shards["s0.safetensors"]["embed"] = torch.randn(16384, 512, generator=g).to(torch.bfloat16)
    _sharded(tmp_path, shards)
    del shards
    largest_fp32 = 1024 * 1024 * 4
    with open_weights(tmp_path) as reader:
        gc.collect()
        exact = _reset_peak_rss()
        before = _status_kib("VmRSS")
        total = 0.0
        for name in sorted(reader.infos()):
            if name != "embed":
                value = reader.read(name, dtype=torch.float32)
                total += float(value[0, 0])
                del value
        rows = reader.gather_rows("embed", torch.arange(0, 16384, 256), chunk_rows=512)  # 64 of 16384 rows
        assert rows.shape == (64, 512) and np.isfinite(total)
        grown = (_status_kib("VmHWM") if exact else _status_kib("VmRSS")) - before
    assert grown * 1024 < 4 * largest_fp32, f"RSS grew by {grown} KiB while streaming 64 MB"


# ---- GGUF -------------------------------------------------------------------------------------------


def test_tiny_llama_gguf_equals_transformers(tiny_gguf) -> None:
    path, written = tiny_gguf
    skeleton = _skeleton(path.parent, path.name)
    state = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    with open_weights(path.parent, gguf_file=path.name, skeleton=skeleton) as reader:
        infos = reader.infos()
        assert set(infos) == set(state) - {"lm_head.weight"}  # tied: no output.weight in the file
        assert infos[EMBED].dtype == "Q8_0" and infos[EMBED].shape == (256, 64) and infos[EMBED].file == "tiny.gguf"
        assert infos["model.layers.1.self_attn.k_proj.weight"].dtype == "Q4_1"
        assert infos["model.layers.0.self_attn.o_proj.weight"].dtype == "BF16"
        assert infos["model.layers.0.self_attn.v_proj.weight"].dtype == "F16"
        assert infos["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)  # GGUF dims reversed
        for name in infos:
            assert torch.equal(reader.read(name), state[name]), name
        q = "model.layers.0.self_attn.q_proj.weight"
        raw_q = gguf.quants.dequantize(gguf.quants.quantize(written["blk.0.attn_q.weight"], Q.Q4_0), Q.Q4_0)
        assert not torch.equal(state[q], torch.from_numpy(raw_q))  # un-permuted from llama.cpp's order
        assert torch.equal(reader.read(q, dtype=torch.bfloat16), state[q].to(torch.bfloat16))
        assert torch.equal(reader.read_rows(EMBED, 3, 200), state[EMBED][3:200])
        down = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(reader.read_rows(down, 5, 40), state[down][5:40])
        ids = torch.tensor([255, 0, 17, 17, 128])
        assert torch.equal(reader.gather_rows(EMBED, ids, chunk_rows=50), state[EMBED][ids])
        with pytest.raises(ValueError, match="reorders its rows"):
            reader.read_rows(q, 0, 4)
        with pytest.raises(ValueError, match="reorders its rows"):
            reader.read_rows("model.layers.1.self_attn.k_proj.weight", 0, 4)
    summary = inspect_checkpoint(path)
    assert summary.files == 1 and summary.tensors == len(state) - 1
    assert summary.dtypes["F32"] == 2 * 2 + 1 and summary.dtypes["Q4_0"] == 2


def test_tiny_gemma3_gguf_norms_are_shifted_like_transformers(tmp_path: Path) -> None:
    config = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=32,
    )
    with accelerate.init_empty_weights():
        model = Gemma3ForCausalLM(config)

    def extra(writer: gguf.GGUFWriter) -> None:
        writer.add_key_length(16)
        writer.add_value_length(16)
        writer.add_sliding_window(32)

    written = _write_gguf(tmp_path / "gemma.gguf", "gemma3", model, GGUF_TYPES, extra)
    state = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="gemma.gguf", dtype=torch.float32).state_dict()
    with open_weights(tmp_path, gguf_file="gemma.gguf", skeleton=_skeleton(tmp_path, "gemma.gguf")) as reader:
        assert set(reader.infos()) == set(state) - {"lm_head.weight"}
        for name in reader.infos():
            assert torch.equal(reader.read(name), state[name]), name
        norm = "model.layers.1.post_feedforward_layernorm.weight"
        assert torch.equal(reader.read(norm), torch.from_numpy(written["blk.1.post_ffw_norm.weight"] - 1))


def _patch_tensor_type(path: Path, tensor: str, type_id: int) -> None:
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def test_broken_gguf_files_raise_model_invalid(tmp_path: Path, tiny_gguf) -> None:
    source, _ = tiny_gguf
    skeleton = _skeleton(source.parent, source.name)

    def check(name: str, *fragments: str) -> None:
        with pytest.raises(ModelInvalid) as opened:
            open_weights(tmp_path, gguf_file=name, skeleton=skeleton)
        _assert_invalid(opened, tmp_path, name, *fragments)
        with pytest.raises(ModelInvalid) as inspected:
            inspect_checkpoint(tmp_path, gguf_file=name)
        assert str(inspected.value) == str(opened.value)

    (tmp_path / "garbage.gguf").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    check("garbage.gguf", "not a GGUF file")
    (tmp_path / "bad-header.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1 << 40) + bytes(64))
    check("bad-header.gguf", "corrupt GGUF header")
    (tmp_path / "cut-header.gguf").write_bytes(source.read_bytes()[:200])
    check("cut-header.gguf", "corrupt GGUF header", "truncated")
    shutil.copy(source, tmp_path / "truncated.gguf")
    os.truncate(tmp_path / "truncated.gguf", source.stat().st_size - 100)
    check("truncated.gguf", "lies past the end of truncated.gguf (truncated?)", "tensor ")
    shutil.copy(source, tmp_path / "type.gguf")
    _patch_tensor_type(tmp_path / "type.gguf", "blk.0.ffn_up.weight", 99)
    check("type.gguf", "tensor blk.0.ffn_up.weight", "unknown tensor type 99")
    with pytest.raises(ModelInvalid, match="missing GGUF file nope.gguf"):
        open_weights(tmp_path, gguf_file="nope.gguf", skeleton=skeleton)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "link.gguf").symlink_to(source)  # resolves outside tmp_path/model
    for name, fragment in (
        ("link.gguf", "GGUF file link.gguf resolves outside the model directory"),
        ("../truncated.gguf", "'../truncated.gguf', which is outside the model directory"),
    ):
        with pytest.raises(ModelInvalid) as exc:
            open_weights(tmp_path / "model", gguf_file=name, skeleton=skeleton)
        _assert_invalid(exc, tmp_path, fragment)
    with pytest.raises(ValueError, match="skeleton"):
        open_weights(source.parent, gguf_file=source.name)


def test_smollm2_header_inspection_and_truncated_copy(smollm2_path: Path, tmp_path: Path) -> None:
    summary = inspect_checkpoint(smollm2_path.parent, gguf_file=smollm2_path.name)
    assert summary.files == 1 and summary.tensors == 272
    assert summary.dtypes == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert summary.total_bytes < smollm2_path.stat().st_size
    with smollm2_path.open("rb") as f:
        header = parse_gguf_header(f.fileno(), smollm2_path.stat().st_size, smollm2_path.name)
    assert header.metadata["general.architecture"] == "llama" and header.data_start % 32 == 0
    # the header and the first 4 KiB of tensor data only: every tensor but the first lies past the end
    with smollm2_path.open("rb") as src, (tmp_path / smollm2_path.name).open("wb") as dst:
        dst.write(src.read(header.data_start + 4096))
    with accelerate.init_empty_weights():
        skeleton = LlamaForCausalLM(_tiny_llama_config())  # never reached: the header check fails first
    for call in (
        lambda: inspect_checkpoint(tmp_path, gguf_file=smollm2_path.name),
        lambda: open_weights(tmp_path, gguf_file=smollm2_path.name, skeleton=skeleton),
    ):
        with pytest.raises(ModelInvalid) as exc:
            call()
        _assert_invalid(exc, tmp_path, "tensor ", "lies past the end of SmolLM2-135M-Instruct.Q4_1.gguf (truncated?)")
