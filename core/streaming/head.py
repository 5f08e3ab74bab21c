"""The LM head applied in vocabulary chunks: what scorers and evaluation need from the
next-token distributions (log-normaliser, top-1, the gold token's log-probability, KL to a
reference distribution) without ever holding full-vocabulary logits or the whole head matrix.

Every query is a set of final hidden states [N, H] (before the final norm). The final norm is
onloaded once; then each chunk of head rows is read once and applied to every query, so the
head is read O(1) times however many streams are scored. Statistics are accumulated online in
float64 (a running maximum rescales the running sums, as in a streaming log-sum-exp):

    lse = m + log Σ exp(z − m)
    KL(p_ref ‖ p) = Σ p_ref (z_ref − z) − lse_ref + lse = t / s_ref − lse_ref + lse,
    with s_ref = Σ exp(z_ref − m_ref) and t = Σ exp(z_ref − m_ref)(z_ref − z), rescaled together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.streaming.model import StreamedModel

__all__ = ["HeadGradient", "HeadQuery", "HeadStats", "head_nll_gradient", "head_stats"]

#: logits held per query and chunk: about 4M floats (16 MB; about seven such arrays are alive at once)
_CHUNK_ELEMENTS = 4 * 1024 * 1024
#: head rows read at once (float32 bytes; reading a quantized GGUF head makes ~3 such copies)
_WEIGHT_CHUNK_BYTES = 32 * 1024 * 1024


@dataclass
class HeadQuery:
    """`hidden` [N, H] final hidden states (before the final norm); `gold` [N] token ids whose
    log-probability is wanted; `reference` the index of another query at the same positions
    whose distribution is p_ref in KL(p_ref ‖ p_this)."""

    hidden: torch.Tensor
    gold: torch.Tensor | None = None
    reference: int | None = None


@dataclass
class HeadStats:
    lse: torch.Tensor  # [N] float64
    argmax: torch.Tensor  # [N] long
    gold_logprob: torch.Tensor | None  # [N] float64
    kl: torch.Tensor | None  # [N] float64, KL(p_ref ‖ p_this)


class _Acc:
    """Online statistics of one query. Elementwise work runs in float32 on logits shifted by the
    running maximum (every exponent is ≤ 0) in preallocated buffers; per-chunk sums are added to
    float64 running totals."""

    def __init__(self, n: int, device: torch.device, gold: torch.Tensor | None, has_ref: bool) -> None:
        self.m = torch.full((n,), -torch.inf, dtype=torch.float64, device=device)
        self.s = torch.zeros(n, dtype=torch.float64, device=device)
        self.best = torch.full((n,), -torch.inf, dtype=torch.float32, device=device)
        self.argmax = torch.zeros(n, dtype=torch.long, device=device)
        self.gold = gold
        self.gold_logit = torch.zeros(n, dtype=torch.float64, device=device) if gold is not None else None
        self.t = torch.zeros(n, dtype=torch.float64, device=device) if has_ref else None

    def update(self, z: torch.Tensor, start: int, shifted: torch.Tensor) -> torch.Tensor:
        """Fold in a chunk of logits [N, c] (float32); `shifted` receives exp(z − m) (queries that
        take this one as their reference use it). Returns m before the chunk."""
        chunk_max, chunk_arg = z.max(dim=1)
        better = chunk_max > self.best
        self.best = torch.where(better, chunk_max, self.best)
        self.argmax = torch.where(better, chunk_arg + start, self.argmax)
        m_old = self.m
        self.m = torch.maximum(m_old, chunk_max.to(torch.float64))
        torch.sub(z, self.m.to(z.dtype)[:, None], out=shifted).exp_()
        self.s = self.s * torch.exp(m_old - self.m) + shifted.sum(dim=1).to(torch.float64)
        if self.gold is not None:
            inside = (self.gold >= start) & (self.gold < start + z.shape[1])
            if bool(inside.any()):
                idx = (self.gold - start).clamp(0, z.shape[1] - 1)
                picked = z.gather(1, idx[:, None])[:, 0].to(torch.float64)
                assert self.gold_logit is not None  # allocated with `gold`
                self.gold_logit = torch.where(inside, picked, self.gold_logit)
        return m_old

    def update_kl(
        self,
        z: torch.Tensor,
        ref: _Acc,
        z_ref: torch.Tensor,
        ref_shifted: torch.Tensor,
        ref_m_old: torch.Tensor,
        scratch: torch.Tensor,
    ) -> None:
        """t = Σ exp(z_ref − m_ref)(z_ref − z), rescaled whenever the reference's maximum moves."""
        torch.sub(z_ref, z, out=scratch).mul_(ref_shifted)
        assert self.t is not None  # allocated for a query with a reference
        self.t = self.t * torch.exp(ref_m_old - ref.m) + scratch.sum(dim=1).to(torch.float64)

    @property
    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


class _Buffers:
    """Reused [n, rows] float32 arrays: one pair (logits, shifted) per reference query, which must
    survive while its dependents are processed, one shared pair for every other query, and a
    scratch array. Views of the first n·width elements stay contiguous for a narrower last chunk."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.rows, self.device = rows, device
        self.flat: dict[tuple[tuple[str | int, ...], int], torch.Tensor] = {}

    def get(self, key: tuple[str | int, ...], n: int, width: int) -> torch.Tensor:
        buf = self.flat.get((key, n))
        if buf is None:
            buf = self.flat[(key, n)] = torch.empty(n * self.rows, dtype=torch.float32, device=self.device)
        return buf[: n * width].view(n, width)


def _chunk_rows(vocab: int, positions: int, width: int, chunk_rows: int | None) -> int:
    """Head rows read at once: bounded by the logits held per query and by the weight chunk."""
    return chunk_rows or max(256, min(vocab, _CHUNK_ELEMENTS // max(positions, 1), _WEIGHT_CHUNK_BYTES // (4 * width)))


def head_stats(model: StreamedModel, queries: list[HeadQuery], *, chunk_rows: int | None = None) -> list[HeadStats]:
    """HeadStats per query (see the module docstring). References must come before the queries
    that name them."""
    for i, q in enumerate(queries):
        if q.reference is not None and not 0 <= q.reference < i:
            raise ValueError("a query's reference must be an earlier query")
    if not queries:
        return []
    norm_name = model.stack.final_norm_name
    assert norm_name is not None  # open_streamed refuses a model without a final norm
    with torch.no_grad(), model.onloaded(norm_name) as norm:
        normed = [norm(q.hidden.to(model.device, model.dtype)) for q in queries]
    vocab = model.vocab_size
    widest = max(max(int(h.shape[0]) for h in normed), 1)
    hidden = int(normed[0].shape[-1])
    rows = _chunk_rows(vocab, widest, hidden, chunk_rows)
    cap = model.logit_softcap
    accs = [
        _Acc(
            int(h.shape[0]), model.device, None if q.gold is None else q.gold.to(model.device), q.reference is not None
        )
        for q, h in zip(queries, normed, strict=True)
    ]
    dependents: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        if q.reference is not None:
            dependents.setdefault(q.reference, []).append(i)
    buffers = _Buffers(rows, model.device)
    with torch.no_grad():
        for start in range(0, vocab, rows):
            stop = min(vocab, start + rows)
            width = stop - start
            weight = model.head_rows(start, stop)
            kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
            for i, h in enumerate(normed):
                n = int(h.shape[0])
                own = ("ref", i) if i in dependents else ("shared",)
                z = buffers.get(own + ("z",), n, width)
                if h.dtype == torch.float32:
                    torch.mm(h, weight.T, out=z)
                else:  # a bf16/fp16 model (CUDA): logits are accumulated in float32 from here on
                    z.copy_(torch.mm(h, weight.T))
                if cap:
                    z.div_(cap).tanh_().mul_(cap)
                shifted = buffers.get(own + ("shifted",), n, width)
                m_old = accs[i].update(z, start, shifted)
                ref = queries[i].reference
                if ref is not None:
                    z_ref, ref_shifted, ref_m_old = kept[ref]
                    accs[i].update_kl(z, accs[ref], z_ref, ref_shifted, ref_m_old, buffers.get(("scratch",), n, width))
                if i in dependents:
                    kept[i] = (z, shifted, m_old)
            del weight, kept
    out = []
    for acc in accs:
        out.append(
            HeadStats(
                lse=acc.lse.cpu(),
                argmax=acc.argmax.cpu(),
                gold_logprob=None if acc.gold_logit is None else (acc.gold_logit - acc.lse).cpu(),
                kl=None,
            )
        )
    for i, q in enumerate(queries):
        if q.reference is not None:
            ref_acc, t = accs[q.reference], accs[i].t
            assert t is not None  # allocated for a query with a reference
            kl = t / ref_acc.s - ref_acc.lse + accs[i].lse
            out[i].kl = kl.clamp_min(0.0).cpu()
    return out


@dataclass
class HeadGradient:
    grad: torch.Tensor  # [N, H] ∂(Σ_i w_i·NLL_i)/∂hidden, float32
    nll: torch.Tensor  # [N] float64, each position's NLL of its gold token


def head_nll_gradient(
    model: StreamedModel,
    hidden: torch.Tensor,
    gold: torch.Tensor,
    weight: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> HeadGradient:
    """The gradient of the weighted gold-token NLL Σ_i w_i·NLL_i with respect to final hidden
    states [N, H] (before the final norm), the head read in chunks as in `head_stats`:
    ∂NLL_i/∂z_i = softmax(z_i) − onehot(gold_i), with softmax = exp(z − lse) from the chunked
    log-normaliser (one pass for lse, one for the gradient); soft-capped logits z = c·tanh(z₀/c)
    contribute the factor 1 − (z/c)². The final norm is differentiated by autograd."""
    stats = head_stats(model, [HeadQuery(hidden=hidden, gold=gold)], chunk_rows=chunk_rows)[0]
    assert stats.gold_logprob is not None  # the query has gold tokens
    n = int(hidden.shape[0])
    norm_name = model.stack.final_norm_name
    assert norm_name is not None  # open_streamed refuses a model without a final norm
    device = model.device
    lse = stats.lse.to(device)
    gold_d = gold.to(device)
    w = weight.to(device, torch.float32)
    vocab = model.vocab_size
    cap = model.logit_softcap
    with model.onloaded(norm_name) as norm:
        for param in norm.parameters():
            param.requires_grad_(False)
        leaf = hidden.to(device, model.dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            normed = norm(leaf)
        width = int(normed.shape[-1])
        rows = _chunk_rows(vocab, n, width, chunk_rows)
        d_normed = torch.zeros(n, width, dtype=torch.float32, device=device)
        z_in = normed.detach().float()
        with torch.no_grad():
            for start in range(0, vocab, rows):
                stop = min(vocab, start + rows)
                head = model.head_rows(start, stop).float()
                z = z_in @ head.T
                capped = None
                if cap:
                    capped = torch.tanh(z / cap)
                    z = capped * cap
                probs = torch.exp(z.double() - lse[:, None]).float()
                inside = torch.nonzero((gold_d >= start) & (gold_d < stop)).flatten()
                probs[inside, gold_d[inside] - start] -= 1.0
                probs.mul_(w[:, None])
                if capped is not None:
                    probs.mul_(1.0 - capped * capped)
                d_normed.addmm_(probs, head)
        normed.backward(d_normed.to(normed.dtype))
    assert leaf.grad is not None  # the leaf requires grad and reaches the norm's output
    return HeadGradient(grad=leaf.grad.detach().float(), nll=-stats.gold_logprob)
