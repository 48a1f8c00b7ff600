"""The metrics table (``metrics.csv``): its row type, its columns, and how it is written, read and joined.

An evaluation directory's table has the columns :data:`METRIC_COLUMNS`; a run's table (``eval/metrics.csv``) puts
:data:`RUN_COLUMNS` (``model,params,step,scorer``) in front, one block of rows per evaluated model or checkpoint
(``scorer`` is ``policy``, or ``reward`` for the probe of the run's reward model: :mod:`.reward_probe`). Values
are written with 10 significant digits and NaN as an empty cell, so a rerun writes the same bytes.

A metric that its units cannot give (Pearson r of fewer than 3 occupations, a BBQ bias score without an answer
other than "unknown", a difference with such a metric on either side) is a row with an empty value and CIs and its
reason in ``note``; a value whose CI cannot be computed (one unit, or the metric undefined in most resamples) has
empty CIs and the reason in ``note``. ``note`` is empty otherwise, and absent from tables written before it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from selfcorrect.errors import UserError, first_line
from selfcorrect.io import atomic_write_text, csv_text

METRIC_COLUMNS = ("benchmark", "condition", "subset", "metric", "value", "ci_low", "ci_high", "n", "note")
ADDED_COLUMNS = ("note", "scorer")  # columns a table written before them lacks: read back as empty (the default)
RUN_COLUMNS = ("model", "params", "step", "scorer")  # scorer: policy (a model's probabilities) or reward (a probe)


@dataclass(frozen=True)
class MetricRow:
    """One row of the tidy metrics table."""

    benchmark: str
    condition: str
    subset: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    note: str = ""  # why the value (then NaN) or its CI (then NaN) is empty; "" when both are there


def cells(row: MetricRow) -> list[object]:
    """A row's cells in :data:`METRIC_COLUMNS` order, as written (floats to 10 significant digits, NaN empty)."""

    def cell(v: object) -> object:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.10g}"
        return v

    return [cell(getattr(row, c)) for c in METRIC_COLUMNS]


def to_csv(rows: Iterable[MetricRow], leading: dict[str, object] | None = None) -> str:
    """The table as CSV text; ``leading`` adds the same leading columns to every row."""
    leading = leading or {}
    return csv_text([*leading, *METRIC_COLUMNS], ([*leading.values(), *cells(r)] for r in rows))


def write(path: Path, rows: Iterable[MetricRow]) -> Path:
    """Write an evaluation directory's table atomically."""
    atomic_write_text(path, to_csv(rows))
    return path


def read(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics table as written (strings by column name); an unreadable file is a UserError."""
    try:
        with Path(path).open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read ({first_line(exc)})") from None


def write_run(path: Path, blocks: Sequence[tuple[Sequence[object], Iterable[Sequence[object]]]]) -> Path:
    """Write a run's table atomically: per block, the leading cells (model, params, step, scorer) and its metric rows'
    cells (a :class:`MetricRow`'s :func:`cells`, or the cells of a row read back with :func:`read`)."""
    rows = [[*leading, *row] for leading, block in blocks for row in block]
    atomic_write_text(path, csv_text([*RUN_COLUMNS, *METRIC_COLUMNS], rows))
    return path


def row_cells(row: dict[str, str]) -> list[str]:
    """The metric cells of a row read back with :func:`read`, in :data:`METRIC_COLUMNS` order (a column of
    :data:`ADDED_COLUMNS` that the file lacks is empty)."""
    return [row.get(c) or "" if c in ADDED_COLUMNS else row[c] for c in METRIC_COLUMNS]
