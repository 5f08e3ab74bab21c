"""Broken checkpoints through the service (the embedded default: `taq serve` with its worker):
what the headers show is a 422 ``model_invalid`` at submit; what only the model config shows (a
tensor of the wrong shape) fails the job with ``model_invalid`` naming the tensor. Never a 500, a
hang, or artifacts published: the failed job has none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from .conftest import serve_embedded, tiny_spec, wait_job

pytestmark = pytest.mark.integration


def _shard(tiny_llama_dir: Path, out: Path) -> Path:
    """The tiny Llama saved as bf16 shards with an index, under `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="300KB", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def broken_root(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("broken-models")
    good = _shard(tiny_llama_dir, root / "sharded-ok")
    shards = sorted(good.glob("model-*.safetensors"))
    # a shard cut short
    truncated = root / "truncated"
    shutil.copytree(good, truncated)
    victim = truncated / shards[1].name
    victim.write_bytes(victim.read_bytes()[:-1000])
    # a shard the index names but that is not there
    missing = root / "missing-shard"
    shutil.copytree(good, missing)
    (missing / shards[-1].name).unlink()
    # an index naming a file outside the model directory
    escaping = root / "escaping-index"
    shutil.copytree(good, escaping)
    index = json.loads((escaping / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../sharded-ok/" + index["weight_map"][first]
    (escaping / "model.safetensors.index.json").write_text(json.dumps(index))
    # headers that agree with their files, a config that does not agree with them
    wrong_shape = root / "wrong-shape"
    shutil.copytree(tiny_llama_dir, wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (wrong_shape / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def served(tmp_path_factory, broken_root):
    with serve_embedded(tmp_path_factory.mktemp("bad-ckpt"), broken_root, worker_memory_bytes=str(8 << 30)) as service:
        yield service


@pytest.mark.parametrize(
    "model, names",
    [
        ("truncated", "past the end"),
        ("missing-shard", "missing"),
        ("escaping-index", "outside the model directory"),
    ],
)
def test_header_problems_are_422_at_submit(served, broken_root, model: str, names: str) -> None:
    response = served["client"].post("/v1/jobs", json=tiny_spec("uniform", model=model))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_invalid" and names in error["message"], error
    assert str(broken_root) not in json.dumps(error)  # no server path
    assert served["client"].get("/v1/jobs").json()["items"] == []


def test_a_tensor_of_the_wrong_shape_fails_the_job_naming_it(served) -> None:
    client = served["client"]
    ok = client.post("/v1/jobs", json=tiny_spec("uniform", model="sharded-ok")).json()
    assert wait_job(client, ok["id"], timeout=300)["status"] == "succeeded"
    job = client.post("/v1/jobs", json=tiny_spec("uniform", model="wrong-shape"))
    assert job.status_code == 202, job.text
    final = wait_job(client, job.json()["id"], timeout=300)
    assert final["status"] == "failed"
    error = final["error"]
    assert error["code"] == "model_invalid", error
    assert "mlp" in error["message"] and "shape" in error["message"], error
    assert client.get(f"/v1/jobs/{final['id']}/artifacts").json() == []
