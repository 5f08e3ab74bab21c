"""`uniform`: no scoring. The profile still carries parameter counts and measured quantization
errors (activation-aware when calibration rows are given, relative weight error otherwise) so the
allocator and the plots work; importance is 0 and sensitivity 1 for every layer."""

from __future__ import annotations

from core.scorers.common import LayerScores
from core.streaming.layer_pass import PassResult, StreamScorer
from core.streaming.model import StreamedModel

__all__ = ["UniformScorer"]


class UniformScorer(StreamScorer):
    method = "uniform"

    def finish(self, model: StreamedModel, result: PassResult) -> list[LayerScores]:
        return [LayerScores(scores={}, importance=0.0, sensitivity=1.0) for _ in result.records]
