"""TAQ_WORKER_CLASSES parsing (name=device:memory,…), the fleet order, the class a worker serves
and the queue a job of a class goes to."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.settings import Settings
from common.worker_classes import parse_memory, parse_worker_classes

pytestmark = pytest.mark.unit

GiB = 1 << 30


def test_classes_parse_and_sort_by_memory(tmp_path):
    settings = Settings(data_dir=tmp_path, worker_classes="gpu80=cuda:80GiB, cpu=cpu:24GiB,gpu24=CUDA:24GiB")
    fleet = settings.fleet()
    assert [(c.name, c.device, c.memory_bytes) for c in fleet] == [
        ("cpu", "cpu", 24 * GiB),
        ("gpu24", "cuda", 24 * GiB),
        ("gpu80", "cuda", 80 * GiB),
    ]
    assert [c.queue for c in fleet] == ["quantize.cpu", "quantize.gpu24", "quantize.gpu80"]
    assert "TAQ_WORKER_CLASSES" in fleet[0].memory_source


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24GiB", 24 * GiB),
        ("512MiB", 512 << 20),
        ("1.5GiB", 3 * GiB // 2),
        ("64KiB", 64 << 10),
        ("2TiB", 2 << 40),
        ("1GB", 10**9),
    ],
)
def test_memory_units(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "raw, words",
    [
        ("cpu", "'cpu' must look like name=device:memory"),
        ("cpu=cpu", "'cpu=cpu' must look like name=device:memory"),
        ("a=tpu:1GiB", "unknown device 'tpu'"),
        ("a=cpu:0GiB", "must be more than 0"),
        ("a=cpu:12", "memory '12' must look like 24GiB"),
        ("a=cpu:1GiB,a=cuda:2GiB", "'a' is declared twice"),
        ("Big=cpu:1GiB", "the name must be lower-case"),
    ],
)
def test_bad_entries_are_refused_naming_the_entry(raw, words):
    with pytest.raises(ValueError, match="TAQ_WORKER_CLASSES entry") as caught:
        parse_worker_classes(raw)
    assert words in str(caught.value)
    with pytest.raises(ValidationError):  # the typed Settings refuses it the same way
        Settings(worker_classes=raw)


def test_unset_is_one_default_class_from_the_old_settings(tmp_path):
    settings = Settings(data_dir=tmp_path, worker_device="cuda", worker_memory_bytes=3 * GiB)
    (only,) = settings.fleet()
    assert (only.name, only.device, only.memory_bytes, only.queue) == ("default", "cuda", 3 * GiB, "quantize.default")
    assert only.memory_source == "TAQ_WORKER_MEMORY_BYTES"
    assert settings.own_worker_class() == only  # a worker without --class serves it


def test_own_class_needs_a_declared_name_when_there_are_several(tmp_path):
    classes = "small=cpu:1GiB,large=cpu:8GiB"
    with pytest.raises(ValueError, match=r"several classes \(small, large\); start the worker with --class"):
        Settings(data_dir=tmp_path, worker_classes=classes).own_worker_class()
    with pytest.raises(ValueError, match="worker class 'huge' is not declared"):
        Settings(data_dir=tmp_path, worker_classes=classes, worker_class="huge").own_worker_class()
    assert Settings(data_dir=tmp_path, worker_classes=classes, worker_class="large").own_worker_class().name == "large"
    assert Settings(data_dir=tmp_path, worker_classes="one=cpu:1GiB").own_worker_class().name == "one"


def test_jobs_of_an_undeclared_class_go_to_the_largest(tmp_path):
    settings = Settings(data_dir=tmp_path, worker_classes="small=cpu:1GiB,large=cpu:8GiB")
    assert settings.queue_class("small").name == "small"
    assert settings.queue_class(None).name == "large"  # a job from before classes existed
    assert settings.queue_class("default").name == "large"  # a class no longer declared


def test_admin_key_must_be_long(tmp_path):
    with pytest.raises(ValidationError, match="TAQ_ADMIN_KEY is shorter than 16"):
        Settings(data_dir=tmp_path, admin_key="short")
