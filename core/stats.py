"""Bootstrap intervals for evaluation results: the mean of per-item values, the paired difference
of two variants on the same items, the ratio of two means ("retained"), and the verdict of a
comparison ("beats" only when the interval excludes zero at no more effective bits).

Pairing matters: two variants scored on the same items share the items' difficulty, so the
interval of the per-item difference is much tighter than two marginal intervals compared.
Percentile bootstrap, numpy `default_rng(seed)`, items resampled with replacement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Comparison",
    "ConfidenceInterval",
    "bootstrap_ci",
    "compare",
    "paired_difference",
    "paired_ratio",
    "spearman",
]

#: metrics where a lower value is better (the others, contains / EM / F1, are higher-is-better)
LOWER_IS_BETTER = frozenset({"gold_nll", "mean_kl"})


@dataclass(frozen=True)
class ConfidenceInterval:
    """Mean of per-item values with a percentile-bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float
    n: int = 0
    alpha: float = 0.05

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "alpha": self.alpha}


def _check(n_resamples: int, alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha {alpha} is outside (0, 1)")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")


def _resampled_indices(n: int, n_resamples: int, seed: int) -> Iterator[tuple[int, int, npt.NDArray[np.int64]]]:
    """Index matrices of at most ~2M entries each (bounds memory for long value lists)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // n)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        yield start, stop, rng.integers(0, n, size=(stop - start, n))


def bootstrap_ci(
    values: Sequence[float], *, n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0
) -> ConfidenceInterval:
    """Percentile bootstrap of the mean: resample items with replacement `n_resamples` times
    (numpy `default_rng(seed)`), return the mean and the alpha/2, 1-alpha/2 quantiles."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D list of values")
    _check(n_resamples, alpha)
    means = np.empty(n_resamples, dtype=np.float64)
    for start, stop, idx in _resampled_indices(data.size, n_resamples, seed):
        means[start:stop] = data[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(mean=float(data.mean()), low=float(low), high=float(high), n=int(data.size), alpha=alpha)


def _pairs(a: Sequence[float | None], b: Sequence[float | None]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs the same items: {len(a)} vs {len(b)} values")
    kept = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not kept:
        raise ValueError("no item has a value in both variants")
    xs, ys = zip(*kept)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def paired_difference(a: Sequence[float | None], b: Sequence[float | None], **kwargs: Any) -> ConfidenceInterval:
    """Mean of b − a over the items where both have a value, with its bootstrap interval."""
    xs, ys = _pairs(a, b)
    return bootstrap_ci(ys - xs, **kwargs)


def paired_ratio(
    numerator: Sequence[float | None],
    denominator: Sequence[float | None],
    *,
    n_resamples: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> ConfidenceInterval | None:
    """mean(numerator) / mean(denominator) over the same resampled items (e.g. the task score a
    quantized model retains of full precision's); None when the denominator's mean is 0.
    Resamples whose denominator mean is 0 count as ratio 0 (rare: only for tiny, mostly-zero sets)."""
    den, num = _pairs(denominator, numerator)
    _check(n_resamples, alpha)
    if den.mean() == 0:
        return None
    ratios = np.empty(n_resamples, dtype=np.float64)
    for start, stop, idx in _resampled_indices(den.size, n_resamples, seed):
        d = den[idx].mean(axis=1)
        ratios[start:stop] = np.divide(num[idx].mean(axis=1), d, out=np.zeros_like(d), where=d != 0)
    low, high = np.quantile(ratios, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(
        mean=float(num.mean() / den.mean()), low=float(low), high=float(high), n=int(den.size), alpha=alpha
    )


@dataclass(frozen=True)
class Comparison:
    """`variant` against `baseline` on one metric: the paired difference variant − baseline and
    the effective bits of both. `verdict`: "beats" / "loses" when the interval excludes zero in
    the metric's better / worse direction, "no_difference" when it contains zero; a win that
    spent more effective bits than the baseline is "beats_with_more_bits", not a win."""

    variant: str
    baseline: str
    metric: str
    difference: ConfidenceInterval
    variant_bits: float | None
    baseline_bits: float | None

    @property
    def verdict(self) -> str:
        d = self.difference
        better = d.high < 0 if self.metric in LOWER_IS_BETTER else d.low > 0
        worse = d.low > 0 if self.metric in LOWER_IS_BETTER else d.high < 0
        if worse:
            return "loses"
        if not better:
            return "no_difference"
        if (
            self.variant_bits is not None
            and self.baseline_bits is not None
            and self.variant_bits > self.baseline_bits + 1e-9
        ):
            return "beats_with_more_bits"
        return "beats"

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "baseline": self.baseline,
            "metric": self.metric,
            "difference": self.difference.to_dict(),
            "variant_effective_bits": self.variant_bits,
            "baseline_effective_bits": self.baseline_bits,
            "lower_is_better": self.metric in LOWER_IS_BETTER,
            "verdict": self.verdict,
        }


def compare(
    variant: str,
    baseline: str,
    metric: str,
    variant_items: Sequence[float | None],
    baseline_items: Sequence[float | None],
    *,
    variant_bits: float | None,
    baseline_bits: float | None,
    seed: int = 0,
) -> Comparison:
    """The paired comparison of two variants' per-item values (same items, same order)."""
    return Comparison(
        variant,
        baseline,
        metric,
        paired_difference(baseline_items, variant_items, seed=seed),
        variant_bits,
        baseline_bits,
    )


def _ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """1-based ranks, ties given their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties: average ranks); 0 when
    either is constant."""
    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of the same length")
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = float(np.sqrt((da * da).sum() * (db * db).sum()))
    return float((da * db).sum() / denom) if denom > 0 else 0.0
