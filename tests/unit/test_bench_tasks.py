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
SUITES = ["arithmetic", "arithmetic_mc", "capitals", "capitals_mc", "python_eval"]
FREE_TEXT = ["arithmetic", "capitals", "python_eval"]
#: multiple-choice suite -> the free-text suite whose questions (same split) it asks
MC = {"arithmetic_mc": "arithmetic", "capitals_mc": "capitals"}
SPLITS = ("calibration", "eval")


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


def _options(question: str) -> tuple[str, dict[str, str]]:
    """(stem, {letter: option text}) of a multiple-choice question."""
    lines = question.split("\n")
    assert lines[-1] == build_tasks.MC_INSTRUCTION, question
    options = {}
    for line in lines[-1 - len(build_tasks.MC_LETTERS) : -1]:
        letter, sep, text = line.partition(") ")
        assert sep and text, line
        options[letter] = text
    assert list(options) == list(build_tasks.MC_LETTERS), question
    return "\n".join(lines[: -1 - len(build_tasks.MC_LETTERS)]), options


def _skip_reason(suite: str) -> str | None:
    if not suite.startswith("capitals"):
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
    if suite in ("arithmetic", "arithmetic_mc", "python_eval"):
        assert len(eval_rows) >= 500
        assert len(calibration) == 128
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
    m = build_tasks.build_arithmetic_mc()
    assert m == build_tasks.build_arithmetic_mc()
    assert build_tasks.build_arithmetic_mc(seed=1).eval != m.eval


def test_python_answers_come_from_python() -> None:
    for row in _rows("python_eval", "eval") + _rows("python_eval", "calibration"):
        expr = _question(row).split("`")[1]
        value = build_tasks.python_value(expr)
        assert row["answers"][0] == " ".join(str(value).split())


def test_python_value_refuses_names() -> None:
    with pytest.raises(ValueError):
        build_tasks.python_value("__import__('os')")


@pytest.mark.parametrize("suite", FREE_TEXT)
def test_echoing_the_question_never_scores(suite: str) -> None:
    from core.answers import contains_match

    for row in _rows(suite, "eval") + _rows(suite, "calibration"):
        assert contains_match(_question(row), row["answers"]) == 0.0, _question(row)


@pytest.mark.parametrize("suite", list(MC))
def test_mc_golds_are_one_letter_of_the_options(suite: str) -> None:
    from core.answers import exact_match

    for split in SPLITS:
        rows = _rows(suite, split)
        for row in rows:
            question = _question(row)
            _, options = _options(question)
            assert len(row["answers"]) == 1 and row["answers"][0] in options, question
            # the scorer keeps a lone letter (even the article "A") and tells letters apart
            for letter in options:
                assert exact_match(letter, row["answers"]) == float(letter == row["answers"][0])
            # echoing the question is never an exact match
            assert exact_match(question, row["answers"]) == 0.0
        # the correct position is balanced over the letters within each split
        counts = [sum(r["answers"][0] == letter for r in rows) for letter in build_tasks.MC_LETTERS]
        assert max(counts) - min(counts) <= 1, (split, counts)


@pytest.mark.parametrize("suite", list(MC))
def test_mc_correct_option_is_the_free_text_gold(suite: str) -> None:
    """Each MC row asks a question of its free-text suite, in the same split; the gold letter's
    option is one of that question's golds and no other option is."""
    from core.answers import normalize_answer

    source = MC[suite]
    for split in SPLITS:
        free = _rows(source, split)
        mc = _rows(suite, split)
        assert len(mc) == len(free)
        if source == "capitals":
            golds_by_key = {_question(r).split(" of ", 1)[1].split("? Reply")[0]: r["answers"] for r in free}
        else:
            golds_by_key = {_question(r): r["answers"] for r in free}
        keys = []
        for row in mc:
            stem, options = _options(_question(row))
            key = stem.split(" of ", 1)[1].rstrip("?") if source == "capitals" else stem
            keys.append(key)
            golds = {normalize_answer(g) for g in golds_by_key[key]}
            for letter, text in options.items():
                assert (normalize_answer(text) in golds) == (letter == row["answers"][0]), (stem, letter, text)
            assert len({normalize_answer(t) for t in options.values()}) == len(options), stem
        assert sorted(keys) == sorted(golds_by_key)


def test_mc_splits_are_disjoint_by_underlying_question() -> None:
    """capitals_mc never asks about a calibration country in eval; arithmetic_mc never asks a
    calibration problem in eval (stems, not only the full questions, are disjoint)."""
    for suite in MC:
        stems = {split: {_options(_question(r))[0] for r in _rows(suite, split)} for split in SPLITS}
        assert not stems["calibration"] & stems["eval"]


def test_arithmetic_mc_options_are_computed() -> None:
    for row in _rows("arithmetic_mc", "eval") + _rows("arithmetic_mc", "calibration"):
        stem, options = _options(_question(row))
        gold = int(options[row["answers"][0]])
        if stem.startswith("What is "):  # the bare templates: evaluate the expression itself
            assert gold == build_tasks.python_value(stem[len("What is ") :].rstrip("?"))
        assert all(int(text) >= 0 for text in options.values())


def test_capitals_eval_takes_every_remaining_country() -> None:
    if _skip_reason("capitals"):
        pytest.skip(_skip_reason("capitals"))
    calibration, eval_rows = _rows("capitals", "calibration"), _rows("capitals", "eval")
    assert len(calibration) == build_tasks.CAPITALS_CALIBRATION_SIZE
    assert len(calibration) + len(eval_rows) == MANIFEST["suites"]["capitals"]["source"]["entries"]
    entries, _ = build_tasks.capital_entries()
    asked = {_question(r) for r in calibration + eval_rows}
    dropped = [name for name, _ in entries if build_tasks.CAPITALS_PROMPT.format(country=name) not in asked]
    # only countries whose capital is in the question (an echo would score) are left out
    for name in dropped:
        row = build_tasks._row(build_tasks.CAPITALS_PROMPT.format(country=name), dict(entries)[name])
        assert build_tasks._echo_scores(row), name
    assert ("Scotland", ["Edinburgh"]) in entries  # no alpha-2 code, still a country with a capital


def test_arithmetic_answers_are_integers() -> None:
    for row in _rows("arithmetic", "eval") + _rows("arithmetic", "calibration"):
        assert len(row["answers"]) == 1
        assert int(row["answers"][0]) >= 0


def test_capitals_alternatives_merged() -> None:
    assert build_tasks._capital_names("Kralendijk / Oranjestad / The Bottom") == [
        "Kralendijk",
        "Oranjestad",
        "The Bottom",
    ]
    assert build_tasks._capital_names(["Vatican City"]) == ["Vatican City"]
    assert build_tasks._capital_names(None) == []
    assert build_tasks._capital_names("") == []
