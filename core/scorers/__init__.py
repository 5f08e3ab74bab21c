"""Layer scorers, one module per method, each a `core.streaming.layer_pass.StreamScorer`:
per-layer statistics observed during the layer pass, optional probe streams, and per-layer
scores once the pass is done. `make_scorer` picks one by `spec.method`; `core.pipeline` runs it.

Every method's profile has one `LayerProfile` per decoder layer (index, full dotted name,
quantizable weight count, raw scores, importance, sensitivity >= 0 and quant_error[b] for every b
in `spec.bit_choices`, measured by the pass). Same model, rows, spec and seed give an identical
profile (seeded `torch.Generator`s only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from core.spec import JobSpec, Method
from core.streaming.layer_pass import StreamScorer

__all__ = ["SCORERS", "make_scorer"]


def _taq(spec: JobSpec, **options: Any) -> StreamScorer:
    from core.scorers.taq import TaqScorer

    return TaqScorer(spec)


def _taq_kl(spec: JobSpec, **options: Any) -> StreamScorer:
    from core.scorers.taq_kl import TaqKlScorer

    return TaqKlScorer(spec)


def _taqo(spec: JobSpec, **options: Any) -> StreamScorer:
    from core.scorers.taqo import TaqoScorer

    return TaqoScorer(spec, **{k: v for k, v in options.items() if k in ("generate", "bits", "max_new_tokens")})


def _taqo_gen(spec: JobSpec, **options: Any) -> StreamScorer:
    from core.scorers.taqo_gen import TaqoGenScorer

    keys = ("generate_variants", "bits", "max_new_tokens")
    return TaqoGenScorer(spec, **{k: v for k, v in options.items() if k in keys})


def _taq_grad(spec: JobSpec, **options: Any) -> StreamScorer:
    from core.scorers.taq_grad import TaqGradScorer

    return TaqGradScorer(spec, **{k: v for k, v in options.items() if k in ("generate", "max_new_tokens")})


def _uniform(spec: JobSpec, **options: Any) -> StreamScorer:
    from core.scorers.uniform import UniformScorer

    return UniformScorer()


#: one entry per method: a new method is one entry here and one module
SCORERS: dict[Method, Callable[..., StreamScorer]] = {
    Method.taq: _taq,
    Method.taq_kl: _taq_kl,
    Method.taqo: _taqo,
    Method.taqo_gen: _taqo_gen,
    Method.taq_grad: _taq_grad,
    Method.uniform: _uniform,
}


def make_scorer(spec: JobSpec, **options: Any) -> StreamScorer:
    """The scorer of `spec.method`; `options` reach the methods that take them (`generate` for
    taqo's and taq_grad's self-answers, `bits` for taqo's probe width)."""
    return SCORERS[Method(spec.method)](spec, **options)
