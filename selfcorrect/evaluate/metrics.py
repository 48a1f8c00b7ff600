"""Shared statistics: metric rows, seeded (and paired) bootstrap confidence intervals, stratified subsamples.

A benchmark's statistic is written once, vectorised over resamples: it receives its per-unit columns with
a leading resample axis (shape ``(B, n)``) and returns one value per resample for each metric. The point
estimate is the same function on the unresampled data (``B = 1``), so estimate and interval cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np

from selfcorrect.evaluate.table import MetricRow  # the row type: its owner is the table module
from selfcorrect.provenance import stable_seed  # used here and by the benchmark modules

Statistic = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def safe_divide(num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """num / den elementwise, with ``empty`` where den == 0."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=float)
    np.divide(num, den, out=out, where=den != 0)
    return out


def pearson_r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis (NaN where either side is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    return safe_divide((xc * yc).sum(axis=-1), den)


def bootstrap(
    columns: dict[str, np.ndarray],
    statistic: Statistic,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 100,
) -> dict[str, tuple[float, float, float]]:
    """Point estimate and percentile bootstrap CI of each metric, resampling units with replacement.

    Returns ``{metric: (value, ci_low, ci_high)}``; a CI is NaN when too few resamples are defined.
    """
    n = len(next(iter(columns.values())))
    point = {k: float(v[0]) for k, v in statistic({k: c[None, :] for k, c in columns.items()}).items()}
    if n == 0 or n_boot <= 0:
        return {k: (v, np.nan, np.nan) for k, v in point.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in point}
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        with np.errstate(invalid="ignore", divide="ignore"):
            stats = statistic({k: c[idx] for k, c in columns.items()})
        for k in draws:
            draws[k].append(np.asarray(stats[k], dtype=float))
    alpha = (1 - level) / 2
    out = {}
    for k, value in point.items():
        d = np.concatenate(draws[k])
        d = d[np.isfinite(d)]
        if len(d) < 0.5 * n_boot:
            out[k] = (value, np.nan, np.nan)
        else:
            out[k] = (value, float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha)))
    return out


def paired_bootstrap(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    statistic: Statistic,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float, float]]:
    """Point estimate and paired percentile bootstrap CI of ``statistic(a) - statistic(b)``, metric by metric.

    ``a`` and ``b`` are the columns of the same units under two evaluations (element i of every column is
    unit i). They are resampled together by ``bootstrap``: each resample draws one set of unit indices for
    both, so the variation the two evaluations share (which units were drawn) cancels in the difference.
    """
    n = len(next(iter(a.values())))
    if any(len(c) != n for c in (*a.values(), *b.values())):
        raise ValueError("paired columns must all have one element per unit")
    joined = {**{f"a.{k}": c for k, c in a.items()}, **{f"b.{k}": c for k, c in b.items()}}

    def difference(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stat_a = statistic({k: c[f"a.{k}"] for k in a})
        stat_b = statistic({k: c[f"b.{k}"] for k in b})
        return {m: stat_a[m] - stat_b[m] for m in stat_a}

    return bootstrap(joined, difference, n_boot=n_boot, seed=seed, level=level)


def stratified_sample(keys: Sequence[Hashable], strata: Sequence[Hashable], limit: int, seed: int) -> list[Hashable]:
    """A seeded sample of ``limit`` keys, allocated to strata in proportion to their size.

    When ``limit`` allows, every stratum first gets one key (so small BBQ categories are never left
    out); the rest is allocated in proportion to stratum size by the largest remainder, so the sizes add
    up to ``limit`` exactly. The result keeps the input order; ``limit >= len(keys)`` returns every key.
    """
    if limit >= len(keys):
        return list(keys)
    groups: dict[Hashable, list[int]] = {}
    for i, s in enumerate(strata):
        groups.setdefault(s, []).append(i)
    names = sorted(groups, key=str)
    sizes = np.array([len(groups[s]) for s in names])
    base = np.ones_like(sizes) if limit >= len(names) else np.zeros_like(sizes)
    quotas = (limit - base.sum()) * (sizes - base) / (sizes - base).sum()
    alloc = base + np.floor(quotas).astype(int)
    order = np.argsort(-(quotas - np.floor(quotas)), kind="stable")
    alloc[order[: limit - alloc.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for s, k in zip(names, alloc):
        members = groups[s]
        chosen.extend(members[i] for i in rng.choice(len(members), size=k, replace=False))
    return [keys[i] for i in sorted(chosen)]


def rows_from(
    benchmark: str,
    condition: str,
    subset: str,
    results: dict[str, tuple[float, float, float]],
    counts: dict[str, int],
) -> list[MetricRow]:
    """MetricRows for one subset from ``bootstrap`` output and the n behind each metric."""
    return [
        MetricRow(benchmark, condition, subset, name, value, lo, hi, counts[name])
        for name, (value, lo, hi) in results.items()
    ]


def mass_rows(
    benchmark: str, condition: str, subset: str, masses: Sequence[float | None], *, n_boot: int, seed: int
) -> list[MetricRow]:
    """``candidate_mass``: mean raw probability on the candidates (absent for external predictions)."""
    if not masses or any(m is None for m in masses):
        return []
    result = bootstrap(
        {"mass": np.array(masses, dtype=float)},
        lambda c: {"candidate_mass": c["mass"].mean(-1)},
        n_boot=n_boot,
        seed=stable_seed(seed, benchmark, condition, subset, "candidate_mass"),
    )
    return rows_from(benchmark, condition, subset, result, {"candidate_mass": len(masses)})
