"""core.streaming and core.quant.layer pieces on their own: captured layer calls replayed layer by
layer equal the whole model's hidden states, the compact embedding equals the full one, hidden
streams round-trip exactly through spill files, the chunked LM head equals a full-vocabulary
float64 reference, layer checkpoints round-trip codes exactly, LayerInputs' two modes agree and a
diagonal Hessian makes GPTQ equal round-to-nearest (tiny random Llama; SmolLM2 once)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from core.calibration import make_batches, pad_token_id
from core.models import ModelSource, resolve_model
from core.quant.layer import LayerInputs, quantize_layer
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scheme import QuantScheme
from core.streaming.capture import capture_inputs, run_layer
from core.streaming.checkpoints import LayerRecord, MemoryStore, load_codes, load_record, save_layer
from core.streaming.head import HeadQuery, head_stats
from core.streaming.hidden import HiddenStream, SpillArea
from core.streaming.model import open_streamed

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("single_thread")]


TEXTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "1, 2, 3, 4,",
    "def fibonacci(n):\n    return",
    "Hello",
    "A much longer sentence about layer streaming and "
    "hidden states that are carried from one decoder layer to the next one.",
]


@pytest.fixture(scope="module")
def streamed(tiny_model_root: Path):
    source = resolve_model("tiny-llama", [tiny_model_root], {})
    with open_streamed(source) as model:
        yield model


def token_batches(tokenizer, max_batch_tokens: int):
    sequences = [tokenizer.encode(t) for t in TEXTS]
    return make_batches(sequences, pad_token_id(tokenizer), "cpu", max_batch_tokens=max_batch_tokens)


def streamed_hidden_states(model, batches) -> list[list[torch.Tensor]]:
    """Per batch: the input of every layer, the last layer's output and that output normed."""
    captured = capture_inputs(model, batches)
    per_batch = [[h] for h in captured.hidden]
    for index, ref in enumerate(model.layers):
        with model.onloaded(ref.name) as layer:
            for b in range(len(batches)):
                per_batch[b].append(run_layer(layer, per_batch[b][-1], captured.calls[b][index]))
    with torch.no_grad(), model.onloaded(model.stack.final_norm_name) as norm:
        for states in per_batch:
            states.append(norm(states[-1]))
    return per_batch


# --------------------------------------------------------------------------------- capture and run


def test_layer_by_layer_equals_the_whole_model_exactly(streamed, tiny) -> None:
    full, _ = tiny
    batches = token_batches(streamed.tokenizer, max_batch_tokens=64)  # several padded batches
    assert len(batches) > 1 and any(not bool(b.valid.all()) for b in batches)
    ours = streamed_hidden_states(streamed, batches)
    assert all(p.device.type == "meta" for p in streamed.skeleton.model.layers.parameters())  # all offloaded
    for batch, states in zip(batches, ours, strict=True):
        with torch.no_grad():
            out = full(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        # HF: the embedding output, every layer's output but the last, then the last one normed
        expected = list(out.hidden_states)
        assert len(expected) == streamed.n_layers + 1
        for i in range(streamed.n_layers):
            assert torch.equal(states[i], expected[i]), f"input of layer {i}"
        assert torch.equal(states[-1], expected[-1]), "final normed hidden state"


def test_smollm2_gguf_layer_by_layer_equals_its_forward(smollm2_path: Path) -> None:
    source = ModelSource(
        model_id="smollm2", kind="gguf", path=smollm2_path.parent, gguf_file=smollm2_path.name, weights_format="gguf"
    )
    with open_streamed(source) as model:
        batches = token_batches(model.tokenizer, max_batch_tokens=96)
        ours = streamed_hidden_states(model, batches[:2])
        module = model.materialize()  # the same reader's weights, the whole model's own forward
        try:
            for batch, states in zip(batches[:2], ours, strict=True):
                with torch.no_grad():
                    out = module(
                        input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
                    )
                assert len(out.hidden_states) == model.n_layers + 1 == 31
                for i in range(model.n_layers):
                    assert torch.equal(states[i], out.hidden_states[i]), f"input of layer {i}"
                assert torch.equal(states[-1], out.hidden_states[-1])
        finally:
            model.release()
        assert all(p.device.type == "meta" for p in model.skeleton.parameters())


def test_compact_embedding_equals_the_full_embedding(streamed, tiny) -> None:
    full, tokenizer = tiny
    pad = pad_token_id(tokenizer)
    ids = torch.tensor([[5, 17, 5, 300, pad], [49151, 0, 17, pad, pad]])
    embed = streamed.skeleton.get_input_embeddings()
    with streamed.compact_embedding(ids) as remapped:
        assert embed.weight.shape[0] == len(torch.unique(ids))  # only the rows the batch uses
        assert remapped.shape == ids.shape and int(remapped.max()) < embed.weight.shape[0]
        compact = embed(remapped)
    assert embed.weight.device.type == "meta"  # restored
    with torch.no_grad():
        assert torch.equal(compact, full.get_input_embeddings()(ids))


# ------------------------------------------------------------------------------ hidden streams


def special_values(dtype: torch.dtype, shape=(2, 3, 5)) -> torch.Tensor:
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    flat = x.view(-1)
    flat[0], flat[1], flat[2], flat[3] = float("inf"), float("-inf"), -0.0, 1e-8
    return x


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_spilled_streams_round_trip_exactly(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = [special_values(dtype), special_values(dtype, (1, 4, 7)) + 1, special_values(dtype, (3, 1, 2)) - 1]
    sizes = [t.numel() * t.element_size() for t in tensors]
    area = SpillArea(sizes[0], tmp_path)  # only the first fits in RAM
    stream = HiddenStream(area, 3, "probe")
    for b, t in enumerate(tensors):
        stream.put(b, t)
    assert area.ram_bytes == sizes[0] == area.peak_ram_bytes
    assert area.spilled_bytes == sizes[1] + sizes[2]
    files = sorted(p for p in tmp_path.rglob("*.bin"))
    assert len(files) == 2 and sum(p.stat().st_size for p in files) == sizes[1] + sizes[2]
    for b, t in enumerate(tensors):
        got = stream.get(b)
        assert bit_equal(got, t), b
        assert bool(torch.isnan(got).any()) is False
    # replacing a batch frees what it held (RAM or file)
    stream.put(1, tensors[1])
    assert len(list(tmp_path.rglob("*.bin"))) == 2 and area.ram_bytes == sizes[0]
    stream.drop()
    assert area.ram_bytes == 0 and not list(tmp_path.rglob("*.bin"))
    with pytest.raises(KeyError):
        stream.get(0)
    spill_dirs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(spill_dirs) == 1
    area.close()
    assert not spill_dirs[0].exists()


def test_ram_accounting_is_shared_by_the_streams_of_an_area(tmp_path: Path) -> None:
    t = torch.ones(4, 8)  # 128 bytes
    with SpillArea(256, tmp_path / "spill") as area:
        a, b = HiddenStream(area, 2, "a"), HiddenStream(area, 2, "b")
        a.put(0, t)
        b.put(0, t * 2)
        assert area.ram_bytes == 256 and area.spilled_bytes == 0
        a.put(1, t * 3)  # over the limit: spilled
        assert area.spilled_bytes == 128 and area.ram_bytes == 256
        a.drop()
        assert area.ram_bytes == 128
        b.put(1, t * 4)  # room again
        assert area.ram_bytes == 256 and area.spilled_bytes == 128 and area.peak_ram_bytes == 256
        assert torch.equal(b.get(1), t * 4) and torch.equal(b.get(0), t * 2)
        directory = area._dir
        assert directory is not None and directory.exists()
    assert not directory.exists()
    with pytest.raises(ValueError):
        SpillArea(-1)
    zero = SpillArea(0, tmp_path / "none")
    s = HiddenStream(zero, 1)
    s.put(0, t)
    assert zero.ram_bytes == 0 and torch.equal(s.get(0), t)
    zero.close()


# -------------------------------------------------------------------------------------- LM head


@pytest.fixture(scope="module")
def head_reference(tiny):
    full, _ = tiny
    norm = full.model.norm
    weight = full.lm_head.weight.detach().double()
    torch.manual_seed(3)
    n, hidden = 11, full.config.hidden_size
    base = torch.randn(n, hidden)
    other = base + 0.7 * torch.randn(n, hidden)
    gold = torch.randint(0, weight.shape[0], (n,))
    gold[0] = weight.shape[0] - 1  # the last vocabulary row
    return norm, weight, base, other, gold


def reference_logits(norm, weight, hidden: torch.Tensor, cap: float | None) -> torch.Tensor:
    with torch.no_grad():
        z = norm(hidden).double() @ weight.T
    return torch.tanh(z / cap) * cap if cap else z


@pytest.mark.parametrize("cap", [None, 0.15], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk_rows", [None, 4096, 5000, 12345, 49152, 100000])
def test_chunked_head_equals_full_vocabulary_float64(
    streamed, head_reference, chunk_rows, cap, monkeypatch: pytest.MonkeyPatch
) -> None:
    norm, weight, base, other, gold = head_reference
    assert weight.shape[0] == streamed.vocab_size == 49152
    monkeypatch.setattr(streamed.config, "final_logit_softcapping", cap, raising=False)
    assert streamed.logit_softcap == cap
    stats = head_stats(
        streamed,
        [HeadQuery(hidden=base, gold=gold), HeadQuery(hidden=other, gold=gold, reference=0), HeadQuery(hidden=base)],
        chunk_rows=chunk_rows,
    )
    z_ref, z = reference_logits(norm, weight, base, cap), reference_logits(norm, weight, other, cap)
    lp_ref, lp = torch.log_softmax(z_ref, dim=-1), torch.log_softmax(z, dim=-1)
    for s, logits, logp in ((stats[0], z_ref, lp_ref), (stats[1], z, lp)):
        assert s.lse.dtype == torch.float64
        torch.testing.assert_close(s.lse, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5)
        picked = logits.gather(1, s.argmax[:, None])[:, 0]
        assert torch.all(picked >= logits.max(dim=-1).values - 1e-5)  # top-1 up to float32 near-ties
        torch.testing.assert_close(s.gold_logprob, logp.gather(1, gold[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(dim=-1)
    assert float(kl.min()) > 1e-4  # a real difference to measure
    torch.testing.assert_close(stats[1].kl, kl, rtol=1e-4, atol=1e-7)
    assert stats[0].kl is None and stats[2].gold_logprob is None
    assert torch.equal(stats[2].argmax, stats[0].argmax) and torch.equal(stats[2].lse, stats[0].lse)


def test_softcap_changes_the_statistics(streamed, head_reference, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, base, _, gold = head_reference
    plain = head_stats(streamed, [HeadQuery(hidden=base, gold=gold)])[0]
    monkeypatch.setattr(streamed.config, "final_logit_softcapping", 0.15, raising=False)
    capped = head_stats(streamed, [HeadQuery(hidden=base, gold=gold)])[0]
    assert float((plain.gold_logprob - capped.gold_logprob).abs().max()) > 1e-3


def test_head_query_reference_must_come_first(streamed, head_reference) -> None:
    _, _, base, _, _ = head_reference
    with pytest.raises(ValueError, match="earlier"):
        head_stats(streamed, [HeadQuery(hidden=base, reference=0)])
    assert head_stats(streamed, []) == []


# ---------------------------------------------------------------------------------- checkpoints


class LoggingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        self.order.append(key)
        super().put_bytes(key, data)


def assert_same_q(a, b) -> None:
    assert (a.bits, a.group_size, a.symmetric, tuple(a.shape)) == (b.bits, b.group_size, b.symmetric, tuple(b.shape))
    assert a.codes.dtype == b.codes.dtype and torch.equal(a.codes, b.codes)
    assert a.scale.dtype == b.scale.dtype == torch.float16 and torch.equal(a.scale, b.scale)
    if a.zero is None:
        assert b.zero is None
    else:
        assert a.zero.dtype == b.zero.dtype and torch.equal(a.zero, b.zero)
    assert torch.equal(dequantize_weight(a), dequantize_weight(b))


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_checkpoint_codes_round_trip_exactly(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    weights = {
        "model.layers.3.self_attn.q_proj": torch.randn(6, 40),  # 40 = one and a padded group
        "model.layers.3.mlp.down_proj": torch.randn(5, 64) * 4,  # whole groups
        "model.layers.3.mlp.gate_proj": torch.randn(1200, 8),
    }  # > one packing chunk of rows
    group = {"model.layers.3.mlp.gate_proj": 8}
    qs = {n: quantize_weight(w, bits, group.get(n, 32), symmetric) for n, w in weights.items()}
    assert qs["model.layers.3.self_attn.q_proj"].codes.shape[1] == 64
    other = {n: quantize_weight(w, 8 if bits != 8 else 4, group.get(n, 32), symmetric) for n, w in weights.items()}
    widths = sorted({bits, other[next(iter(other))].bits})
    by_width = {bits: qs, other[next(iter(other))].bits: other}
    record = LayerRecord(
        index=3,
        name="model.layers.3",
        pass_key="key-a",
        params={n: w.numel() for n, w in weights.items()},
        errors={n: {bits: 0.125, 16: 0.0} for n in weights},
        widths=widths,
        scorer={"variance": 1.5, "entropy": math.pi},
    )
    store = LoggingStore()
    save_layer(store, "work/x", record, {b: by_width[b] for b in widths})
    assert store.order[-1].endswith("00003.json") and len(store.order) == len(widths) + 1  # record last
    for b in widths:
        loaded = load_codes(store, "work/x", 3, b)
        assert set(loaded) == set(weights)
        for name in weights:
            assert_same_q(loaded[name], by_width[b][name])
    again = load_record(store, "work/x", 3, "key-a")
    assert again == record
    assert load_record(store, "work/x", 3, "key-b") is None  # another pass's record is ignored
    assert load_record(store, "work/x", 4, "key-a") is None
    assert load_record(store, "work/y", 3, "key-a") is None


def test_layer_record_keeps_the_linear_order() -> None:
    names = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.mlp.down_proj"]
    record = LayerRecord(
        index=0,
        name="m.layers.0",
        pass_key="k",
        params=dict.fromkeys(names, 10),
        errors={n: {4: 0.5, 16: 0.0} for n in names},
        widths=[4],
    )
    again = LayerRecord.from_json(record.to_json())
    assert list(again.params) == names and list(again.errors) == names


# ---------------------------------------------------------------------------------- LayerInputs


class Block(nn.Module):
    """q/k/v read the same tensor; o reads q's output (a record of its own)."""

    def __init__(self, width: int = 40) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.q, self.k, self.v = (
            nn.Linear(width, width, bias=False),
            nn.Linear(width, 16, bias=False),
            nn.Linear(width, 16, bias=False),
        )
        self.o = nn.Linear(width, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        return self.o(torch.tanh(q)) + self.k(x).sum() + self.v(x).sum()


def record_inputs(block: Block, batches, n_tokens: int) -> LayerInputs:
    inputs = LayerInputs({name: getattr(block, name) for name in ("q", "k", "v", "o")}, n_tokens)
    with inputs.recording(), torch.no_grad():
        for x, valid in batches:
            inputs.set_batch(valid)
            block(x)
    return inputs


def make_input_batches():
    torch.manual_seed(11)
    out = []
    for length in (7, 5):
        x = torch.randn(3, length, 40)
        valid = torch.ones(3, length, dtype=torch.bool)
        valid[1, length - 2 :] = False
        valid[2, 1:] = False
        x[~valid] = 1e3  # padding must never reach the statistics
        out.append((x, valid))
    return out


def test_layer_inputs_x_and_h_modes_agree_and_skip_padding() -> None:
    block, batches = Block(), make_input_batches()
    x_mode = record_inputs(block, batches, n_tokens=0)  # fewer tokens than features: rows
    h_mode = record_inputs(block, batches, n_tokens=10**6)  # accumulate XᵀX
    assert x_mode.x("q") is not None and h_mode.x("q") is None
    for inputs in (x_mode, h_mode):
        assert inputs.groups() == {"q": ["q", "k", "v"], "o": ["o"]}
        assert all(inputs.has_data(n) for n in "qkvo")
    valid_rows = torch.cat([x[v] for x, v in batches]).double()
    assert float(valid_rows.abs().max()) < 100
    h_ref = valid_rows.T @ valid_rows / valid_rows.shape[0]
    for name in "qkv":
        for inputs in (x_mode, h_mode):
            torch.testing.assert_close(inputs.hessian(name).double(), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_mode.hessian("o"), h_mode.hessian("o"), rtol=1e-5, atol=1e-6)
    for name in "qkvo":
        w = getattr(block, name).weight.detach()
        approx = dequantize_weight(quantize_weight(w, 3, 32, False))
        errors = [i.relative_error(name, w, approx, i.energy(name, w)) for i in (x_mode, h_mode)]
        assert errors[0] > 0 and errors[0] == pytest.approx(errors[1], rel=1e-4)
    widths = [3, 4, 16]
    weights = {n: getattr(block, n).weight.detach().clone() for n in "qkvo"}
    results = [
        quantize_layer(weights, i, widths, scheme=QuantScheme(32, False), gptq=gptq, clip_search=False)
        for i in (x_mode, h_mode)
        for gptq in (False, True)
    ]
    for rx, rh in ((results[0], results[2]), (results[1], results[3])):  # X mode vs H mode
        for name in weights:
            assert rx.errors[name][16] == 0.0
            for b in (3, 4):
                assert rx.errors[name][b] == pytest.approx(rh.errors[name][b], rel=1e-4)
    # GPTQ beats RTN on the recorded inputs (the quantity it minimises)
    rtn, gptq = results[0], results[1]
    assert sum(gptq.errors[n][3] for n in weights) < sum(rtn.errors[n][3] for n in weights)


@pytest.mark.parametrize("clip_search", [False, True], ids=["plain", "clip"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_diagonal_hessian_gptq_equals_rtn_code_for_code(symmetric: bool, clip_search: bool) -> None:
    torch.manual_seed(5)
    width = 40  # one full and one padded group of 32
    weights = {"a": torch.randn(24, width), "b": torch.randn(8, width) * 0.1}
    linears = {"a": nn.Linear(width, 24, bias=False), "b": nn.Linear(width, 8, bias=False)}
    scales = torch.rand(width) * 2 + 0.5
    scales[[3, 37]] = 0.0  # inputs never active: decoupled, rounded as they are
    x = torch.diag(scales)[None]  # one token per input feature: XᵀX is diagonal
    for n_tokens in (0, 10**6):
        inputs = LayerInputs(linears, n_tokens)
        with inputs.recording(), torch.no_grad():
            inputs.set_batch(torch.ones(1, width, dtype=torch.bool))
            h = linears["a"](x) + 0
            linears["b"](x)
        h = inputs.hessian("a")
        assert torch.count_nonzero(h - torch.diag(torch.diagonal(h))) == 0
        widths = [2, 3, 4, 8, 16]
        rtn = quantize_layer(
            weights, inputs, widths, scheme=QuantScheme(32, symmetric), gptq=False, clip_search=clip_search
        )
        gptq = quantize_layer(
            weights, inputs, widths, scheme=QuantScheme(32, symmetric), gptq=True, clip_search=clip_search
        )
        for bits in (2, 3, 4, 8):
            for name in weights:
                assert_same_q(gptq.codes[bits][name], rtn.codes[bits][name])
                assert gptq.errors[name][bits] == rtn.errors[name][bits]
