"""How a measured rate is held against a peak: which peak, the fraction, and how it is shown. No heavy imports:
the CLI's progress bar uses it at start-up."""

from __future__ import annotations


def peak_key(precision: str, device: str = "cpu") -> str:
    """Which measured peak (`peaks.measured_peaks`) a rate in `precision` on `device` is held against: the
    precision on a CPU, "cuda-" + the precision on a GPU ("cuda" or "cuda:N")."""
    return precision if device == "cpu" else f"cuda-{precision}"


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
