"""Helpers of bench/bench_scale.py: random-weight Llama checkpoints with real shapes, and the
worker-memory sampler that reads /proc (at the end of this file).

Each shape is written to ``<out>/<name>/`` in the Hugging Face layout that
``AutoModelForCausalLM.from_pretrained`` loads: ``config.json`` (LlamaConfig, plain RoPE),
``generation_config.json``, SmolLM2's tokenizer files (from the packaged GGUF, as
tests/conftest.py does it) and bf16 safetensors shards ``model-0000k-of-0000N.safetensors`` of at
most ``max_shard_bytes`` tensor bytes each (default 2 GB = 2·10⁹, Hugging Face's "2GB"; a tensor
larger than that gets a shard of its own) with ``model.safetensors.index.json``
(``{"metadata": {"total_size"}, "weight_map"}``).

Weights: tensor k (in write order: embeddings, then per layer q, k, v, o, gate, up, down, the two
norms, then the final norm and an untied lm_head) is drawn from ``torch.Generator`` seeded with
``seed * 1_000_000 + k`` (default seed 0): normal, std 0.02, for linears and embeddings, drawn in
float32 row blocks and rounded to bf16; RMSNorm weights are ones. The shards are *streamed*: the
safetensors header is computed from the shapes, then each tensor is generated and appended in
blocks of about 16 M values, so the writer's RSS stays at a few hundred MB whatever the shape.
Shards are written under a ``.partial`` name and renamed; the index is written last, so a
directory whose index, shard sizes and generator tag match the plan is complete and is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from core.export.safetensors_stream import TensorSpec, header_bytes
from core.export.safetensors_stream import plan_shards as greedy_shards

DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
STD = 0.02
BLOCK_VALUES = 1 << 24  # float32 values generated at once (64 MiB)
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    rope_theta: float = 500000.0
    max_positions: int = 8192


SHAPES = {
    # Llama-3.1-8B
    "8b": Shape("llama-8b-shape", 4096, 14336, 32, 32, 8, 128, 128256, tied=False),
    # Llama-3.2-1B
    "1b": Shape("llama-1b-shape", 2048, 8192, 16, 32, 8, 64, 128256, tied=True),
    # a few MB, for tests: in_features 64 < group 128 exercises padding, 2 KV heads GQA
    "tiny": Shape("llama-tiny-shape", 64, 256, 2, 4, 2, 16, 49152, tied=True, max_positions=2048),
}


def tensor_specs(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in Hugging Face state-dict order."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    specs = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs.append(("model.norm.weight", (h,)))
    if not shape.tied:
        specs.append(("lm_head.weight", (shape.vocab, h)))
    return specs


def _nbytes(dims: tuple[int, ...]) -> int:
    n = 2
    for d in dims:
        n *= d
    return n


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[int]]:
    """Tensor indices per shard, by the exporter's rule (core.export.safetensors_stream.plan_shards)."""
    return greedy_shards([_nbytes(dims) for _, dims in specs], max_shard_bytes)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _header(specs, indices, tag: str) -> bytes:
    return header_bytes(
        [TensorSpec(specs[k][0], torch.bfloat16, tuple(specs[k][1])) for k in indices],
        {"format": "pt", "generator": tag},
    )


def generator_tag(seed: int) -> str:
    return f"bench/scale_models.py seed={seed} std={STD} norms=ones"


def plan(shape: Shape, *, seed: int = 0, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Everything the written directory must contain: the index and each shard's exact file size."""
    specs = tensor_specs(shape)
    shards = plan_shards(specs, max_shard_bytes)
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    tag = generator_tag(seed)
    return {
        "specs": specs,
        "shards": shards,
        "names": names,
        "tag": tag,
        "index": {
            "metadata": {"total_size": sum(_nbytes(d) for _, d in specs)},
            "weight_map": {specs[k][0]: names[i] for i, ks in enumerate(shards) for k in ks},
        },
        "file_sizes": {
            names[i]: len(_header(specs, ks, tag)) + sum(_nbytes(specs[k][1]) for k in ks)
            for i, ks in enumerate(shards)
        },
        "parameters": sum(_nbytes(d) // 2 for _, d in specs),
    }


def is_complete(directory: Path, p: dict) -> bool:
    index = directory / INDEX
    if not (directory / "config.json").is_file() or not index.is_file():
        return False
    try:
        if json.loads(index.read_text()) != p["index"]:
            return False
        for name, size in p["file_sizes"].items():
            if (directory / name).stat().st_size != size:
                return False
        from safetensors import safe_open

        with safe_open(str(directory / p["names"][0]), framework="pt") as f:
            return (f.metadata() or {}).get("generator") == p["tag"]
    except (OSError, ValueError, json.JSONDecodeError):
        return False


def _write_tensor(fh, dims: tuple[int, ...], generator: torch.Generator, is_norm: bool) -> None:
    if is_norm:
        fh.write(torch.ones(dims, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
        return
    rows, cols = dims
    step = max(1, BLOCK_VALUES // cols)
    for start in range(0, rows, step):
        block = torch.randn(min(step, rows - start), cols, generator=generator, dtype=torch.float32)
        fh.write(block.mul_(STD).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        del block


def save_smollm2_tokenizer(out: Path) -> Path:
    from transformers import AutoTokenizer

    from core.packaged_models import require_smollm2

    path = require_smollm2()
    out.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
    return out


def write_config(shape: Shape, directory: Path, tokenizer) -> None:
    from transformers import GenerationConfig, LlamaConfig

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        rope_theta=shape.rope_theta,
        rope_scaling=None,
        tie_word_embeddings=shape.tied,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        dtype="bfloat16",
        **ids,
    )
    config.save_pretrained(directory)
    GenerationConfig(**ids).save_pretrained(directory)


def write_checkpoint(
    shape_key: str,
    out_root: Path,
    *,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tokenizer_dir: Path | None = None,
    log=print,
) -> dict:
    """Write (or find complete) ``out_root/<name>/``. Returns a summary dict."""
    shape = SHAPES[shape_key]
    directory = Path(out_root) / shape.name
    p = plan(shape, seed=seed, max_shard_bytes=max_shard_bytes)
    summary = {
        "shape": shape_key,
        "name": shape.name,
        "path": str(directory.resolve()),
        "parameters": p["parameters"],
        "num_shards": len(p["names"]),
        "size_bytes": sum(p["file_sizes"].values()),
        "seed": seed,
        "max_shard_bytes": max_shard_bytes,
    }
    if is_complete(directory, p):
        log(
            f"{directory}: exists and its index matches ({len(p['names'])} shards, "
            f"{summary['size_bytes'] / 2**30:.2f} GiB); not writing"
        )
        return {**summary, "written": False, "write_s": 0.0}
    t0 = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in list(directory.glob("model*.safetensors*")) + [directory / INDEX]:
        stale.unlink(missing_ok=True)
    from transformers import AutoTokenizer

    tok_dir = tokenizer_dir or save_smollm2_tokenizer(directory / ".tokenizer-tmp")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    tokenizer.save_pretrained(directory)
    if tokenizer_dir is None:
        shutil.rmtree(tok_dir, ignore_errors=True)
    write_config(shape, directory, tokenizer)
    specs = p["specs"]
    for i, indices in enumerate(p["shards"]):
        final = directory / p["names"][i]
        partial = final.with_name(final.name + ".partial")
        with open(partial, "wb") as fh:
            fh.write(_header(specs, indices, p["tag"]))
            for k in indices:
                name, dims = specs[k]
                generator = torch.Generator().manual_seed(seed * 1_000_000 + k)
                _write_tensor(fh, dims, generator, name.endswith("norm.weight"))
        os.replace(partial, final)
        log(f"  {final.name}: {final.stat().st_size / 2**30:.2f} GiB ({time.monotonic() - t0:.0f} s since start)")
    tmp = directory / (INDEX + ".tmp")
    tmp.write_text(json.dumps(p["index"], indent=2) + "\n")
    os.replace(tmp, directory / INDEX)
    write_s = round(time.monotonic() - t0, 1)
    log(f"{directory}: wrote {len(p['names'])} shards, {summary['size_bytes'] / 2**30:.2f} GiB in {write_s} s")
    return {**summary, "written": True, "write_s": write_s}


def verify_headers(
    directory: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, shape_key: str | None = None
) -> dict:
    """Check the index and every shard's header against the shape (safe_open metadata; no tensor is
    read). Returns {"ok", "problems", "tensors"}."""
    from safetensors import safe_open

    problems: list[str] = []
    shape_key = shape_key or next(k for k, s in SHAPES.items() if s.name == Path(directory).name)
    specs = tensor_specs(SHAPES[shape_key])
    index = json.loads((Path(directory) / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    if files != [shard_name(i, len(files)) for i in range(len(files))]:
        problems.append(f"shard names do not follow model-0000k-of-0000N: {files[:3]}")
    if index["metadata"]["total_size"] != sum(_nbytes(d) for _, d in specs):
        problems.append("index total_size differs from the shapes")
    per_file: dict[str, list[int]] = {}
    for name, dims in specs:
        per_file.setdefault(index["weight_map"].get(name, "?"), []).append(_nbytes(dims))
    for name, sizes in per_file.items():
        if len(sizes) > 1 and sum(sizes) > max_shard_bytes:
            problems.append(f"{name}: {sum(sizes)} tensor bytes > max shard size {max_shard_bytes}")
    expected = dict(specs)
    seen = 0
    for name in files:
        with safe_open(str(Path(directory) / name), framework="pt") as f:
            if (f.metadata() or {}).get("format") != "pt":
                problems.append(f"{name}: metadata format is not 'pt'")
            for key in f.keys():  # noqa: SIM118 - a safe_open handle has keys(), no __iter__
                seen += 1
                sl = f.get_slice(key)
                if tuple(sl.get_shape()) != expected.get(key) or sl.get_dtype() != "BF16":
                    problems.append(f"{name}:{key}: {sl.get_dtype()} {sl.get_shape()}")
                if index["weight_map"].get(key) != name:
                    problems.append(f"{key} is in {name}, the index says {index['weight_map'].get(key)}")
    if seen != len(expected):
        problems.append(f"{seen} tensors in the shards, {len(expected)} expected")
    return {"ok": not problems, "problems": problems, "tensors": seen}


# ---- /proc ----------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def find_worker(serve_pid: int) -> int | None:
    """The `python -m cli worker` child of `taq serve`, looked up by parent pid and cmdline."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == serve_pid and b"-m" in argv and b"cli" in argv and b"worker" in argv:
            return int(entry.name)
    return None


class RssSampler(threading.Thread):
    """Samples the worker's /proc status every `interval` s while a job is active. Per-stage peaks
    are computed afterwards from the (wall-clock time, VmRSS) series and the job's stage events."""

    def __init__(self, serve_pid: int, interval: float = 0.5) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.serve_pid, self.interval = serve_pid, interval
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.pid: int | None = None
        self.active = False
        self.stats: dict = {}
        self.series: list[tuple[float, int]] = []

    def _pid(self) -> int | None:
        if self.pid is None or proc_status(self.pid) is None:
            self.pid = find_worker(self.serve_pid)
        return self.pid

    def begin_job(self) -> None:
        pid = self._pid()
        reset = False
        if pid is not None:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                reset = True
            except OSError:
                pass
        st = proc_status(pid) if pid else None
        with self.lock:
            self.active, self.series = True, []
            self.stats = {
                "worker_pids": [pid] if pid else [],
                "hwm_reset": reset,
                "interval_s": self.interval,
                "samples": 0,
                "baseline_rss_bytes": st["VmRSS"] if st else None,
                "peak_rss_bytes": 0,
                "peak_rss_anon_bytes": 0,
            }

    def end_job(self) -> tuple[dict, list[tuple[float, int]]]:
        self.sample()
        pid = self._pid()
        st = proc_status(pid) if pid else None
        with self.lock:
            self.active = False
            stats, series = dict(self.stats), self.series
        one_process = len(stats["worker_pids"]) == 1 and pid in stats["worker_pids"]
        stats["vmhwm_bytes"] = st["VmHWM"] if st and stats["hwm_reset"] and one_process else None
        return stats, series

    def sample(self) -> None:
        pid = self._pid()
        st = proc_status(pid) if pid else None
        if st is None:
            return
        with self.lock:
            if not self.active:
                return
            s = self.stats
            if pid not in s["worker_pids"]:
                s["worker_pids"].append(pid)  # the worker was restarted mid-job
            s["samples"] += 1
            s["peak_rss_bytes"] = max(s["peak_rss_bytes"], st["VmRSS"])
            s["peak_rss_anon_bytes"] = max(s["peak_rss_anon_bytes"], st.get("RssAnon", 0))
            self.series.append((time.time(), st["VmRSS"]))

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()
