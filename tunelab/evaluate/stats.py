"""Bootstrap confidence intervals (numpy; seeded, so the same inputs give the same interval)."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the mean of `values`, by resampling items with replacement."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def bootstrap_ratio_ci(num, den, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(sum(num)/sum(den), low, high): e.g. token-weighted mean loss over items of different lengths."""
    x, y = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n, x.size))
    ratios = x[idx].sum(axis=1) / y[idx].sum(axis=1)
    a = (1 - level) / 2
    return float(x.sum() / y.sum()), float(np.quantile(ratios, a)), float(np.quantile(ratios, 1 - a))


def paired_diff_ci(a, b, n: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of b - a over the same items, with a paired bootstrap interval."""
    return bootstrap_ci(np.asarray(b, dtype=float) - np.asarray(a, dtype=float), n, seed, level)


def win_rate(outcomes, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Outcomes 1 (win), 0 (loss), 0.5 (tie) -> win rate with a bootstrap interval."""
    return bootstrap_ci(outcomes, n, seed)


def paired_ratio_diff_ci(num_a, den_a, num_b, den_b, n: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """sum(num_b)/sum(den_b) - sum(num_a)/sum(den_a) (e.g. the difference of token-weighted losses), with an
    interval from resampling the same items for both (paired)."""
    xa, ya, xb, yb = (np.asarray(v, dtype=float) for v in (num_a, den_a, num_b, den_b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, xa.size, size=(n, xa.size))
    d = xb[idx].sum(axis=1) / yb[idx].sum(axis=1) - xa[idx].sum(axis=1) / ya[idx].sum(axis=1)
    a = (1 - level) / 2
    return float(xb.sum() / yb.sum() - xa.sum() / ya.sum()), float(np.quantile(d, a)), float(np.quantile(d, 1 - a))


def bootstrap_stat(fn, *columns, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(fn(*columns), low, high) for a corpus-level statistic (e.g. macro-F1), resampling items."""
    cols = [np.asarray(c) for c in columns]
    size = cols[0].size
    if size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    vals = [fn(*(c[idx].tolist() for c in cols)) for idx in rng.integers(0, size, size=(n, size))]
    a = (1 - level) / 2
    return float(fn(*(c.tolist() for c in cols))), float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))
