"""Shared statistics: metric rows, seeded (and paired) bootstrap confidence intervals, stratified subsamples.

A benchmark's statistic is written once, vectorised over resamples: it receives its per-unit columns with
a leading resample axis (shape ``(B, n)``) and returns one value per resample for each metric. The point
estimate is the same function on the unresampled data (``B = 1``), so estimate and interval cannot drift.

A statistic is NaN where its units cannot give the metric (a correlation of fewer than 3 points, a ratio
without a denominator); such a metric is *empty*: no value, no CI, and the reason, from the benchmark's
``reasons(columns)``, in the row's ``note`` (:class:`Estimate`). A CI is empty, with its reason, where there
is nothing to resample (one unit) or the metric is undefined in most resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import numpy as np

from selfcorrect.evaluate.table import MetricRow  # the row type: its owner is the table module
from selfcorrect.provenance import stable_seed  # used here and by the benchmark modules

Statistic = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
Reasons = Callable[[dict[str, np.ndarray]], dict[str, str]]
"""A benchmark's ``reasons(columns)``: for unresampled per-unit columns, why each metric that its statistic leaves
NaN cannot be computed on them (``{metric: reason}``)."""

PEARSON_MIN_POINTS = 3  # two points always correlate +1 or -1
MIN_CI_UNITS = 2  # a CI from fewer units is every resample the same: a zero-width interval that means nothing
UNDEFINED = "undefined on these units"  # the reason of an empty metric whose benchmark gives none


class Estimate(NamedTuple):
    """A metric's point estimate and CI (NaN where empty) and why the value or the CI is empty ("" otherwise)."""

    value: float
    ci_low: float
    ci_high: float
    note: str = ""


def safe_divide(num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> np.ndarray:
    """num / den elementwise, with ``empty`` where den == 0."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    out = np.full(np.broadcast(num, den).shape, empty, dtype=float)
    np.divide(num, den, out=out, where=den != 0)
    return out


def pearson_r(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis: NaN where either side is constant or there are fewer than
    :data:`PEARSON_MIN_POINTS` points (two points always correlate +1 or -1)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    r = safe_divide((xc * yc).sum(axis=-1), den)
    return r if x.shape[-1] >= PEARSON_MIN_POINTS else np.full_like(r, np.nan)


def pearson_reason(x: np.ndarray, y: np.ndarray, units: str, x_name: str, y_name: str) -> str | None:
    """Why :func:`pearson_r` of the points ``(x, y)`` (1-D, one per unit, ``units`` naming them; ``x_name`` and
    ``y_name`` the two sides) is NaN, or None where it is defined."""
    n = len(x)
    if n < PEARSON_MIN_POINTS:
        return f"Pearson r needs at least {PEARSON_MIN_POINTS} {units}, got {n}: any 2 points correlate +1 or -1"
    for values, name in ((x, x_name), (y, y_name)):
        if np.ptp(values) == 0:
            return f"{name} is the same for all {n} {units}"
    return None


def bootstrap(
    columns: dict[str, np.ndarray],
    statistic: Statistic,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 100,
    reasons: Reasons | None = None,
) -> dict[str, Estimate]:
    """Point estimate and percentile bootstrap CI of each metric, resampling units with replacement.

    A metric whose point estimate is NaN is empty (its note from ``reasons``, or :data:`UNDEFINED`). Its CI is NaN,
    with a note, when the metric is undefined in more than half of the resamples; with ``n_boot`` 0, NaN without one.
    """
    n = len(next(iter(columns.values())))
    with np.errstate(invalid="ignore", divide="ignore"):
        point = {k: float(v[0]) for k, v in statistic({k: c[None, :] for k, c in columns.items()}).items()}
    empty = {k for k, v in point.items() if not np.isfinite(v)}
    why = reasons(columns) if empty and reasons is not None else {}
    out = {k: Estimate(np.nan, np.nan, np.nan, why.get(k) or UNDEFINED) for k in empty}
    if n == 0 or n_boot <= 0:
        return {k: out.get(k) or Estimate(v, np.nan, np.nan) for k, v in point.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {k: [] for k in point}
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        with np.errstate(invalid="ignore", divide="ignore"):
            stats = statistic({k: c[idx] for k, c in columns.items()})
        for k in draws:
            draws[k].append(np.asarray(stats[k], dtype=float))
    alpha = (1 - level) / 2
    for k, value in point.items():
        if k in out:
            continue
        d = np.concatenate(draws[k])
        d = d[np.isfinite(d)]
        if len(d) < 0.5 * n_boot:
            out[k] = Estimate(value, np.nan, np.nan, f"no CI: undefined in {n_boot - len(d)} of {n_boot} resamples")
        else:
            out[k] = Estimate(value, float(np.quantile(d, alpha)), float(np.quantile(d, 1 - alpha)))
    return {k: out[k] for k in point}


def paired_bootstrap(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    statistic: Statistic,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    reasons: Reasons | None = None,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, Estimate]:
    """Point estimate and paired percentile bootstrap CI of ``statistic(a) - statistic(b)``, metric by metric.

    ``a`` and ``b`` are the columns of the same units under two evaluations (element i of every column is
    unit i). They are resampled together by ``bootstrap``: each resample draws one set of unit indices for
    both, so the variation the two evaluations share (which units were drawn) cancels in the difference.
    A difference is empty where either side is; its note gives that side's reason from ``reasons``, named by
    ``names`` (e.g. ``("q_if_cot", "q")``).
    """
    n = len(next(iter(a.values())))
    if any(len(c) != n for c in (*a.values(), *b.values())):
        raise ValueError("paired columns must all have one element per unit")
    joined = {**{f"a.{k}": c for k, c in a.items()}, **{f"b.{k}": c for k, c in b.items()}}

    def difference(c: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stat_a = statistic({k: c[f"a.{k}"] for k in a})
        stat_b = statistic({k: c[f"b.{k}"] for k in b})
        return {m: stat_a[m] - stat_b[m] for m in stat_a}

    def why(c: dict[str, np.ndarray]) -> dict[str, str]:
        assert reasons is not None
        sides = [(name, reasons({k: c[f"{s}.{k}"] for k in side})) for name, s, side in zip(names, "ab", (a, b))]
        out: dict[str, str] = {}
        for m in {m for _, r in sides for m in r}:
            said = [(name, r[m]) for name, r in sides if m in r]
            if len(said) == 2 and said[0][1] == said[1][1]:
                out[m] = f"{said[0][0]} and {said[1][0]}: {said[0][1]}"
            else:
                out[m] = "; ".join(f"{name}: {reason}" for name, reason in said)
        return out

    return bootstrap(
        joined, difference, n_boot=n_boot, seed=seed, level=level, reasons=None if reasons is None else why
    )


def stratified_sample(keys: Sequence[Hashable], strata: Sequence[Hashable], limit: int, seed: int) -> list[Hashable]:
    """A seeded sample of ``limit`` keys, allocated to strata in proportion to their size.

    When ``limit`` allows, every stratum first gets one key (so small BBQ categories are never left
    out); the rest is allocated in proportion to stratum size by the largest remainder, so the sizes add
    up to ``limit`` exactly. A ``limit`` below the number of strata leaves some with no key (the evaluation
    runner names them in a warning). The result keeps the input order; ``limit >= len(keys)`` returns every key.
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
    results: dict[str, Estimate],
    counts: dict[str, int],
) -> list[MetricRow]:
    """MetricRows for one subset from ``bootstrap`` output and the n behind each metric (units: BBQ items,
    occupations, students). A CI over fewer than :data:`MIN_CI_UNITS` units is left out, with a note."""
    rows = []
    for name, e in results.items():
        n = counts[name]
        if n < MIN_CI_UNITS and np.isfinite(e.ci_low):
            e = e._replace(ci_low=np.nan, ci_high=np.nan, note=f"no CI: {n} unit, nothing to resample")
        rows.append(MetricRow(benchmark, condition, subset, name, e.value, e.ci_low, e.ci_high, n, e.note))
    return rows


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
