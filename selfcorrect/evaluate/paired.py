"""Paired differences of the headline metrics between two evaluations of the same units.

Two kinds of rows join the tidy metrics table, both pooled (``subset`` = all), one per headline metric of
the benchmark (``HEADLINE_METRICS`` of its module):

- self-correction, in each evaluation output's ``metrics.csv``: ``condition = "<c>_minus_q"``, ``metric = m``,
  value ``m(c) - m(q)`` at the same checkpoint, for every complete condition ``c`` other than ``q``;
- RLHF, in a run's joined ``metrics.csv``, in the rows of step k: ``condition = c``,
  ``metric = "<m>_minus_step0"``, value ``m at step k - m at step 0`` under the same condition.

The sign is always "the named one minus the reference" (condition minus Q; step k minus step 0): for a
BBQ bias score a negative difference means less bias. Both terms are computed over the units that have
predictions in both evaluations (for a CoT condition that is the CoT subsample, a subset of Q's units),
so a difference equals the difference of the two metrics computed on those common units; ``n`` is their
number. The 95% CI is a paired percentile bootstrap: each resample draws one set of units (BBQ items,
Winogender occupations, law-school students) for both evaluations (``metrics.paired_bootstrap``). A difference is
empty where the metric is empty on either side over the common units (Winogender's Pearson r of fewer than 3
occupations, ...): its ``note`` says which side and why (the benchmark's ``reasons``).
"""

from __future__ import annotations

from selfcorrect.evaluate import benchmarks as bench_registry
from selfcorrect.evaluate.metrics import Estimate, MetricRow, paired_bootstrap, rows_from, stable_seed

MINUS_Q = "_minus_q"  # condition suffix of a self-correction difference
MINUS_STEP0 = "_minus_step0"  # metric suffix of an RLHF-step difference

Evaluation = tuple[list[dict], dict[str, dict]]
"""One evaluated (benchmark, condition): its units and the per-item predictions ``{item_id: {"probs": …}}``."""


def paired_difference(
    benchmark: str,
    evaluation: Evaluation,
    reference: Evaluation,
    *,
    n_boot: int,
    seed: int,
    names: tuple[str, str] = ("evaluation", "reference"),
) -> tuple[dict[str, Estimate], int]:
    """Each headline metric of ``evaluation`` minus ``reference``'s over their common units, with a paired CI.

    Returns ``({metric: estimate}, number of common units)``; no metrics when none is common. ``names`` name the
    two sides in the note of an empty difference.
    """
    module = bench_registry.get(benchmark)
    (units, preds), (ref_units, ref_preds) = evaluation, reference
    in_reference = {u["id"] for u in module.scored(ref_units, ref_preds)}
    common = [u for u in module.scored(units, preds) if u["id"] in in_reference]
    if not common:
        return {}, 0
    results = paired_bootstrap(
        module.columns(common, preds),
        module.columns(common, ref_preds),
        module.statistic,
        n_boot=n_boot,
        seed=seed,
        reasons=module.reasons,
        names=names,
    )
    return {m: results[m] for m in module.HEADLINE_METRICS}, len(common)


def minus_q_rows(benchmark: str, evaluations: dict[str, Evaluation], *, n_boot: int, seed: int) -> list[MetricRow]:
    """The ``<c>_minus_q`` rows of one checkpoint: every condition ``c`` of ``evaluations`` but q, minus q.

    ``evaluations`` maps each complete condition of the benchmark to its evaluation; without ``q`` there
    are no rows. Rows follow the order of ``evaluations``.
    """
    if "q" not in evaluations:
        return []
    rows = []
    for condition, evaluation in evaluations.items():
        if condition == "q":
            continue
        name = f"{condition}{MINUS_Q}"
        seed_c = stable_seed(seed, benchmark, name, "all")
        results, n = paired_difference(
            benchmark, evaluation, evaluations["q"], n_boot=n_boot, seed=seed_c, names=(condition, "q")
        )
        rows += rows_from(benchmark, name, "all", results, dict.fromkeys(results, n))
    return rows


def minus_step0_rows(
    benchmark: str, condition: str, at_step: Evaluation, at_step0: Evaluation, *, n_boot: int, seed: int
) -> list[MetricRow]:
    """The ``<m>_minus_step0`` rows of one (benchmark, condition) at a checkpoint: its metrics minus step 0's."""
    seed_c = stable_seed(seed, benchmark, condition, "all", MINUS_STEP0)
    results, n = paired_difference(
        benchmark, at_step, at_step0, n_boot=n_boot, seed=seed_c, names=("this step", "step 0")
    )
    named = {f"{m}{MINUS_STEP0}": v for m, v in results.items()}
    return rows_from(benchmark, condition, "all", named, dict.fromkeys(named, n))


def is_difference(condition: str, metric: str) -> bool:
    """Whether a metrics.csv row is a paired difference rather than a metric of one evaluation."""
    return condition.endswith(MINUS_Q) or metric.endswith(MINUS_STEP0)
