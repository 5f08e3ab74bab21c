"""Calibration plumbing shared by the layer pass, the scorers and evaluation: progress and
cancellation of a stage (`StageProgress`) and right-padded, longest-first batches of token
sequences (`make_batches`). The passes themselves are in core/streaming/."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import Cancelled
from core.types import CancelFn, ProgressFn, never_cancel, no_progress

__all__ = [
    "Batch",
    "StageProgress",
    "default_batch_tokens",
    "make_batches",
    "pad_token_id",
]


# ---------------------------------------------------------------------------------------------
# progress helper
# ---------------------------------------------------------------------------------------------


@dataclass
class StageProgress:
    """Maps a sub-task's [0, 1] onto [start, end] of one stage and checks cancellation."""

    progress: ProgressFn = no_progress
    should_cancel: CancelFn = never_cancel
    stage: str = "score"
    start: float = 0.0
    end: float = 1.0

    def report(self, fraction: float, message: str) -> None:
        fraction = min(1.0, max(0.0, fraction))
        self.progress(self.stage, self.start + (self.end - self.start) * fraction, message)

    def check(self) -> None:
        if self.should_cancel():
            raise Cancelled("cancelled by request")

    def span(self, start: float, end: float) -> StageProgress:
        width = self.end - self.start
        return StageProgress(
            self.progress, self.should_cancel, self.stage, self.start + width * start, self.start + width * end
        )


# ---------------------------------------------------------------------------------------------
# batching
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T] long
    rows: tuple[int, ...]  # indices of the sequences in this batch

    @property
    def valid(self) -> torch.Tensor:
        return self.attention_mask.bool()

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def lengths(self) -> list[int]:
        return [int(x) for x in self.attention_mask.sum(dim=1)]


def pad_token_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def default_batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per batch: small on CPU (no gain from large batches), larger on GPUs."""
    return 16384 if torch.device(device).type == "cuda" else 2048


def make_batches(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str,
    *,
    max_batch_tokens: int = 2048,
    max_batch_size: int = 32,
) -> list[Batch]:
    """Right-padded batches, longest sequences first (deterministic; minimises padding).
    A batch holds at most `max_batch_size` sequences and `max_batch_tokens` padded tokens
    (a single longer sequence still gets its own batch)."""
    if not sequences:
        raise ValueError("no sequences to batch")
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    groups: list[list[int]] = []
    for i in order:
        if not sequences[i]:
            raise ValueError(f"sequence {i} is empty")
        if groups:
            group = groups[-1]
            width = len(sequences[group[0]])  # longest first
            if len(group) < max_batch_size and (len(group) + 1) * width <= max_batch_tokens:
                group.append(i)
                continue
        groups.append([i])
    batches = []
    for group in groups:
        width = len(sequences[group[0]])
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            seq = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        batches.append(Batch(input_ids=ids.to(device), attention_mask=mask.to(device), rows=tuple(group)))
    return batches
