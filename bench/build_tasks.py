"""Build the benchmark task suites under bench/tasks/<suite>/{calibration,eval}.jsonl.

    python bench/build_tasks.py                 # all suites into bench/tasks/
    python bench/build_tasks.py --out /tmp/t    # elsewhere (the unit test rebuilds and compares)
    python bench/build_tasks.py --suites arithmetic python_eval

Every gold answer comes from a third-party data package or is computed by Python; nothing is
typed by hand. Splits are seeded and disjoint; the output is byte-for-byte reproducible for the
same source package versions (recorded in bench/tasks/manifest.json).

Suites
  capitals        country -> capital from the `countryinfo` PyPI package (MIT).
  capitals_mc     the same countries and split as `capitals`, as four-option multiple choice
                  (distractors: other countries' capitals); the gold is the letter.
  arithmetic      one-step word problems, templates x seeded random numbers, answers computed.
  arithmetic_mc   the same problems and split as `arithmetic`, as four-option multiple choice
                  (distractors computed from the operands); the gold is the letter.
  python_eval     short Python expressions, answers from evaluating them with Python itself.

Multiple-choice golds are a single letter, so exact match is the metric for them (for a model
that answers with the letter); `contains` is not (every letter is in the question's options, and
the scorer drops "A" as an article inside a longer answer such as "A) Paris").
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

DEFAULT_OUT = Path(__file__).resolve().parent / "tasks"
SEED = 20251106
CALIBRATION_SIZE = 128
EVAL_SIZE = 500
#: capitals: eval takes every country left after this many calibration rows
CAPITALS_CALIBRATION_SIZE = 64
MC_LETTERS = "ABCD"
MC_INSTRUCTION = "Answer with the letter only."

#: Rows: {"messages": [{"role": "user", "content": ...}], "answers": [...]}.
Row = dict[str, Any]


@dataclass(frozen=True)
class Suite:
    name: str
    calibration: list[Row]
    eval: list[Row]
    source: dict[str, Any]


def _row(question: str, answers: list[str]) -> Row:
    clean: list[str] = []
    for a in answers:
        a = " ".join(str(a).split())
        if a and a not in clean:
            clean.append(a)
    if not clean:
        raise ValueError(f"no answer for {question!r}")
    return {"messages": [{"role": "user", "content": question}], "answers": clean}


def _question(row: Row) -> str:
    return row["messages"][-1]["content"]


def _echo_scores(row: Row) -> bool:
    """True when repeating the question would already count as a correct answer under the
    `contains` metric (a gold occurs in the question as whole words); such rows are dropped."""
    from core.answers import contains_match

    return contains_match(_question(row), row["answers"]) > 0


def _mc_question(stem: str, options: list[str]) -> str:
    """`stem`, one "X) option" line per letter, then the instruction."""
    if len(options) != len(MC_LETTERS):
        raise ValueError(f"{len(options)} options for {stem!r}")
    lines = [stem, *(f"{letter}) {text}" for letter, text in zip(MC_LETTERS, options))]
    return "\n".join([*lines, MC_INSTRUCTION])


def _balanced_letters(n: int, rng: random.Random) -> list[int]:
    """Positions of the correct option for `n` rows: each letter n/4 times (+-1), seeded order."""
    positions = [i % len(MC_LETTERS) for i in range(n)]
    rng.shuffle(positions)
    return positions


def _mc_row(stem: str, correct: str, distractors: list[str], position: int) -> Row:
    """A multiple-choice row whose gold is the letter of `correct`, placed at `position`."""
    options = list(distractors)
    options.insert(position, correct)
    return _row(_mc_question(stem, options), [MC_LETTERS[position]])


def _split(rows: list[Row], *, seed: int, n_eval: int, n_calibration: int | None) -> tuple[list[Row], list[Row]]:
    """Shuffle with `seed`, first `n_eval` rows -> eval, the next `n_calibration` (all the rest
    when None) -> calibration. Rows must already be unique by question."""
    questions = [_question(r) for r in rows]
    if len(set(questions)) != len(questions):
        raise ValueError("duplicate questions before the split")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    eval_rows = shuffled[:n_eval]
    rest = shuffled[n_eval:]
    calibration = rest if n_calibration is None else rest[:n_calibration]
    if n_calibration is not None and len(calibration) < n_calibration:
        raise ValueError(f"only {len(calibration)} rows left for calibration, need {n_calibration}")
    return calibration, eval_rows


# --------------------------------------------------------------------------------------------
# capitals
# --------------------------------------------------------------------------------------------

CAPITALS_PROMPT = "What is the capital city of {country}? Reply with just the name of the city."


def _capital_names(value: Any) -> list[str]:
    """The package stores a capital as a string, a list of strings, or "A / B / C" for
    territories with several seats; every listed name is an accepted answer."""
    values = value if isinstance(value, list) else [value]
    names: list[str] = []
    for v in values:
        if not isinstance(v, str):
            continue
        for part in v.split(" / "):
            part = part.strip()
            if part and part not in names:
                names.append(part)
    return names


def capital_entries() -> tuple[list[tuple[str, list[str]]], str]:
    """(country name, capitals) pairs, one per ISO 3166-1 alpha-2 code, and the package version.

    Entries without a capital (Antarctica, Bouvet Island, Macau, Wales, ...) are dropped: there is
    no gold to ask about. An entry without an alpha-2 code (Scotland) is kept under its own name.
    When several entries share a code (Burma/Myanmar, the two Vatican and Palestine records)
    their capitals are merged as alternative answers and the shortest name is asked about.
    """
    import countryinfo
    from countryinfo import CountryInfo

    by_code: dict[str, list[dict[str, Any]]] = {}
    data = CountryInfo.all()
    for key in sorted(data):
        info = data[key]
        if not _capital_names(info.get("capital")):
            continue
        code = ((info.get("ISO") or {}).get("alpha2") or "").strip().upper()
        # no alpha-2 code: the entry stands alone (keyed by its name, never merged with a code)
        by_code.setdefault(code or f"name:{str(info['name']).strip()}", []).append(info)
    entries: list[tuple[str, list[str]]] = []
    for code in sorted(by_code):
        infos = by_code[code]
        name = min((str(i["name"]).strip() for i in infos), key=lambda n: (len(n), n))
        capitals: list[str] = []
        for info in infos:
            for c in _capital_names(info.get("capital")):
                if c not in capitals:
                    capitals.append(c)
        entries.append((name, capitals))
    return entries, countryinfo.__version__


def _capitals_split(seed: int) -> tuple[list[Row], list[Row], list[tuple[str, list[str]]], str]:
    """The free-text capitals rows split into (calibration, eval), plus every package entry and
    the package version. `capitals_mc` asks about the same countries in the same split."""
    entries, version = capital_entries()
    rows = [_row(CAPITALS_PROMPT.format(country=name), capitals) for name, capitals in entries]
    # Djibouti, Singapore, Luxembourg...: a gold already in the question would score an echo
    rows = [r for r in rows if not _echo_scores(r)]
    # calibration keeps CAPITALS_CALIBRATION_SIZE countries, eval gets all the others
    n_eval = len(rows) - CAPITALS_CALIBRATION_SIZE
    calibration, eval_rows = _split(rows, seed=seed, n_eval=n_eval, n_calibration=CAPITALS_CALIBRATION_SIZE)
    return calibration, eval_rows, entries, version


def build_capitals(seed: int = SEED) -> Suite:
    calibration, eval_rows, _, version = _capitals_split(seed)
    return Suite(
        "capitals",
        calibration,
        eval_rows,
        {"package": "countryinfo", "version": version, "licence": "MIT", "entries": len(calibration) + len(eval_rows)},
    )


CAPITALS_MC_STEM = "Which city is the capital of {country}?"


def build_capitals_mc(seed: int = SEED) -> Suite:
    """Four options: the country's first listed capital and three distractors drawn (seeded)
    from the other entries' capitals, none of which is a capital of the asked country (compared
    after the scorer's normalisation, so "Kingston" of Jamaica is never a distractor for
    Norfolk Island). The correct letter is balanced over A-D within each split."""
    from core.answers import normalize_answer

    free_calibration, free_eval, entries, version = _capitals_split(seed)
    capitals_of = {CAPITALS_PROMPT.format(country=name): (name, capitals) for name, capitals in entries}
    pool: dict[str, str] = {}  # normalised name -> the first spelling met, in entry order
    for _, capitals in entries:
        for c in capitals:
            pool.setdefault(normalize_answer(c), c)
    rng = random.Random(seed + 4)

    def convert(free_rows: list[Row]) -> list[Row]:
        positions = _balanced_letters(len(free_rows), rng)
        rows: list[Row] = []
        for free, position in zip(free_rows, positions):
            name, capitals = capitals_of[_question(free)]
            own = {normalize_answer(c) for c in capitals}
            candidates = sorted(k for k in pool if k not in own)
            distractors = [pool[k] for k in rng.sample(candidates, len(MC_LETTERS) - 1)]
            rows.append(_mc_row(CAPITALS_MC_STEM.format(country=name), capitals[0], distractors, position))
        return rows

    calibration, eval_rows = convert(free_calibration), convert(free_eval)
    return Suite(
        "capitals_mc",
        calibration,
        eval_rows,
        {
            "package": "countryinfo",
            "version": version,
            "licence": "MIT",
            "entries": len(calibration) + len(eval_rows),
            "derived_from": "capitals (same countries, same split)",
        },
    )


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------

NAMES = [
    "Anna",
    "Ben",
    "Carlos",
    "Dina",
    "Emil",
    "Fatima",
    "Grace",
    "Hiro",
    "Ivan",
    "Jade",
    "Kofi",
    "Lena",
    "Maya",
    "Noah",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
]
ITEMS = [
    "apples",
    "books",
    "marbles",
    "pencils",
    "stickers",
    "cookies",
    "coins",
    "cards",
    "shells",
    "stamps",
    "balloons",
    "oranges",
]


@dataclass(frozen=True)
class _ArithTemplate:
    text: str
    op: str  # + - *


#: Zero-shot, small numbers, round-robin over the templates. SmolLM2-135M answers these by
#: restating the problem ("... so she has 5 - 1 = 4 marbles left."); a pilot dropped templates it
#: almost never finished within 24 new tokens ("What is a * b?", "rows of", "are lost",
#: "altogether": <10 %), which measured the token limit rather than the skill. The last two
#: templates were added so that 628 distinct problems fit in small operand ranges; a pilot of 48
#: problems each gave `contains` 0.60 ("boxes"), 0.21 ("sold"; "gave away" 0.27), and dropped
#: "has a and finds b more" (0.19, against 0.48 for "gets b more").
ARITHMETIC_TEMPLATES = [
    _ArithTemplate("What is {a} + {b}?", "+"),
    _ArithTemplate("What is {a} - {b}?", "-"),
    _ArithTemplate("{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", "+"),
    _ArithTemplate("{name} had {a} {items} and gave away {b}. How many {items} does {name} have left?", "-"),
    _ArithTemplate("{name} buys {a} bags with {b} {items} in each bag. How many {items} does {name} buy?", "*"),
    _ArithTemplate("{name} buys {a} boxes with {b} {items} in each box. How many {items} does {name} buy?", "*"),
    _ArithTemplate("{name} had {a} {items} and sold {b}. How many {items} does {name} have left?", "-"),
]


def _arith(a: int, b: int, op: str) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(op)


def _arith_operands(op: str) -> list[tuple[int, int]]:
    """Every operand pair of an operation, in order: 1-10 + 1-10 (100), a - b with a in 3-15 and
    0 < b < a (98 once a = 2b is dropped), 2-10 x 2-10 (81). Pairs whose answer equals an operand
    are left out (an echo of the question would then count as correct).

    The ranges stay small on purpose: SmolLM2-135M restates the problem before the result, and
    two-digit operands push the result past the 24 new tokens. With the first five templates,
    operands 1-20 + 1-20, a up to 20 and 2-12 x 2-15 scored `contains` 22 % (1-12, 3-18,
    2-9 x 2-10: 27 %), the earlier 200-row set with these ranges 42 %; more templates, not larger
    numbers, give the 628 distinct problems (35 % with all seven)."""
    if op == "+":
        pairs = [(a, b) for a in range(1, 11) for b in range(1, 11)]
    elif op == "-":
        pairs = [(a, b) for a in range(3, 16) for b in range(1, a)]
    elif op == "*":
        pairs = [(a, b) for a in range(2, 11) for b in range(2, 11)]
    else:
        raise ValueError(op)
    return [(a, b) for a, b in pairs if _arith(a, b, op) not in (a, b)]


@dataclass(frozen=True)
class _ArithProblem:
    question: str
    a: int
    b: int
    op: str
    answer: int


def _arith_problems(seed: int, n_total: int) -> list[_ArithProblem]:
    """`n_total` distinct problems: each template's operand pairs in a seeded order, taken
    round-robin over the templates while a template has pairs left (656 in all, so nearly every
    pair is used). One problem per (template, operands): names and items alone do not make a new
    problem; the same operands do appear under different templates ("What is 3 + 4?" and "Anna
    has 3 apples and gets 4 more"), possibly in different splits."""
    rng = random.Random(seed)
    queues: list[list[tuple[int, int]]] = []
    for template in ARITHMETIC_TEMPLATES:
        pairs = _arith_operands(template.op)
        rng.shuffle(pairs)
        queues.append(pairs)
    problems: list[_ArithProblem] = []
    while len(problems) < n_total:
        if not any(queues):
            raise RuntimeError(f"only {len(problems)} distinct arithmetic problems, need {n_total}")
        for template, queue in zip(ARITHMETIC_TEMPLATES, queues):
            if not queue or len(problems) == n_total:
                continue
            a, b = queue.pop(0)
            answer = _arith(a, b, template.op)
            question = template.text.format(name=rng.choice(NAMES), items=rng.choice(ITEMS), a=a, b=b)
            if _echo_scores(_row(question, [str(answer)])):
                continue
            problems.append(_ArithProblem(question, a, b, template.op, answer))
    return problems


def _arithmetic_split(seed: int, n_total: int) -> tuple[list[Row], list[Row], dict[str, _ArithProblem]]:
    """The free-text arithmetic rows split into (calibration, eval), and the problem behind each
    question. `arithmetic_mc` asks the same problems in the same split."""
    problems = _arith_problems(seed, n_total)
    rows = [_row(p.question, [str(p.answer)]) for p in problems]
    calibration, eval_rows = _split(
        rows, seed=seed + 1, n_eval=n_total - CALIBRATION_SIZE, n_calibration=CALIBRATION_SIZE
    )
    return calibration, eval_rows, {p.question: p for p in problems}


def build_arithmetic(seed: int = SEED, n_total: int = EVAL_SIZE + CALIBRATION_SIZE) -> Suite:
    calibration, eval_rows, _ = _arithmetic_split(seed, n_total)
    return Suite(
        "arithmetic",
        calibration,
        eval_rows,
        {
            "generator": "bench/build_tasks.py (seeded templates; answers computed by Python)",
            "licence": "generated",
            "seed": seed,
        },
    )


def arith_distractors(p: _ArithProblem) -> list[int]:
    """Wrong answers a solver plausibly gives, all computed: off by 1, 2 or 10, and the results
    of the other two operations on the same operands. Non-negative, distinct, never the answer;
    sorted (the caller draws from them with its seeded generator)."""
    candidates = {p.answer + d for d in (-10, -2, -1, 1, 2, 10)}
    candidates |= {_arith(p.a, p.b, op) for op in "+-*" if op != p.op}
    return sorted(c for c in candidates if c >= 0 and c != p.answer)


def build_arithmetic_mc(seed: int = SEED, n_total: int = EVAL_SIZE + CALIBRATION_SIZE) -> Suite:
    """`arithmetic`'s problems and split, each with its answer and three distractors drawn
    (seeded) from `arith_distractors`; the correct letter is balanced over A-D within each split."""
    free_calibration, free_eval, problems = _arithmetic_split(seed, n_total)
    rng = random.Random(seed + 5)

    def convert(free_rows: list[Row]) -> list[Row]:
        positions = _balanced_letters(len(free_rows), rng)
        rows: list[Row] = []
        for free, position in zip(free_rows, positions):
            p = problems[_question(free)]
            distractors = [str(d) for d in rng.sample(arith_distractors(p), len(MC_LETTERS) - 1)]
            rows.append(_mc_row(p.question, str(p.answer), distractors, position))
        return rows

    return Suite(
        "arithmetic_mc",
        convert(free_calibration),
        convert(free_eval),
        {
            "generator": "bench/build_tasks.py (arithmetic's problems; answers and distractors computed by Python)",
            "licence": "generated",
            "seed": seed,
            "derived_from": "arithmetic (same problems, same split)",
        },
    )


# --------------------------------------------------------------------------------------------
# python_eval
# --------------------------------------------------------------------------------------------

#: Zero-shot. In a pilot this phrasing made SmolLM2-135M restate the expression and give a value
#: ("`6 * 5` evaluates to 30.") far more often than "What is the value of ...? Reply with just the
#: value." (which it answered with a guessed number) or a REPL/"compute" framing.
PYTHON_PROMPT = "What does the Python expression `{expr}` evaluate to?"

WORDS = [
    "cat",
    "dog",
    "hello",
    "python",
    "river",
    "apple",
    "green",
    "moon",
    "table",
    "code",
    "sun",
    "tree",
    "house",
    "water",
    "light",
    "bird",
    "stone",
    "music",
    "paper",
    "cloud",
    "banana",
    "garden",
    "window",
    "letter",
    "coffee",
    "bottle",
    "pepper",
    "yellow",
    "rabbit",
    "summer",
    "button",
    "butter",
    "kitten",
    "mirror",
    "puzzle",
    "ribbon",
    "school",
    "tomato",
    "planet",
    "sky",
]

#: Expression kinds, drawn uniformly. The mix spans kinds SmolLM2-135M mostly gets right (small
#: +, *, squares) to kinds it rarely does (%, len, sum). Kinds whose answer is a literal of the
#: expression (max, min, indexing) are left out: echoing the expression would score; so are
#: .upper()/.lower(), which a case-insensitive scorer cannot check. Squares (19 bases) and len
#: (40 words) have fewer distinct expressions than a uniform share of 628 rows (~63), so they are
#: used up and slightly under-represented; the other kinds have hundreds.
PYTHON_KINDS = ["add", "sub", "mul", "pow", "floordiv", "mod", "count", "bool_int", "sum", "len"]


def _py_expr(rng: random.Random, kind: str) -> str:
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    word = rng.choice(WORDS)
    if kind == "add":
        return f"{a + rng.randint(0, 10)} + {b + rng.randint(0, 10)}"
    if kind == "sub":
        a, b = a + rng.randint(0, 10), b + rng.randint(0, 10)
        return f"{max(a, b)} - {min(a, b)}"
    if kind == "mul":
        return f"{a} * {b}"
    if kind == "pow":
        return f"{rng.randint(2, 20)} ** 2"
    if kind == "floordiv":
        return f"{a * b + rng.randint(0, b - 1)} // {b}"
    if kind == "mod":
        return f"{a + 10} % {b + 1}"
    if kind == "count":
        return f'"{word}".count("{rng.choice(word)}")'
    if kind == "bool_int":
        return f"True + {rng.randint(1, 50)}"
    if kind == "sum":
        return f"sum({[rng.randint(1, 9) for _ in range(rng.randint(2, 3))]})"
    if kind == "len":
        return f'len("{word}")'
    raise ValueError(kind)


_SAFE_BUILTINS = {
    "len": len,
    "max": max,
    "min": min,
    "sorted": sorted,
    "sum": sum,
    "abs": abs,
    "int": int,
    "str": str,
    "range": range,
}


def python_value(expr: str) -> Any:
    """Evaluate a generated expression with Python (literals and a few builtins only)."""
    tree = ast.parse(expr, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in _SAFE_BUILTINS:
            raise ValueError(f"unexpected name {node.id!r} in {expr!r}")
    return eval(compile(tree, "<expr>", "eval"), {"__builtins__": {}}, dict(_SAFE_BUILTINS))


def python_answers(value: Any) -> list[str]:
    """str(value) first; repr(value) too when it differs (quoted strings)."""
    answers = [str(value)]
    if repr(value) != str(value):
        answers.append(repr(value))
    return answers


def build_python_eval(seed: int = SEED, n_total: int = EVAL_SIZE + CALIBRATION_SIZE) -> Suite:
    rng = random.Random(seed + 2)
    rows: list[Row] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n_total:
        attempts += 1
        if attempts > 100 * n_total:
            raise RuntimeError("could not generate enough distinct Python expressions")
        kind = rng.choice(PYTHON_KINDS)
        expr = _py_expr(rng, kind)
        if expr in seen:
            continue
        seen.add(expr)
        row = _row(PYTHON_PROMPT.format(expr=expr), python_answers(python_value(expr)))
        if _echo_scores(row):
            continue
        rows.append(row)
    calibration, eval_rows = _split(
        rows, seed=seed + 3, n_eval=n_total - CALIBRATION_SIZE, n_calibration=CALIBRATION_SIZE
    )
    return Suite(
        "python_eval",
        calibration,
        eval_rows,
        {
            "generator": "bench/build_tasks.py (seeded expression templates; answers from evaluating them with Python)",
            "licence": "generated",
            "seed": seed,
        },
    )


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[], Suite]] = {
    "capitals": build_capitals,
    "capitals_mc": build_capitals_mc,
    "arithmetic": build_arithmetic,
    "arithmetic_mc": build_arithmetic_mc,
    "python_eval": build_python_eval,
}


def jsonl_bytes(rows: list[Row]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_suite(suite: Suite, out_dir: Path) -> dict[str, Any]:
    target = out_dir / suite.name
    target.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    for split, rows in (("calibration", suite.calibration), ("eval", suite.eval)):
        data = jsonl_bytes(rows)
        (target / f"{split}.jsonl").write_bytes(data)
        files[split] = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    return {"source": suite.source, "files": files}


def build(out_dir: Path = DEFAULT_OUT, suites: list[str] | None = None) -> dict[str, Any]:
    """Build the named suites (all by default) into `out_dir`; update its manifest.json."""
    names = suites or list(BUILDERS)
    manifest_path = out_dir / "manifest.json"
    manifest: dict[str, Any] = {}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest.setdefault("seed", SEED)
    manifest.setdefault("suites", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        manifest["suites"][name] = write_suite(BUILDERS[name](), out_dir)
    manifest["suites"] = dict(sorted(manifest["suites"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--suites", nargs="+", choices=list(BUILDERS), default=None)
    args = parser.parse_args(argv)
    manifest = build(args.out, args.suites)
    for name, entry in manifest["suites"].items():
        files = entry["files"]
        print(f"{name}: calibration {files['calibration']['rows']} rows, eval {files['eval']['rows']} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
