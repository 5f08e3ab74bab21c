"""Profile plot: importance per layer (bars coloured by the chosen bits) and the chosen bits.

Uses matplotlib's object API with the Agg canvas (no pyplot global state, safe in worker
threads). The PNG carries no timestamp/software metadata, so the same profile gives the same bytes.
"""

from __future__ import annotations

import io

from core.types import Profile, effective_bits

__all__ = ["plot_profile", "profile_effective_bits"]

_BIT_COLOURS = {2: "#b2182b", 3: "#ef8a62", 4: "#f4a582", 8: "#92c5de", 16: "#2166ac"}
_NO_BITS = "#888888"


def profile_effective_bits(profile: Profile, group_size: int | None = None, symmetric: bool = False) -> float | None:
    """Weight-count-weighted effective bits of the chosen widths (nominal bits without group
    overhead when `group_size` is None); None when no bits are chosen."""
    if not profile.layers or any(l.bits is None for l in profile.layers):
        return None
    total = sum(l.params for l in profile.layers)
    if total == 0:
        return None
    stored = 0.0
    for l in profile.layers:
        per_weight = effective_bits(l.bits, group_size, symmetric) if group_size else float(l.bits)
        stored += per_weight * l.params
    return stored / total


def plot_profile(profile: Profile, title: str | None = None, *, group_size: int | None = None,
                 symmetric: bool = False, effective: float | None = None) -> bytes:
    """PNG bytes: top panel importance (and sensitivity) per layer, bottom panel chosen bits.

    The title is `title` (default "<model> · <method>") with the effective bits appended when
    bits are chosen (`effective` if given, else computed from the profile; with `group_size`
    it includes scale/zero overhead, otherwise it is the nominal mean)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    layers = profile.layers
    x = [l.index for l in layers]
    has_bits = bool(layers) and all(l.bits is not None for l in layers)
    eff = effective if effective is not None else profile_effective_bits(profile, group_size, symmetric)
    heading = title or f"{profile.model} · {profile.method}"
    if eff is not None and "bits" not in heading:
        heading += f" · {eff:.3f} {'effective' if group_size or effective is not None else 'mean'} bits"

    fig = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2.5), 5.2), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    colours = [_BIT_COLOURS.get(l.bits, _NO_BITS) if l.bits is not None else _NO_BITS for l in layers]
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
        used = sorted({l.bits for l in layers})
        ax1.legend(handles=[Patch(color=_BIT_COLOURS.get(b, _NO_BITS), label=f"{b} bit") for b in used],
                   fontsize=7, loc="upper right", ncol=len(used))
        ax2.step(x, [l.bits for l in layers], where="mid", color="#333333")
        ax2.scatter(x, [l.bits for l in layers], c=colours, edgecolors="black", linewidths=0.3, zorder=3)
        ax2.set_yticks(used)
    else:
        ax2.text(0.5, 0.5, "no bits allocated yet", ha="center", va="center", transform=ax2.transAxes,
                 fontsize=8, color="#555555")
        ax2.set_yticks([])
    ax2.set_ylabel("bits")
    ax2.set_xlabel("layer")
    if len(x) <= 40:
        ax2.set_xticks(x)
        ax2.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
