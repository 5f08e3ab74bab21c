"""The inverse-Hessian factor GPTQ sweeps with: U upper triangular with (H + λI)⁻¹ = Uᵀ U.

The textbook chain (Cholesky of H, `cholesky_inverse`, Cholesky again) costs ≈ 4/3·n³ flops.
This module gets the same U from one Cholesky and one triangular inverse (≈ 2/3·n³): with J the
order-reversing permutation, let J H J = L Lᵀ; then H = (J L J)(J L J)ᵀ with J L J upper, so
H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and U = J L⁻¹ J (the upper Cholesky factor of H⁻¹ is unique, so this
is the very matrix the chain computes, up to rounding). On an 8B model's 14336-input down_proj
(float32) that is 26 s against 11 s a layer on this project's 2-core CPU (BENCHMARKS.md).

Everything happens in one [in, in] matrix: reversing both axes of a contiguous square matrix is
reversing its storage (done in place by chunks), the Cholesky factor overwrites its input, and the
triangular inverse runs in place by halves with panel-sized temporaries (only matrix products and
small triangular solves, so it runs on any device).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DEFAULT_DAMP", "inverse_hessian_factor"]

DEFAULT_DAMP = 0.01
#: how many times damp is multiplied by 10 when a Cholesky factorisation fails
_DAMP_RETRIES = 6
#: blocks up to this size are inverted with one triangular solve against the identity
_LEAF = 256
#: rows/columns per product when a half of the inverse is updated in place
_PANEL = 1024


def inverse_hessian_factor(
    hessian: torch.Tensor | Callable[[], torch.Tensor],
    damp: float = DEFAULT_DAMP,
    *,
    dtype: torch.dtype = torch.float64,
    overwrite: bool = False,
) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so that (H + λI)⁻¹ = Uᵀ U) in `dtype`, with
    λ = damp · mean of the live diagonal and dead inputs given the mean diagonal.

    float64 by default; a caller factoring a very wide H (an 8B model's 14336-input down_proj:
    1.6 GB a float64 matrix) may ask for float32, as most GPTQ implementations use.

    U is returned as a column-major view of the one working matrix. `hessian` is:
    * a tensor: the working matrix is a copy (the caller's H and one more matrix are alive);
      with `overwrite` the caller hands H over and, when it is a contiguous `dtype` tensor, it is
      the working matrix and is destroyed (a damp retry then has no H: ValueError);
    * a callable returning a fresh H each call (e.g. `lambda: inputs.hessian(name)`): the caller
      keeps no reference, so only the working matrix is alive (and, while a float32 H is
      converted to float64, that H); a damp retry calls it again.

    Raises ValueError for a non-square or non-finite H or when no dampening up to
    damp · 10^_DAMP_RETRIES makes it positive definite."""
    if not damp > 0.0:
        raise ValueError(f"damp must be > 0, got {damp}")
    given = hessian if isinstance(hessian, torch.Tensor) else None
    if given is not None:
        _check_square(given)
    build: Callable[[], torch.Tensor] = (lambda: given) if given is not None else hessian  # type: ignore[assignment]
    owned = overwrite or given is None
    del hessian
    h: torch.Tensor | None
    h, live_mean = _prepared(build(), dtype, owned)
    # an overwritten H cannot be prepared again for a damp retry
    consumed = given is not None and owned and h.data_ptr() == given.data_ptr()
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(_DAMP_RETRIES + 1):
        lam = damp * (10.0**attempt) * live_mean
        if h is None:  # destroyed by a failed attempt
            if consumed:
                raise ValueError(
                    "hessian could not be factored and was overwritten; pass a function that "
                    "rebuilds it to allow damp retries"
                )
            h, _ = _prepared(build(), dtype, owned)
        torch.diagonal(h).add_(lam)
        _reverse_storage(h)  # J (H + λI) J
        hf = h.mT  # column-major, the same values (h is exactly symmetric)
        torch.linalg.cholesky_ex(hf, out=(hf, info))  # L, in place
        # for a positive semi-definite H every pivot of H + λI is ≥ λ (in any order); a smaller
        # one means H is indefinite beyond what λ covers (a near-singular matrix may "factor")
        if int(info) == 0 and float(torch.diagonal(hf).square().min()) >= 0.5 * lam:
            _invert_lower_(hf)  # L⁻¹, in place
            _reverse_storage(h)  # hf = J L⁻¹ J = U
            if _all_finite(h):
                return hf
        del hf
        h = None
    raise ValueError(f"hessian is not positive definite even with damp {damp * 10.0**_DAMP_RETRIES:g}")


def _reverse_storage(m: torch.Tensor, chunk: int = 1 << 20) -> None:
    """Reverse a contiguous matrix's storage in place (for a square one: both axes reversed,
    M ← J M J), swapping mirrored chunks so only two chunks are ever copied."""
    flat = m.view(-1)
    n = flat.numel()
    half = n // 2
    for k in range(0, half, chunk):
        c = min(chunk, half - k)
        front = flat[k : k + c].flip(0)
        flat[k : k + c] = flat[n - k - c : n - k].flip(0)
        flat[n - k - c : n - k] = front


def _invert_lower_(m: torch.Tensor) -> None:
    """Invert the lower-triangular `m` in place (its strict upper triangle must be zero, as
    torch's Cholesky leaves it; it stays zero). With m = [[A, 0], [C, D]]:
    m⁻¹ = [[A⁻¹, 0], [−D⁻¹ C A⁻¹, D⁻¹]]: invert both halves, then C ← −D⁻¹ (C A⁻¹) by panels."""
    n = m.shape[0]
    if n <= _LEAF:
        eye = torch.eye(n, dtype=m.dtype, device=m.device)
        m.copy_(torch.linalg.solve_triangular(m, eye, upper=False))
        return
    k = n // 2
    a_inv, c, d_inv = m[:k, :k], m[k:, :k], m[k:, k:]
    _invert_lower_(a_inv)
    _invert_lower_(d_inv)
    # C ← C A⁻¹ left to right: columns [j0, j1) of the product read C's columns ≥ j0 only
    for j0 in range(0, k, _PANEL):
        j1 = min(j0 + _PANEL, k)
        c[:, j0:j1] = c[:, j0:] @ a_inv[j0:, j0:j1]
    # C ← −D⁻¹ C bottom up: rows [i0, i1) of the product read C's rows < i1 only
    for i1 in range(n - k, 0, -_PANEL):
        i0 = max(i1 - _PANEL, 0)
        c[i0:i1] = d_inv[i0:i1, :i1] @ c[:i1]
    c.neg_()


def _check_square(hessian: torch.Tensor) -> None:
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square [in, in], got shape {tuple(hessian.shape)}")


def _all_finite(h: torch.Tensor, rows: int = 256) -> bool:
    """torch.isfinite(h).all() without an [in, in] mask."""
    return all(bool(torch.isfinite(h[i : i + rows]).all()) for i in range(0, h.shape[0], rows))


def _prepared(
    hessian: torch.Tensor | None, dtype: torch.dtype, owned: bool, block: int = 512
) -> tuple[torch.Tensor, float]:
    """H as a contiguous `dtype` matrix (a copy unless `owned`), exactly symmetric, dead inputs
    given the mean live diagonal; that mean."""
    if hessian is None:
        raise ValueError("hessian is None (no calibration activations)")
    _check_square(hessian)
    h = hessian.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=not owned)
    del hessian
    if not _all_finite(h):
        raise ValueError("hessian has NaN or inf values")
    # exact symmetry for the factorisation: (H + Hᵀ) / 2 by blocks, in place
    n = h.shape[0]
    for i0 in range(0, n, block):
        for j0 in range(i0, n, block):
            s = h[i0 : i0 + block, j0 : j0 + block] + h[j0 : j0 + block, i0 : i0 + block].T
            s.div_(2)
            h[i0 : i0 + block, j0 : j0 + block] = s
            h[j0 : j0 + block, i0 : i0 + block] = s.T
    diag = torch.diagonal(h)
    dead = diag <= 0
    live_mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = live_mean  # a view: writes into h
    return h, live_mean
