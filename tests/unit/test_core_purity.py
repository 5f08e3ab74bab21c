"""core is a pure library: no service frameworks, no environment, no prints, no CUDA defaults."""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

CORE = Path(__file__).resolve().parents[2] / "core"
FORBIDDEN_IMPORTS = (
    "fastapi",
    "starlette",
    "celery",
    "kombu",
    "sqlalchemy",
    "alembic",
    "redis",
    "boto3",
    "botocore",
    "uvicorn",
    "common",
    "api",
    "worker",
    "cli",
)


def _sources() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if "__pycache__" not in p.parts)


def test_importing_core_pulls_in_no_service_framework() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import core\n"
        "names = sorted(m.name for m in pkgutil.walk_packages(core.__path__, 'core.'))\n"
        "for m in names:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps({'core': names, 'modules': sorted(sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=CORE.parent, timeout=300
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"core.pipeline", "core.scorers.taq", "core.models", "core.plot"} <= set(report["core"])
    loaded = report["modules"]
    bad = sorted(m for m in loaded if m.split(".")[0] in FORBIDDEN_IMPORTS)
    assert not bad, f"core imports service modules: {bad}"


def test_no_forbidden_import_statements() -> None:
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN_IMPORTS, f"{path}: imports {name}"


def test_no_environment_reads_or_prints() -> None:
    for path in _sources():
        tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
        names = [
            (t.string, tokens[i + 1].string if i + 1 < len(tokens) else "", t.start[0])
            for i, t in enumerate(tokens)
            if t.type == tokenize.NAME
        ]
        for name, following, line in names:
            assert name not in ("environ", "getenv", "putenv", "environb"), f"{path}:{line} reads the environment"
            assert not (name == "print" and following == "("), f"{path}:{line} prints"


def test_no_cuda_defaults() -> None:
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
                for d in defaults:
                    text = ast.unparse(d)
                    assert "cuda" not in text.lower(), f"{path}:{node.lineno} {node.name} defaults to {text}"
                    assert "getenv" not in text and "environ" not in text
