"""The publish stage and the profile rows: manifest.json, artifact rows, the result summary and the
final ``succeeded``. Nothing here reads an artifact back: exported files carry the sha256 and
stored-bits summary computed while they were written (core's export records), directory
artifacts the tar digest computed from their local copies at export (`WorkerHooks.exported`), and
the source model's hash comes from its cache (`common.model_registry.source_sha256`)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import delete

from common.artifacts import tar_digest_local, tar_layout
from common.db import session_scope
from common.job_status import JobStatus
from common.lifecycle import finish_job
from common.orm import Artifact, ProfileLayer
from common.settings import Settings
from common.storage import job_key
from core.canonical_json import canonical_json
from core.pipeline import JobOutputs
from core.types import BitMap, Profile
from worker.errors import LostOwnership

log = logging.getLogger("taq.worker")

FORMAT_BY_EXT = {
    "json": "json",
    "png": "png",
    "gguf": "gguf",
    "safetensors": "safetensors",
    "jsonl": "jsonl",
    "txt": "txt",
}


def jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_dict"):
            return jsonable(value.to_dict())
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "value") and hasattr(value, "name") and not isinstance(value, (int, float, str)):
        return value.value  # Enum
    if hasattr(value, "item") and callable(value.item):
        return value.item()  # numpy / torch scalar
    return value


def store_profile_rows(settings: Settings, job_id: str, profile: Profile) -> None:
    with session_scope(settings) as session:
        session.execute(delete(ProfileLayer).where(ProfileLayer.job_id == job_id))
        session.add_all(
            ProfileLayer(
                job_id=job_id,
                index=l.index,
                name=l.name,
                params=int(l.params),
                importance=float(l.importance),
                sensitivity=float(l.sensitivity),
                bits=l.bits,
                scores=jsonable(l.scores),
                quant_error={str(k): float(v) for k, v in l.quant_error.items()},
                linears=[x.to_dict() for x in l.linears] or None,
            )
            for l in profile.layers
        )


def directory_digests(job_id: str, files: list[tuple[str, Path]]) -> dict[str, Any]:
    """`JobHooks.exported` for the worker: the .tar digest of each directory artifact, from the
    local copies the exporter just wrote."""
    directories: dict[str, list[tuple[str, Path]]] = {}
    for name, path in files:
        head, sep, rest = name.partition("/")
        if sep:
            directories.setdefault(head, []).append((rest, Path(path)))
    digests = {}
    for head, entries in directories.items():
        keys = {job_key(job_id, "artifacts", head, *rel.split("/")): path for rel, path in entries}
        layout = tar_layout(
            head,
            [(rel, path.stat().st_size, job_key(job_id, "artifacts", head, *rel.split("/"))) for rel, path in entries],
        )
        digests[head] = {"tar_sha256": tar_digest_local(layout, keys), "tar_size": layout.size}
    return {"directories": digests}


def _artifact_rows(job_id: str, files: dict[str, dict[str, Any]], directories: dict[str, Any]) -> list[Artifact]:
    rows: list[Artifact] = []
    grouped: dict[str, list[tuple[str, dict]]] = {}
    for rel, meta in sorted(files.items()):
        head, sep, rest = rel.partition("/")
        if sep:
            grouped.setdefault(head, []).append((rest, meta))
            continue
        ext = rel.rsplit(".", 1)[-1] if "." in rel else ""
        rows.append(
            Artifact(
                job_id=job_id,
                name=rel,
                format=FORMAT_BY_EXT.get(ext, ext or "bin"),
                kind="file",
                size=meta["size"],
                sha256=meta["sha256"],
                storage_key=job_key(job_id, "artifacts", rel),
                files=None,
            )
        )
    for name, entries in grouped.items():
        tar = directories[name]
        rows.append(
            Artifact(
                job_id=job_id,
                name=name,
                format=name.split("-")[0],
                kind="directory",
                size=tar["tar_size"],
                sha256=tar["tar_sha256"],
                storage_key=job_key(job_id, "artifacts", name),
                files=[{"name": rel, "size": m["size"], "sha256": m["sha256"]} for rel, m in entries],
            )
        )
    return rows


def _closed_loop_summary(record: dict[str, Any] | None) -> dict[str, Any]:
    """What the closed loop shipped and each candidate's held-back NLL and answers (bits stay in
    bitmap.json)."""
    if record is None:
        return {}
    keys = ("name", "rule", "effective_bits", "measured_gold_nll", "calibration_contains", "answers_fewer")
    candidates = [{k: c.get(k) for k in keys} for c in record["candidates"]]
    summary = {k: record.get(k) for k in ("shipped", "holdout_rows", "answers_check")}
    return {"closed_loop": {**summary, "candidates": candidates}}


def _result_summary(hooks, outputs: JobOutputs, rows: list[Artifact]) -> dict[str, Any]:
    spec = outputs.spec
    budgets = []
    for allocation in outputs.allocations:
        names = outputs.artifact_names(allocation)
        budgets.append(
            {
                "avg_bits": allocation.budget,
                "effective_bits": allocation.effective_bits,
                "rule": allocation.rule.value,
                "solver": allocation.solver,
                "objective": allocation.objective,
                "bits": allocation.bits,
                "artifacts": [n for key, n in names.items() if key in [f.value for f in spec.exports]],
                **_closed_loop_summary(allocation.closed_loop),
            }
        )
    metrics = None
    if outputs.eval_report:  # the means; eval.json has the intervals and per-item results
        reports = outputs.eval_report.get("budgets", [outputs.eval_report])
        metrics = []
        for r in reports:
            teacher = r.get("teacher_forced", {})
            metrics.append(
                {
                    "avg_bits": r.get("meta", {}).get("avg_bits"),
                    "scores": {
                        variant: {
                            "n": m.get("n"),
                            **{k: (m.get(k) or {}).get("mean") for k in ("exact_match", "f1", "contains")},
                        }
                        for variant, m in r.get("metrics", {}).items()
                    },
                    "gold_nll": {variant: (t.get("gold_nll") or {}).get("mean") for variant, t in teacher.items()},
                    "fidelity": r.get("fidelity"),
                    "generation": r.get("generation"),
                }
            )
    return {
        "device": hooks.device,
        "budgets": budgets,
        "metrics": metrics,
        "artifacts": sorted(r.name for r in rows),
        "timings": dict(hooks.timings),
        "resources": hooks.memory.summary(),
        "attempt": hooks.claim.attempt,
    }


def publish(hooks, outputs: JobOutputs) -> dict[str, Any]:
    """manifest.json from the recorded hashes, artifact rows, result summary, then ``succeeded``."""
    from common.model_registry import source_sha256
    from core.export.manifest import MANIFEST_NAME, assemble_manifest, library_versions

    settings, job_id = hooks.settings, hooks.job_id
    files: dict[str, dict[str, Any]] = {}
    for key, (size, sha256) in outputs.written.items():
        files[key.removeprefix("artifacts/")] = {"size": size, "sha256": sha256}
    storage_by_tag: dict[str, Any] = {}
    directories: dict[str, Any] = {}
    for record in outputs.exports:
        for f in record.files:
            files[f["name"]] = {"size": f["size"], "sha256": f["sha256"]}
        storage_by_tag[record.tag] = record.storage
        directories.update(record.extra.get("directories", {}))
    single = outputs.allocations[0] if len(outputs.allocations) == 1 else None
    storage = {name: s for per_tag in storage_by_tag.values() for name, s in per_tag.items()}
    manifest = assemble_manifest(
        outputs.spec,
        outputs.spec.model,
        source_sha256(settings, outputs.source),
        single.bit_map if single else BitMap({}, outputs.spec.allocation_unit),
        single.effective_bits if single else None,
        entries=[{"name": name, **meta} for name, meta in sorted(files.items())],
        storage=storage,
        library_versions=library_versions(),
    )
    if single is None:  # a budget sweep: one bit map per budget
        manifest["budgets"] = [
            {
                "avg_bits": a.budget,
                "effective_bits": a.effective_bits,
                a.bit_map.manifest_key: dict(a.bits),
                "artifacts": sorted(outputs.artifact_names(a).values()),
            }
            for a in outputs.allocations
        ]
    data = canonical_json(manifest)
    hooks.storage.put_bytes(job_key(job_id, "artifacts", MANIFEST_NAME), data)
    files[MANIFEST_NAME] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    rows = _artifact_rows(job_id, files, directories)
    result = _result_summary(hooks, outputs, rows)
    with session_scope(settings) as session:
        session.execute(delete(Artifact).where(Artifact.job_id == job_id))
        session.add_all(rows)
    with session_scope(settings) as session:
        if not finish_job(session, job_id, hooks.claim.token, JobStatus.succeeded, result=result, message="succeeded"):
            raise LostOwnership(job_id)
    if not settings.keep_work_files:
        # the layer checkpoints (codes at every width) and stage markers only serve a resume: an
        # 8B job leaves ~12 GB there, which no quota counts; the artifacts stay
        try:
            hooks.storage.delete_prefix(job_key(job_id, "work") + "/")
        except Exception as exc:  # the job succeeded; a leftover is harmless, only space
            log.warning("could not remove the job's work files", extra={"error": repr(exc)})
    return result


def dumps(data: Any) -> bytes:
    return canonical_json(jsonable(data))
