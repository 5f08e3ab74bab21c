"""Exports of the real SmolLM2-135M-Instruct (30 layers, hidden 576): the HF directory loads in
transformers and reproduces our dequantized model, the GGUF (metadata copied from the source GGUF)
loads in transformers and llama.cpp and agrees with the HF export, and the manifest reports the
stored bits. Cases: asymmetric group 128 (576 % 128 != 0: the padded last group) and symmetric
group 64 (the vLLM "group" layout; every GGUF block exact)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.export import build_manifest, export_gguf, export_hf
from core.modules import decoder_layers, named_linears
from core.quant.primitives import dequantize_weight, quantize_weight
from core.spec import JobSpec
from core.types import effective_bits

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]
NEW_TOKENS = 16
#: first and last two layers kept, the middle cycles 4 / 8 / 4 / 4 bits
WIDTHS = [16, 16] + ([4, 8, 4, 4] * 7)[:26] + [16, 16]
CASES = {"asym-g128": (False, 128), "sym-g64": (True, 64)}


@pytest.fixture(scope="module")
def smol(smollm2_path: Path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                 dtype=torch.float32).eval()
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
        self.spec = JobSpec(model="smollm2-135m-instruct", method="uniform", bit_budget={"avg_bits": 6.0},
                            group_size=group_size, symmetric=symmetric)
        self.hf_files = export_hf(self.model, self.tokenizer, self.weights, self.bits, self.spec, root / "hf")
        self.gguf = export_gguf(self.model, self.tokenizer, self.weights, self.bits, self.spec,
                                root / "model.gguf", source_gguf=smollm2_path)
        self._hf = self._gg = None

    @property
    def hf(self):
        if self._hf is None:
            self._hf = AutoModelForCausalLM.from_pretrained(self.root / "hf", dtype=torch.float32).eval()
        return self._hf

    @property
    def gg(self):
        if self._gg is None:
            self._gg = AutoModelForCausalLM.from_pretrained(self.root, gguf_file=self.gguf.path.name,
                                                            dtype=torch.float32).eval()
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
        return out[0, batch["input_ids"].shape[1]:].tolist()


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
    allocator = sum(math.prod(q.shape) * effective_bits(q.bits, exported.group_size, exported.symmetric)
                    for q in exported.weights.values()) / n
    manifest = build_manifest(exported.spec, "smollm2-135m-instruct", None, exported.bits, allocator, files, {},
                              hashes=hashes)
    assert manifest == build_manifest(exported.spec, "smollm2-135m-instruct", None, exported.bits, allocator,
                                      files, {})  # the exporters' hashes are the files' hashes
    stored = manifest["effective_bits"]["stored"]["hf"]
    hf = manifest["storage"]["hf"]
    assert hf["weights"] == n and hf["quantized_linears"] == len(exported.weights)
    if exported.symmetric:
        assert abs(stored - allocator) <= 0.01 * allocator
    else:
        # padded last group (5 groups of 576) and int8 zero points: computed from the layout
        expected = sum(
            math.prod(q.shape) * q.bits + q.shape[0] * math.ceil(q.shape[1] / exported.group_size) * 24
            for q in exported.weights.values()) / n
        assert stored == pytest.approx(expected, rel=1e-9)
        assert stored < allocator  # the allocator's fp16-counted zero point is conservative
    gguf = manifest["storage"]["model.gguf"]
    assert set(gguf["by_type"]) == ({"F16", "Q4_0", "Q8_0"} if exported.symmetric else {"F16", "Q4_1", "Q8_0"})


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (pip install llama-cpp-python; builds llama.cpp "
                           "from source, ~10 min on 2 cores)")
def test_llama_cpp_loads_the_gguf(exported):
    from llama_cpp import Llama

    llm = Llama(model_path=str(exported.gguf.path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    agreement = []
    for prompt in exported.prompts:
        ids = exported.tokenizer(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        hf_tokens = exported.greedy(exported.hf, prompt)
        full = ids + hf_tokens
        llm.reset()
        llm.eval(full)
        top = np.asarray(llm.scores[: len(full)]).argmax(-1)
        agreement.append(float(np.mean(top[len(ids) - 1: -1] == np.asarray(hf_tokens))))
        first = next(iter(llm.generate(ids, temp=0.0, top_k=1, reset=True)))
        assert first == hf_tokens[0], prompt
    # llama.cpp quantizes activations to 8 bits for its Q4/Q8 dot products, so a near-tie can flip
    assert float(np.mean(agreement)) >= 0.8, agreement


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_loads_the_tiny_gguf(tiny_llama_dir, tmp_path):
    from llama_cpp import Llama

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bits = {name: b for (name, _), b in zip(decoder_layers(model), (4, 8, 16, 4))}
    weights = {name: quantize_weight(lin.weight.detach(), b, 32, False)
               for layer, b in bits.items() if b < 16 for name, lin in named_linears(model, layer).items()}
    spec = JobSpec(model="tiny-llama", method="uniform", bit_budget={"avg_bits": 8.0}, group_size=32)
    path = export_gguf(model, tokenizer, weights, bits, spec, tmp_path / "tiny.gguf").path
    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is a city")["input_ids"]
    llm.reset()
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        theirs = loaded(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= 0.05 * np.abs(theirs).max()
    assert float(np.mean(ours.argmax(-1) == theirs.argmax(-1))) >= 0.8
