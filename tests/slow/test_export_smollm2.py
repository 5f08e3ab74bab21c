"""Exports of the real SmolLM2-135M-Instruct (30 layers, hidden 576): the HF directory loads in
transformers and reproduces our dequantized model, the GGUF (metadata copied from the source GGUF)
loads in transformers and llama.cpp and agrees with the HF export, and the manifest reports the
stored bits. Cases: asymmetric group 128 (576 % 128 != 0: the padded last group) and symmetric
group 64 (the vLLM "group" layout; every GGUF block exact).

llama.cpp (llama-cpp-python, installed by `make setup`): every GGUF tensor type the exporter
writes (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1 with integer and with float zero points, F16), each alone in a
file, loads, generates, and picks the same next token as transformers loading the same file after
>= 95 % of 32 prompts. The two mixed files above and the float-zero Q4_1 file (whose linears are
byte for byte SmolLM2's own packaged Q4_1 tensors, and which llama.cpp itself misses on 2 of the 32)
are held to the same 95 % with flips at near-ties (which llama.cpp's 8-bit activations cause)
counting as agreeing, and to 85 % plain agreement.
Under CI=true a missing llama-cpp-python fails these tests instead of skipping them."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.export import build_manifest, export_gguf, export_hf
from core.modules import decoder_layers, named_linears
from core.quant.primitives import dequantize_weight, quantize_weight
from core.scheme import effective_bits
from core.spec import JobSpec
from core.types import BitMap

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]
NEW_TOKENS = 16
#: first and last two layers kept, the middle cycles 4 / 8 / 4 / 4 bits
WIDTHS = [16, 16] + ([4, 8, 4, 4] * 7)[:26] + [16, 16]
CASES = {"asym-g128": (False, 128), "sym-g64": (True, 64)}
#: every tensor type the GGUF exporter writes for a linear, each filling a whole file:
#: (bits of every layer, symmetric); group 32 = one GGML block per group
GGUF_TYPES = {
    "Q8_0": (8, True),
    "Q5_0": (5, True),
    "Q5_1": (5, False),
    "Q4_0": (4, True),
    "Q4_1": (4, False),
    "F16": (16, False),
}
#: the llama.cpp agreement prompts: plain text, code and chat (formatted with the model's template)
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "Once upon a time, there was a",
    "import numpy as np\n",
    "The quick brown fox jumps over the",
    "In 1492, Christopher Columbus",
    "for i in range(10):\n   ",
    "The chemical symbol for gold is",
    "My favourite food is",
    "The sun rises in the",
    "Photosynthesis is the process by which",
    "SELECT name FROM users WHERE",
    "The first man on the moon was",
    "A triangle has three",
    "To make a cup of tea, first",
    "The opposite of hot is",
    "Monday, Tuesday, Wednesday,",
    "The Eiffel Tower is located in",
]
CHAT_PROMPTS = [
    "What is 2+2?",
    "What is the capital city of Japan? Reply with just the name of the city.",
    "Name a primary colour.",
    "What does the Python expression `sum([1, 1, 6])` evaluate to?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Translate 'thank you' into French.",
    "What is 7 times 8?",
    "Give me one word that rhymes with cat.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "Say hello in Spanish.",
]
#: llama.cpp rounds activations to 8 bits for its quantized dot products, which moves SmolLM2's
#: logits by ~3 % of the largest one (median; 0.1 % for F16): where transformers' top two tokens lie
#: within LLAMA_NEAR_TIE (in logits, i.e. nats of log-probability) that can flip the top-1. A flip
#: there counts as agreeing in the asserted figure; the plain top-1 agreement is reported beside
#: it and has a floor of its own, so more flips than near-ties explain still fail.
LLAMA_MIN_AGREEMENT = 0.95
LLAMA_MIN_EXACT_AGREEMENT = 0.85
LLAMA_NEAR_TIE = 0.5
LLAMA_NEW_TOKENS = 8
#: llama.cpp on one thread: the tests share 2 cores, and spinning OpenMP threads cost more than they gain
LLAMA_THREADS = 1


@pytest.fixture(scope="module")
def smol(smollm2_path: Path):
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    prompts = PROMPTS + [tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)]
    return model, tokenizer, prompts


class Exported:
    """One case: quantized weights, both exports, and models loaded from them on first use."""

    def __init__(self, smol, root: Path, smollm2_path: Path, symmetric: bool, group_size: int) -> None:
        self.model, self.tokenizer, self.prompts = smol
        self.root, self.symmetric, self.group_size = root, symmetric, group_size
        self.bits = {name: b for (name, _), b in zip(decoder_layers(self.model), WIDTHS)}
        self.weights = {}
        for layer, b in self.bits.items():
            if b < 16:
                for name, linear in named_linears(self.model, layer).items():
                    self.weights[name] = quantize_weight(linear.weight.detach(), b, group_size, symmetric)
        self.spec = JobSpec(
            model="smollm2-135m-instruct",
            method="uniform",
            bit_budget={"avg_bits": 6.0},
            group_size=group_size,
            symmetric=symmetric,
        )
        self.hf_files = export_hf(self.model, self.tokenizer, self.weights, BitMap(self.bits), self.spec, root / "hf")
        self.gguf = export_gguf(
            self.model,
            self.tokenizer,
            self.weights,
            BitMap(self.bits),
            self.spec,
            root / "model.gguf",
            source_gguf=smollm2_path,
        )
        self._hf = self._gg = None

    @property
    def hf(self):
        if self._hf is None:
            self._hf = AutoModelForCausalLM.from_pretrained(self.root / "hf", dtype=torch.float32).eval()
        return self._hf

    @property
    def gg(self):
        if self._gg is None:
            self._gg = AutoModelForCausalLM.from_pretrained(
                self.root, gguf_file=self.gguf.path.name, dtype=torch.float32
            ).eval()
        return self._gg

    def reference(self):
        """Our own dequantized model, other weights rounded to float16 as the export stores them."""
        ref = copy.deepcopy(self.model)
        with torch.no_grad():
            for _, value in ref.state_dict().items():
                value.copy_(value.half().float())
            for name, q in self.weights.items():
                ref.get_submodule(name).weight.copy_(dequantize_weight(q))
        return ref

    def greedy(self, model, prompt: str) -> list[int]:
        batch = self.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        return out[0, batch["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, smol, smollm2_path, tmp_path_factory) -> Exported:
    symmetric, group_size = CASES[request.param]
    return Exported(smol, tmp_path_factory.mktemp(request.param), smollm2_path, symmetric, group_size)


def test_hf_export_reproduces_our_dequantized_model(exported):
    config = json.loads((exported.root / "hf" / "config.json").read_text())
    strategy = {g["weights"]["strategy"] for g in config["quantization_config"]["config_groups"].values()}
    # 576 % 128 != 0 and asymmetric: block layout; symmetric with dividing groups: vLLM's group layout
    assert strategy == ({"group"} if exported.symmetric else {"block"})

    reference = exported.reference()
    for prompt in exported.prompts:
        ids = exported.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ours, theirs = reference(ids).logits, exported.hf(ids).logits
        gap, scale = float((ours - theirs).abs().max()), float(ours.abs().max())
        assert gap <= 1e-3 * scale, f"{prompt!r}: logits differ by {gap} (scale {scale})"


def test_gguf_export_agrees_with_the_hf_export(exported):
    # weights: identical where the GGML block mapping is exact (all symmetric widths, the 4-bit
    # asymmetric blocks whose fp16 offset is representable); bounded elsewhere
    for name, q in exported.weights.items():
        got = exported.gg.get_submodule(name).weight.detach()
        want = exported.hf.get_submodule(name).weight.detach()
        gap = float((got - want).abs().max())
        if exported.symmetric:
            assert gap == 0, name
        elif q.bits == 4:
            assert gap <= float(q.scale.float().abs().max()) * 15 * 2.0**-11, name
        else:  # 8-bit asymmetric blocks that int8 cannot hold are requantized to Q8_0
            assert gap <= float(want.abs().max()) / 127, name

    same, agreement = 0, []
    for prompt in exported.prompts:
        hf_tokens = exported.greedy(exported.hf, prompt)
        gg_tokens = exported.greedy(exported.gg, prompt)
        same += hf_tokens == gg_tokens
        # teacher-forced top-1 agreement along the HF export's continuation
        ids = exported.tokenizer(prompt)["input_ids"] + hf_tokens
        with torch.no_grad():
            top = exported.gg(torch.tensor([ids])).logits[0, :-1].argmax(-1).tolist()
        agreement.append(np.mean([a == b for a, b in zip(top[-NEW_TOKENS:], hf_tokens)]))
    if exported.symmetric:
        assert same == len(exported.prompts)
    else:
        assert min(agreement) >= 0.9, agreement


def test_manifest_reports_stored_effective_bits(exported):
    exported_files = [(f"hf/{f.name}", f) for f in exported.hf_files] + [("model.gguf", exported.gguf)]
    files = [(rel, f.path) for rel, f in exported_files]
    hashes = {rel: (f.size, f.sha256) for rel, f in exported_files}
    n = sum(math.prod(q.shape) for q in exported.weights.values())
    # the allocator's figure: padded groups and the int8 zero point counted (core.scheme.stored_bits)
    allocator = (
        sum(
            math.prod(q.shape) * effective_bits(q.bits, exported.group_size, exported.symmetric, q.shape[1])
            for q in exported.weights.values()
        )
        / n
    )
    manifest = build_manifest(
        exported.spec, "smollm2-135m-instruct", None, BitMap(exported.bits), allocator, files, {}, hashes=hashes
    )
    assert manifest == build_manifest(
        exported.spec, "smollm2-135m-instruct", None, BitMap(exported.bits), allocator, files, {}
    )  # the exporters' hashes are the files' hashes
    stored = manifest["effective_bits"]["stored"]["hf"]
    hf = manifest["storage"]["hf"]
    assert hf["weights"] == n and hf["quantized_linears"] == len(exported.weights)
    if exported.symmetric:
        assert abs(stored - allocator) <= 0.01 * allocator
    else:
        # padded last group (5 groups of 576) and int8 zero points: computed from the layout
        expected = (
            sum(
                math.prod(q.shape) * q.bits + q.shape[0] * math.ceil(q.shape[1] / exported.group_size) * 24
                for q in exported.weights.values()
            )
            / n
        )
        assert stored == pytest.approx(expected, rel=1e-9)
        assert stored == pytest.approx(allocator, rel=1e-9)  # the allocator counts what the export stores
    gguf = manifest["storage"]["model.gguf"]
    assert set(gguf["by_type"]) == ({"F16", "Q4_0", "Q8_0"} if exported.symmetric else {"F16", "Q4_1", "Q8_0"})


def require_llama_cpp():
    """The llama_cpp module. `make setup` installs it, so under CI=true its absence is a failure;
    elsewhere (a hand-made venv) the test is skipped."""
    try:
        import llama_cpp
    except ImportError as exc:
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(
                f"llama-cpp-python cannot be imported under CI=true ({exc}); `make setup` installs it", pytrace=False
            )
        pytest.skip(f"llama-cpp-python is not installed ({exc}); `make setup` installs it")
    return llama_cpp


def open_llama(path: Path, n_ctx: int = 128, logits_all: bool = False):
    llama_cpp = require_llama_cpp()
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=logits_all,
        verbose=False,
        n_threads=LLAMA_THREADS,
        n_threads_batch=LLAMA_THREADS,
        seed=0,
        # float32 K/V cache (GGML_TYPE_F32 = 0) like transformers', not llama.cpp's float16
        # default: one runtime difference less (it flipped 3 of the 7 near-ties seen with float16)
        type_k=0,
        type_v=0,
    )


def llama_prompts(tokenizer) -> list[str]:
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in CHAT_PROMPTS
    ]
    return TEXT_PROMPTS + chats


def hf_next_logits(model, tokenizer, prompts: list[str]) -> np.ndarray:
    """transformers' next-token logits after each prompt, [prompts, vocab]: one right-padded batch
    (causal, so the padding after a prompt never reaches its last position), the LM head applied
    to the last positions only."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    batch = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    with torch.no_grad():
        hidden = model.model(input_ids=batch, attention_mask=mask).last_hidden_state
        last = hidden[torch.arange(len(ids)), torch.tensor([len(row) - 1 for row in ids])]
        return model.lm_head(last).numpy()


def llama_next_logits(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's next-token logits after `ids` (a fresh sequence; only the last position's)."""
    import llama_cpp

    llm.reset()
    llm.eval(ids)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()


def check_llama_cpp(
    path: Path, model, tokenizer, record_property, label: str, min_exact: float = LLAMA_MIN_EXACT_AGREEMENT
) -> dict:
    """llama.cpp loads `path` (which transformers loaded as `model`): same tokenization of the 32
    prompts, the same next token after >= 95 % of them (near-ties aside, see LLAMA_NEAR_TIE), and a
    greedy generation that transformers, teacher-forced along it, agrees with."""
    llm = open_llama(path)
    prompts = llama_prompts(tokenizer)
    assert len(prompts) == 32
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    for prompt, row in zip(prompts, ids):
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == row, prompt
    theirs = hf_next_logits(model, tokenizer, prompts)
    ours = np.stack([llama_next_logits(llm, row) for row in ids])
    top_ours, top_theirs = ours.argmax(-1), theirs.argmax(-1)
    exact = top_ours == top_theirs
    # transformers' own preference of its top-1 over llama.cpp's: 0 where they agree
    gap = theirs.max(-1) - theirs[np.arange(len(ids)), top_ours]
    stats = {
        "agreement": float(exact.mean()),
        "agreement_near_ties_aside": float((gap <= LLAMA_NEAR_TIE).mean()),
        "flips": [
            (
                prompts[i],
                tokenizer.decode([int(top_ours[i])]),
                tokenizer.decode([int(top_theirs[i])]),
                round(float(gap[i]), 3),
            )
            for i in np.flatnonzero(~exact)
        ],
        "max_logit_difference": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
    }

    # a few greedy tokens from llama.cpp's own sampler, continuing a plain and a chat prompt
    generated, forced = [], []
    for row in (ids[0], ids[len(TEXT_PROMPTS)]):
        tokens = []
        for token in llm.generate(row, temp=0.0, top_k=1, reset=True):
            if token == llm.token_eos() or len(tokens) == LLAMA_NEW_TOKENS:
                break
            tokens.append(token)
        assert tokens, "llama.cpp generated nothing"
        generated.append(tokens)
        with torch.no_grad():
            top = model(torch.tensor([row + tokens])).logits[0, len(row) - 1 : -1].argmax(-1).tolist()
        forced += [a == b for a, b in zip(top, tokens)]
    stats["generated"] = [tokenizer.decode(t) for t in generated]
    stats["teacher_forced_agreement"] = float(np.mean(forced))
    record_property(f"llama_cpp[{label}]", stats)
    print(f"llama.cpp vs transformers on the same GGUF [{label}]: {stats}")
    assert stats["agreement_near_ties_aside"] >= LLAMA_MIN_AGREEMENT, (label, stats)
    assert stats["agreement"] >= min_exact, (label, stats)
    assert stats["teacher_forced_agreement"] >= 0.8, (label, stats)
    return stats


def test_llama_cpp_loads_the_gguf(exported, record_property):
    """The mixed files (F16 + Q8_0 + Q4_1 or Q4_0): against transformers on the same GGUF, and
    teacher-forced along the HF export's greedy continuations."""
    label = f"mixed {'sym-g64' if exported.symmetric else 'asym-g128'}"
    check_llama_cpp(exported.gguf.path, exported.gg, exported.tokenizer, record_property, label)

    llm = open_llama(exported.gguf.path, n_ctx=256, logits_all=True)
    agreement = []
    for prompt in exported.prompts:
        ids = exported.tokenizer(prompt)["input_ids"]
        hf_tokens = exported.greedy(exported.hf, prompt)
        full = ids + hf_tokens
        llm.reset()
        llm.eval(full)
        top = np.asarray(llm.scores[: len(full)]).argmax(-1)
        agreement.append(float(np.mean(top[len(ids) - 1 : -1] == np.asarray(hf_tokens))))
        first = next(iter(llm.generate(ids, temp=0.0, top_k=1, reset=True)))
        assert first == hf_tokens[0], prompt
    # llama.cpp quantizes activations to 8 bits for its Q4/Q8 dot products, so a near-tie can flip
    assert float(np.mean(agreement)) >= 0.8, agreement


#: K-quant files: the linears with 256 | in_features (SmolLM2's down_proj, 1536) in the K type,
#: the rest (576 inputs) in the legacy type of the same grid: (bits, that type, symmetric)
K_QUANT_TYPES = {"Q4_K": (4, "Q4_1", False), "Q5_K": (5, "Q5_1", False), "Q6_K": (6, "Q8_0", True)}


@pytest.mark.parametrize("case", [*sorted(GGUF_TYPES), "Q4_1-float", *sorted(K_QUANT_TYPES)])
def test_llama_cpp_loads_each_gguf_type(case, smol, smollm2_path, tmp_path, record_property):
    """One file per tensor type: every linear of every layer stored as `qtype` (token embedding
    F16, norms F32 as always), held to the plain >= 95 % agreement; "Q4_1-float" is Q4_1 written
    from float zero points, which at group 32 reproduce SmolLM2's own packaged Q4_1 tensors byte
    for byte (checked), so its agreement is llama.cpp's on the model as shipped (tie-aware). The
    K-quant files mix their K type with Q4_1 / Q5_1 / Q8_0 (tie-aware as well)."""
    from gguf import GGUFReader

    from core.weights.gguf_reader import parse_gguf_header

    require_llama_cpp()
    model, tokenizer, _ = smol
    k_quants = case in K_QUANT_TYPES
    qtype = case.removesuffix("-float")
    bits, symmetric = (K_QUANT_TYPES[case][0], K_QUANT_TYPES[case][2]) if k_quants else GGUF_TYPES[qtype]
    float_zero = case.endswith("-float") or (k_quants and not symmetric)
    layers = [name for name, _ in decoder_layers(model)]
    bit_map = BitMap(dict.fromkeys(layers, bits))
    weights = {
        name: quantize_weight(linear.weight.detach(), bits, 32, symmetric, float_zero=float_zero, k_quants=k_quants)
        for layer in layers
        if bits < 16
        for name, linear in named_linears(model, layer).items()
    }
    spec = JobSpec(
        model="smollm2-135m-instruct",
        method="uniform",
        bit_budget={"avg_bits": float(bits)},
        bit_choices=[bits],
        group_size=32,
        symmetric=symmetric,
        zero_point="float" if float_zero else "integer",
        k_quants=k_quants,
        exports=["gguf"],
    )
    path = export_gguf(
        model, tokenizer, weights, bit_map, spec, tmp_path / f"{case}.gguf", source_gguf=smollm2_path
    ).path
    with path.open("rb") as f:
        header = parse_gguf_header(f.fileno(), path.stat().st_size, path.name)
    types = {t.name: t.qtype.name for t in header.tensors}
    if k_quants:
        assert {name for name, t in types.items() if t == qtype} == {f"blk.{i}.ffn_down.weight" for i in range(30)}
        assert set(types.values()) == {qtype, K_QUANT_TYPES[case][1], "F16", "F32"}
    else:
        assert set(types.values()) == {qtype, "F16", "F32"}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    if float_zero and not k_quants:
        source = {t.name: t for t in GGUFReader(smollm2_path).tensors}
        ours = [t for t in GGUFReader(path).tensors if t.tensor_type.name == "Q4_1"]
        assert len(ours) == 7 * len(layers)
        for t in ours:
            assert source[t.name].tensor_type == t.tensor_type, t.name
            assert np.array_equal(np.asarray(source[t.name].data), np.asarray(t.data)), t.name
    if k_quants:  # transformers decodes the K blocks to exactly our dequantized weights
        from gguf import dequantize

        ours = {t.name: t for t in GGUFReader(path).tensors}
        down = weights[f"{layers[3]}.mlp.down_proj"]
        t = ours["blk.3.ffn_down.weight"]
        got = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(down.shape)
        assert torch.equal(got, dequantize_weight(down))
    exact_floor = LLAMA_MIN_EXACT_AGREEMENT if float_zero or k_quants else LLAMA_MIN_AGREEMENT
    check_llama_cpp(path, loaded, tokenizer, record_property, case, min_exact=exact_floor)


def test_llama_cpp_loads_the_tiny_gguf(tiny_llama_dir, tmp_path):
    """A GGUF written without a source GGUF (hyperparameters and tokenizer from the HF directory)."""
    require_llama_cpp()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bits = {name: b for (name, _), b in zip(decoder_layers(model), (4, 8, 16, 4))}
    weights = {
        name: quantize_weight(lin.weight.detach(), b, 32, False)
        for layer, b in bits.items()
        if b < 16
        for name, lin in named_linears(model, layer).items()
    }
    spec = JobSpec(model="tiny-llama", method="uniform", bit_budget={"avg_bits": 8.0}, group_size=32)
    path = export_gguf(model, tokenizer, weights, BitMap(bits), spec, tmp_path / "tiny.gguf").path
    llm = open_llama(path, logits_all=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is a city")["input_ids"]
    llm.reset()
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        theirs = loaded(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= 0.05 * np.abs(theirs).max()
    assert float(np.mean(ours.argmax(-1) == theirs.argmax(-1))) >= 0.8
