"""Build the benchmark task suites under bench/tasks/<suite>/{calibration,eval}.jsonl.

    python bench/build_tasks.py                 # all suites into bench/tasks/
    python bench/build_tasks.py --out /tmp/t    # elsewhere (the unit test rebuilds and compares)
    python bench/build_tasks.py --suites arithmetic python_eval

Every gold answer comes from a third-party data package or is computed by Python; nothing is
typed by hand. Splits are seeded and disjoint; the output is byte-for-byte reproducible for the
same source package versions (recorded in bench/tasks/manifest.json).

Suites
  capitals     country -> capital from the `countryinfo` PyPI package (MIT).
  arithmetic   one-step word problems, templates x seeded random numbers, answers computed.
  python_eval  short Python expressions, answers from evaluating them with Python itself.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

DEFAULT_OUT = Path(__file__).resolve().parent / "tasks"
SEED = 20251106
CALIBRATION_SIZE = 128
EVAL_SIZE = 200
CAPITALS_EVAL_SIZE = 150

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
    from core.evaluation import contains_match

    return contains_match(_question(row), row["answers"]) > 0


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

    Entries without an alpha-2 code (e.g. Scotland) or without a capital are dropped. When
    several entries share a code (Burma/Myanmar, the two Vatican and Palestine records) their
    capitals are merged as alternative answers and the shortest name is asked about.
    """
    import countryinfo
    from countryinfo import CountryInfo

    by_code: dict[str, list[dict[str, Any]]] = {}
    data = CountryInfo.all()
    for key in sorted(data):
        info = data[key]
        code = ((info.get("ISO") or {}).get("alpha2") or "").strip().upper()
        if not code or not _capital_names(info.get("capital")):
            continue
        by_code.setdefault(code, []).append(info)
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


def build_capitals(seed: int = SEED) -> Suite:
    entries, version = capital_entries()
    rows = [_row(CAPITALS_PROMPT.format(country=name), capitals) for name, capitals in entries]
    # Djibouti, Singapore, Mexico City...: a gold already in the question would score an echo
    rows = [r for r in rows if not _echo_scores(r)]
    # eval gets 150 countries when the source allows; calibration keeps at least 64
    n_eval = min(CAPITALS_EVAL_SIZE, len(rows) - 64)
    calibration, eval_rows = _split(rows, seed=seed, n_eval=n_eval,
                                    n_calibration=min(CALIBRATION_SIZE, len(rows) - n_eval))
    return Suite("capitals", calibration, eval_rows,
                 {"package": "countryinfo", "version": version, "licence": "MIT",
                  "entries": len(rows)})


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------

NAMES = ["Anna", "Ben", "Carlos", "Dina", "Emil", "Fatima", "Grace", "Hiro", "Ivan", "Jade",
         "Kofi", "Lena", "Maya", "Noah", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tara"]
ITEMS = ["apples", "books", "marbles", "pencils", "stickers", "cookies", "coins", "cards",
         "shells", "stamps", "balloons", "oranges"]


@dataclass(frozen=True)
class _ArithTemplate:
    text: str
    op: str  # + - *


#: Zero-shot, small numbers, round-robin over the templates. SmolLM2-135M answers these by
#: restating the problem ("... so she has 5 - 1 = 4 marbles left."); a pilot dropped templates it
#: almost never finished within 24 new tokens ("What is a * b?", "rows of", "are lost",
#: "altogether": <10 %), which measured the token limit rather than the skill.
ARITHMETIC_TEMPLATES = [
    _ArithTemplate("What is {a} + {b}?", "+"),
    _ArithTemplate("What is {a} - {b}?", "-"),
    _ArithTemplate("{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", "+"),
    _ArithTemplate("{name} had {a} {items} and gave away {b}. How many {items} does {name} have left?", "-"),
    _ArithTemplate("{name} buys {a} bags with {b} {items} in each bag. How many {items} does {name} buy?", "*"),
]


def _arith_numbers(rng: random.Random, op: str) -> tuple[int, int, int] | None:
    """Operands and the Python-computed answer; None when the answer equals an operand (an echo
    of the question would then count as correct)."""
    if op == "+":
        a, b = rng.randint(1, 10), rng.randint(1, 10)
        answer = a + b
    elif op == "-":
        a = rng.randint(3, 15)
        b = rng.randint(1, a - 1)
        answer = a - b
    elif op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 10)
        answer = a * b
    else:
        raise ValueError(op)
    return None if answer in (a, b) else (a, b, answer)


def build_arithmetic(seed: int = SEED, n_total: int = EVAL_SIZE + CALIBRATION_SIZE) -> Suite:
    rng = random.Random(seed)
    rows: list[Row] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n_total:
        attempts += 1
        if attempts > 100 * n_total:
            raise RuntimeError("could not generate enough distinct arithmetic problems")
        index = len(rows) % len(ARITHMETIC_TEMPLATES)
        template = ARITHMETIC_TEMPLATES[index]
        numbers = _arith_numbers(rng, template.op)
        if numbers is None:
            continue
        a, b, answer = numbers
        # one problem per (template, numbers): names and items alone do not make a new problem
        key = f"{index}:{a}:{b}"
        if key in seen:
            continue
        seen.add(key)
        question = template.text.format(name=rng.choice(NAMES), items=rng.choice(ITEMS), a=a, b=b)
        row = _row(question, [str(answer)])
        if _echo_scores(row):
            continue
        rows.append(row)

    calibration, eval_rows = _split(rows, seed=seed + 1, n_eval=EVAL_SIZE, n_calibration=CALIBRATION_SIZE)
    return Suite("arithmetic", calibration, eval_rows,
                 {"generator": "bench/build_tasks.py (seeded templates; answers computed by Python)",
                  "licence": "generated", "seed": seed})


# --------------------------------------------------------------------------------------------
# python_eval
# --------------------------------------------------------------------------------------------

#: Zero-shot. In a pilot this phrasing made SmolLM2-135M restate the expression and give a value
#: ("`6 * 5` evaluates to 30.") far more often than "What is the value of ...? Reply with just the
#: value." (which it answered with a guessed number) or a REPL/"compute" framing.
PYTHON_PROMPT = "What does the Python expression `{expr}` evaluate to?"

WORDS = ["cat", "dog", "hello", "python", "river", "apple", "green", "moon", "table", "code",
         "sun", "tree", "house", "water", "light", "bird", "stone", "music", "paper", "cloud"]

#: Expression kinds, drawn uniformly. The mix spans kinds SmolLM2-135M mostly gets right (small
#: +, *, squares) to kinds it rarely does (%, len, sum). Kinds whose answer is a literal of the
#: expression (max, min, indexing) are left out: echoing the expression would score; so are
#: .upper()/.lower(), which a case-insensitive scorer cannot check.
PYTHON_KINDS = ["add", "sub", "mul", "pow", "floordiv", "mod", "count", "bool_int", "sum", "len"]


def _py_expr(rng: random.Random, kind: str) -> str:
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    word = rng.choice(WORDS)
    if kind == "add":
        return f"{a} + {b}"
    if kind == "sub":
        return f"{max(a, b)} - {min(a, b)}"
    if kind == "mul":
        return f"{a} * {b}"
    if kind == "pow":
        return f"{rng.randint(2, 15)} ** 2"
    if kind == "floordiv":
        return f"{a * b + rng.randint(0, b - 1)} // {b}"
    if kind == "mod":
        return f"{a + 10} % {b + 1}"
    if kind == "count":
        return f'"{word}".count("{rng.choice(word)}")'
    if kind == "bool_int":
        return f"True + {rng.randint(1, 20)}"
    if kind == "sum":
        return f"sum({[rng.randint(1, 9) for _ in range(rng.randint(2, 3))]})"
    if kind == "len":
        return f'len("{word}")'
    raise ValueError(kind)


_SAFE_BUILTINS = {"len": len, "max": max, "min": min, "sorted": sorted, "sum": sum, "abs": abs,
                  "int": int, "str": str, "range": range}


def python_value(expr: str) -> Any:
    """Evaluate a generated expression with Python (literals and a few builtins only)."""
    tree = ast.parse(expr, mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in _SAFE_BUILTINS:
            raise ValueError(f"unexpected name {node.id!r} in {expr!r}")
    return eval(compile(tree, "<expr>", "eval"), {"__builtins__": {}}, dict(_SAFE_BUILTINS))  # noqa: S307


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
    calibration, eval_rows = _split(rows, seed=seed + 3, n_eval=EVAL_SIZE, n_calibration=CALIBRATION_SIZE)
    return Suite("python_eval", calibration, eval_rows,
                 {"generator": "bench/build_tasks.py (seeded expression templates; answers from "
                               "evaluating them with Python)",
                  "licence": "generated", "seed": seed})


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[], Suite]] = {
    "capitals": build_capitals,
    "arithmetic": build_arithmetic,
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
