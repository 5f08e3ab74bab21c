"""The export stage of a job (core/job_stages.py): every allocation's artifacts written from the
layer checkpoints, one (layer, width) blob of codes at a time, uploaded and recorded with a
marker so a resumed job skips the allocations already exported."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from core.canonical_json import canonical_json as dumps
from core.pipeline import ExportRecord, artifact_names, budget_tag
from core.runtimes import hf_strategy
from core.spec import ExportFormat
from core.streaming.checkpoints import load_codes
from core.types import QuantizedWeight

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from core.job_stages import JobRun
    from core.models import LayerRef
    from core.streaming.checkpoints import CheckpointStore

__all__ = ["CheckpointWeights", "export_allocations", "source_tensor"]


class CheckpointWeights(Mapping[str, QuantizedWeight]):
    """The QuantizedWeights of an allocation, read lazily from the layer checkpoints: one
    (layer, width) blob is held at a time, since exporters ask for a layer's linears in order."""

    def __init__(
        self,
        store: CheckpointStore,
        prefix: str,
        layers: Sequence[LayerRef],
        bits_by_linear: dict[str, int],
        device: str | torch.device = "cpu",
    ) -> None:
        self.store, self.prefix, self.device = store, prefix, device
        self.bits = {name: b for name, b in bits_by_linear.items() if b < 16}
        self.layer_of = {name: ref.index for ref in layers for name in ref.linears}
        self._blob: tuple[tuple[int, int], dict[str, QuantizedWeight]] | None = None

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name not in self.bits:
            raise KeyError(name)
        key = (self.layer_of[name], self.bits[name])
        if self._blob is None or self._blob[0] != key:
            self._blob = None
            self._blob = (key, load_codes(self.store, self.prefix, key[0], key[1], device=self.device))
        return self._blob[1][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.bits)

    def __len__(self) -> int:
        return len(self.bits)


def export_allocations(run: JobRun) -> None:
    """Write, upload and record the artifacts of every allocation of `run` not yet exported."""
    from core.export import export_gguf, export_hf
    from core.export.manifest import storage_summary

    formats = {f.value for f in run.spec.exports}
    tracker = run.tracker("export")
    for i, allocation in enumerate(run.allocations):
        tag = budget_tag(allocation.budget)
        marker = f"work/export-{tag}.json"
        if run.store.exists(marker):
            run.exports.append(ExportRecord(tag=tag, **json.loads(run.store.get_bytes(marker))))
            continue
        names = artifact_names(run.allocations, allocation)
        weights = CheckpointWeights(
            run.store,
            run.codes_prefix,
            run.loaded.layers,
            allocation.bit_map.linear_bits(run.loaded.layers),
            device="cpu",
        )
        out = run.tmp / f"export-{tag}"
        local: list[tuple[str, Path]] = []
        files: list[dict[str, Any]] = []
        if ExportFormat.hf.value in formats:
            written = export_hf(
                run.loaded.skeleton,
                run.loaded.tokenizer,
                weights,
                allocation.bit_map,
                run.spec,
                out / names["hf"],
                strategy=hf_strategy(run.spec.target_runtime),
                tensors=partial(source_tensor, run),
            )
            tracker.check()
            run.store.delete_prefix(f"artifacts/{names['hf']}/")  # a partial upload of a crashed attempt
            for f in written:
                rel = f"{names['hf']}/{f.name}"
                run.store.put_file(f"artifacts/{rel}", f.path, handover=True)
                local.append((rel, f.path))
                files.append({"name": rel, "size": f.size, "sha256": f.sha256})
            if ExportFormat.gguf.value in formats:  # an 8B format takes minutes: show it moved
                tracker.report((i + 0.5) / len(run.allocations), f"exported {tag} (hf)")
        if ExportFormat.gguf.value in formats:
            source = run.inputs.source
            f = export_gguf(
                run.loaded.skeleton,
                run.loaded.tokenizer,
                weights,
                allocation.bit_map,
                run.spec,
                out / names["gguf"],
                source_gguf=source.file if source.gguf_file else None,
                tensors=partial(source_tensor, run),
            )
            tracker.check()
            run.store.put_file(f"artifacts/{names['gguf']}", f.path, handover=True)
            local.append((names["gguf"], f.path))
            files.append({"name": names["gguf"], "size": f.size, "sha256": f.sha256})
        record = ExportRecord(
            tag=tag, files=files, storage=storage_summary(local), extra=run.hooks.exported(tag, local)
        )
        shutil.rmtree(out, ignore_errors=True)
        run.store.put_bytes(marker, dumps({"files": record.files, "storage": record.storage, "extra": record.extra}))
        run.exports.append(record)
        tracker.report((i + 1) / len(run.allocations), f"exported {tag}")


def source_tensor(run: JobRun, name: str) -> torch.Tensor:
    """A non-quantized tensor for export, read at its stored float dtype (bf16 stays bf16)."""
    import torch

    stored = {"BF16": torch.bfloat16, "F16": torch.float16}.get(run.loaded.reader.infos()[name].dtype, torch.float32)
    tensor: torch.Tensor = run.loaded.reader.read(name, dtype=stored, device="cpu")
    return tensor
