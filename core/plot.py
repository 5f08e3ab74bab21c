"""Profile plot: importance per layer (bars coloured by the chosen bits) and the chosen bits.

Uses matplotlib's object API with the Agg canvas (no pyplot global state, safe in worker
threads). The PNG carries no timestamp/software metadata, so the same profile gives the same bytes.
"""

from __future__ import annotations

import io

from core.scheme import QuantScheme
from core.types import Profile

__all__ = ["plot_profile", "profile_effective_bits"]

_BIT_COLOURS = {2: "#b2182b", 3: "#ef8a62", 4: "#f4a582", 8: "#92c5de", 16: "#2166ac"}
_NO_BITS = "#888888"
_MIXED_BITS = "#b8a1cf"  # a layer whose linears got different widths (per-linear allocation)


def _linear_widths(profile: Profile) -> list[tuple[int, int]] | None:
    """(bits, params) of every allocated unit: the linears when they carry bits, else the layers."""
    out: list[tuple[int, int]] = []
    for l in profile.layers:
        if l.linears and all(x.bits is not None for x in l.linears):
            out += [(x.bits, x.params) for x in l.linears if x.bits is not None]
        elif l.bits is not None:
            out.append((l.bits, l.params))
        else:
            return None
    return out


def profile_effective_bits(profile: Profile, scheme: QuantScheme | None = None) -> float | None:
    """Weight-count-weighted effective bits of the chosen widths on `scheme` (nominal bits without
    group overhead when `scheme` is None); None when no bits are chosen."""
    widths = _linear_widths(profile) if profile.layers else None
    if not widths:
        return None
    total = sum(n for _, n in widths)
    if total == 0:
        return None
    stored = 0.0
    for bits, n in widths:
        per_weight = scheme.effective_bits(bits) if scheme else float(bits)
        stored += per_weight * n
    return stored / total


def plot_profile(
    profile: Profile,
    title: str | None = None,
    *,
    scheme: QuantScheme | None = None,
    effective: float | None = None,
) -> bytes:
    """PNG bytes: top panel importance (and sensitivity) per layer, bottom panel chosen bits.

    The title is `title` (default "<model> · <method>") with the effective bits appended when
    bits are chosen (`effective` if given, else computed from the profile; with `scheme`
    it includes scale/zero overhead, otherwise it is the nominal mean)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = profile.layers
    x = [l.index for l in layers]
    mean_bits = [l.mean_bits for l in layers]
    has_bits = bool(layers) and all(b is not None for b in mean_bits)
    eff = effective if effective is not None else profile_effective_bits(profile, scheme)
    heading = title or f"{profile.model} · {profile.method}"
    if eff is not None and "bits" not in heading:
        heading += f" · {eff:.3f} {'effective' if scheme or effective is not None else 'mean'} bits"

    fig = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2.5), 5.2), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    colours = [
        _BIT_COLOURS.get(l.bits, _NO_BITS) if l.bits is not None else (_MIXED_BITS if b is not None else _NO_BITS)
        for l, b in zip(layers, mean_bits)
    ]
    ax1.bar(x, [l.importance for l in layers], color=colours, edgecolor="black", linewidth=0.3)
    ax1.axhline(0.0, color="black", linewidth=0.6)
    values = [l.importance for l in layers] or [0.0]
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    span = (high - low) or 1.0
    ax1.set_ylim(low - 0.05 * span, high + 0.3 * span)  # headroom for the legend
    ax1.set_ylabel("importance")
    ax1.set_title(heading, fontsize=10)
    if any(l.sensitivity for l in layers):
        twin = ax1.twinx()
        sens = [l.sensitivity for l in layers]
        twin.plot(x, sens, color="black", marker=".", linewidth=0.8, label="sensitivity")
        twin.set_ylim(0.0, max(sens) * 1.35)
        twin.set_ylabel("sensitivity", fontsize=8)
        twin.tick_params(labelsize=7)
    if has_bits:
        used = sorted({l.bits for l in layers if l.bits is not None})
        handles = [Patch(color=_BIT_COLOURS.get(b, _NO_BITS), label=f"{b} bit") for b in used]
        if any(l.bits is None for l in layers):
            handles.append(Patch(color=_MIXED_BITS, label="mixed (per linear)"))
        ax1.legend(handles=handles, fontsize=7, loc="upper right", ncol=len(handles))
        ax2.step(x, mean_bits, where="mid", color="#333333")
        ax2.scatter(x, mean_bits, c=colours, edgecolors="black", linewidths=0.3, zorder=3)
        known = [b for b in mean_bits if b is not None]  # all of them (has_bits)
        ax2.set_yticks(sorted(set(used) | {min(known), max(known)}))
    else:
        ax2.text(
            0.5,
            0.5,
            "no bits allocated yet",
            ha="center",
            va="center",
            transform=ax2.transAxes,
            fontsize=8,
            color="#555555",
        )
        ax2.set_yticks([])
    ax2.set_ylabel("bits" if all(l.bits is not None for l in layers) else "mean bits")
    ax2.set_xlabel("layer")
    if len(x) <= 40:
        ax2.set_xticks(x)
        ax2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
