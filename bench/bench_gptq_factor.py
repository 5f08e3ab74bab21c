"""GPTQ's inverse-Hessian factor: ours (core/quant/factor.py: one Cholesky of the order-reversed H
and one in-place triangular inverse) against the textbook chain (Cholesky, cholesky_inverse,
Cholesky again), on the same H, in one run.

Prints, per size: seconds of each, their ratio, and the largest difference between the two
factors relative to the factor's largest entry. The sizes default to an 8B Llama's linear inputs
(4096 in float64, 14336 in float32, as core/quant/layer.py chooses) and a 1B's (2048, 8192).

    .venv/bin/python bench/bench_gptq_factor.py [--sizes 4096:float64 14336:float32] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.quant.factor import DEFAULT_DAMP, inverse_hessian_factor  # noqa: E402


def textbook_factor(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chain most GPTQ implementations run (with our dampening and dead-input rule)."""
    h = h.to(dtype, copy=True)
    diag = torch.diagonal(h)
    dead = diag <= 0
    live_mean = float(diag[~dead].mean())
    diag[dead] = live_mean
    diag.add_(DEFAULT_DAMP * live_mean)
    lower = torch.linalg.cholesky(h)
    del h
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def hessian(n: int, tokens: int, seed: int) -> torch.Tensor:
    """XᵀX / n of correlated activations (a shared component per token plus noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) + 0.5 * torch.randn(tokens, 1, generator=g)
    return (x.T @ x).div_(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["2048:float64", "8192:float64", "4096:float64", "14336:float32"])
    parser.add_argument("--tokens", type=int, default=1024, help="calibration tokens behind H")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, H from {args.tokens} tokens")
    print("| inputs | dtype | textbook s | ours s | textbook / ours | max diff / max entry |")
    print("|---|---|---|---|---|---|")
    for i, item in enumerate(args.sizes):
        size, _, dtype_name = item.partition(":")
        n, dtype = int(size), getattr(torch, dtype_name or "float64")
        h = hessian(n, args.tokens, seed=i)
        t0 = time.perf_counter()
        ref = textbook_factor(h, dtype)
        t1 = time.perf_counter()
        ours = inverse_hessian_factor(h, dtype=dtype)
        t2 = time.perf_counter()
        diff = float((ours - ref).abs().max()) / float(ref.abs().max())
        print(
            f"| {n} | {dtype_name} | {t1 - t0:.2f} | {t2 - t1:.2f} | {(t1 - t0) / (t2 - t1):.2f} | {diff:.1e} |",
            flush=True,
        )
        del ref, ours, h


if __name__ == "__main__":
    main()
