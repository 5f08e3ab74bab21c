"""bench/tasks: the committed suites are reproducible, valid, sized and split without overlap."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from core.spec import CalibrationRow

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "bench" / "tasks"
SUITES = ["arithmetic", "capitals", "python_eval"]


def _load_builder():
    spec = importlib.util.spec_from_file_location("bench_build_tasks", ROOT / "bench" / "build_tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build_tasks = _load_builder()
MANIFEST = json.loads((TASKS / "manifest.json").read_text(encoding="utf-8"))


def _rows(suite: str, split: str) -> list[dict]:
    lines = (TASKS / suite / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def _question(row: dict) -> str:
    return row["messages"][-1]["content"]


def _skip_reason(suite: str) -> str | None:
    if suite != "capitals":
        return None
    if importlib.util.find_spec("countryinfo") is None:
        return "countryinfo is not installed (pip install countryinfo) - capitals cannot be rebuilt"
    import countryinfo

    wanted = MANIFEST["suites"]["capitals"]["source"]["version"]
    if countryinfo.__version__ != wanted:
        return f"capitals were built from countryinfo {wanted}, {countryinfo.__version__} is installed"
    return None


@pytest.mark.parametrize("suite", SUITES)
def test_committed_files_are_reproducible(suite: str, tmp_path: Path) -> None:
    reason = _skip_reason(suite)
    if reason:
        pytest.skip(reason)
    build_tasks.build(tmp_path, [suite])
    for split in ("calibration", "eval"):
        rebuilt = (tmp_path / suite / f"{split}.jsonl").read_bytes()
        committed = (TASKS / suite / f"{split}.jsonl").read_bytes()
        assert rebuilt == committed, f"{suite}/{split}.jsonl differs from a fresh build"
    rebuilt_manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert rebuilt_manifest["suites"][suite] == MANIFEST["suites"][suite]


@pytest.mark.parametrize("suite", SUITES)
def test_rows_are_valid_calibration_rows(suite: str) -> None:
    for split in ("calibration", "eval"):
        for i, row in enumerate(_rows(suite, split), start=1):
            parsed = CalibrationRow.model_validate(row)
            assert parsed.messages is not None and parsed.prompt is None, f"{suite}/{split}:{i}"
            assert parsed.messages[-1].role == "user"
            assert parsed.answers and all(a.strip() for a in parsed.answers)


@pytest.mark.parametrize("suite", SUITES)
def test_splits_disjoint_and_sized(suite: str) -> None:
    calibration, eval_rows = _rows(suite, "calibration"), _rows(suite, "eval")
    cal_q = [_question(r) for r in calibration]
    eval_q = [_question(r) for r in eval_rows]
    assert len(set(cal_q)) == len(cal_q)
    assert len(set(eval_q)) == len(eval_q)
    assert not set(cal_q) & set(eval_q)
    # few-shot demonstrations never show an eval question
    demos = {m["content"] for r in calibration + eval_rows for m in r["messages"][:-1] if m["role"] == "user"}
    assert not demos & set(eval_q)
    assert not demos & set(cal_q)
    assert len(eval_rows) >= 150
    assert len(calibration) >= 64
    files = MANIFEST["suites"][suite]["files"]
    assert files["eval"]["rows"] == len(eval_rows)
    assert files["calibration"]["rows"] == len(calibration)
    for split in ("calibration", "eval"):
        assert (TASKS / suite / f"{split}.jsonl").stat().st_size < 200_000  # KBs, not MBs


def test_generated_suites_are_seeded() -> None:
    a = build_tasks.build_arithmetic()
    assert a == build_tasks.build_arithmetic()
    assert build_tasks.build_arithmetic(seed=1).eval != a.eval
    p = build_tasks.build_python_eval()
    assert p == build_tasks.build_python_eval()


def test_python_answers_come_from_python() -> None:
    for row in _rows("python_eval", "eval") + _rows("python_eval", "calibration"):
        expr = _question(row).split("`")[1]
        value = build_tasks.python_value(expr)
        assert row["answers"][0] == " ".join(str(value).split())


def test_python_value_refuses_names() -> None:
    with pytest.raises(ValueError):
        build_tasks.python_value("__import__('os')")


@pytest.mark.parametrize("suite", SUITES)
def test_echoing_the_question_never_scores(suite: str) -> None:
    from core.evaluation import contains_match

    for row in _rows(suite, "eval") + _rows(suite, "calibration"):
        assert contains_match(_question(row), row["answers"]) == 0.0, _question(row)


def test_arithmetic_answers_are_integers() -> None:
    for row in _rows("arithmetic", "eval") + _rows("arithmetic", "calibration"):
        assert len(row["answers"]) == 1
        assert int(row["answers"][0]) >= 0


def test_capitals_alternatives_merged() -> None:
    assert build_tasks._capital_names("Kralendijk / Oranjestad / The Bottom") == \
        ["Kralendijk", "Oranjestad", "The Bottom"]
    assert build_tasks._capital_names(["Vatican City"]) == ["Vatican City"]
    assert build_tasks._capital_names(None) == []
    assert build_tasks._capital_names("") == []
