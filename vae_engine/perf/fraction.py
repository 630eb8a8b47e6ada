"""How a measured rate is held against a peak: the fraction, and how it is shown. No heavy imports: the CLI's
progress bar uses it at start-up."""

from __future__ import annotations


def fraction_of(rate: float, peak: float | None) -> float | None:
    """rate / peak to 3 significant digits (a small model on a GPU runs at a fraction of a percent of its peak,
    which a fixed number of decimals would round to 0), or None without a peak."""
    return float(f"{rate / peak:.3g}") if peak else None


def percent(fraction: float | None, sign: bool = True) -> str:
    """A fraction of a peak as a percentage: whole percents from 1% up, 2 significant digits below ("0.27%")."""
    if fraction is None:
        return "-"
    value = f"{100 * fraction:.0f}" if fraction >= 0.01 else f"{100 * fraction:.2g}"
    return value + ("%" if sign else "")
