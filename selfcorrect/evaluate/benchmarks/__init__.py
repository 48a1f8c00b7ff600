"""The three benchmarks of Ganguli et al. 2023, one module each, all with the same functions.

A benchmark module defines:
- ``NAME`` and ``load(data_dir) -> list[unit]``: the records (BBQ examples, Winogender occupations, LSAC
  students), each a dict with a unique ``"id"``; ``data_dir=None`` fetches the official public release.
  Loads are cached per process: treat the units as read-only.
- ``stratum(unit)``: the stratum of ``--limit`` subsamples.
- ``items(units, prompts, condition) -> list[ItemPrompt]``: the scored prompts (a law-school student
  gives two items, one per race).
- ``metrics(units, preds, condition, n_boot, seed) -> list[MetricRow]``: the metrics table from per-item
  predictions ``{item_id: {"probs": [...], "mass": float | None}}``, built from the three below.
- ``scored(units, preds)``: the units whose items all have predictions (the units a metric is over);
  ``columns(units, preds) -> {name: array}``: their per-unit columns, aligned with ``units``;
  ``statistic(columns) -> {metric: array}``: the metrics, vectorised over resamples (see ``metrics.bootstrap``).
- ``HEADLINE_METRICS``: the metrics whose paired differences (``selfcorrect.evaluate.paired``) are reported.
- ``read_predictions(path, units) -> preds``: predictions made elsewhere, for ``selfcorrect score``.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from selfcorrect.config import cache_dir
from selfcorrect.errors import UserError
from selfcorrect.io import download

BENCHMARK_NAMES = ("bbq", "winogender", "law_school")


def get(name: str) -> ModuleType:
    """The benchmark module of a name; an unknown name is a UserError."""
    if name not in BENCHMARK_NAMES:
        raise UserError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARK_NAMES)})")
    from importlib import import_module

    return import_module(f"selfcorrect.evaluate.benchmarks.{name}")


def data_file(data_dir: Path | None, relpath: str, url: str, what: str) -> Path:
    """A benchmark data file: ``data_dir/relpath`` if a data dir is given, else the cached official copy."""
    if data_dir is not None:
        path = data_dir / relpath
        if not path.is_file():
            raise UserError(f"{data_dir}: missing data file {relpath} ({what})")
        return path
    return download(url, cache_dir() / "data" / relpath, what=what)


def parse_choice(value: object, n: int, where: str) -> int:
    """An answer index in ``0..n-1`` read from a predictions file."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise UserError(f"{where}: prediction must be an answer index 0..{n - 1}, got {value!r}")
    return value


def parse_probs(value: object, n: int, where: str) -> list[float]:
    """A list of ``n`` non-negative probabilities, renormalised to sum to 1."""
    ok = (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(p, (int, float)) and not isinstance(p, bool) and p >= 0 for p in value)
    )
    if not ok or sum(value) <= 0:
        raise UserError(f"{where}: expected {n} non-negative numbers with a positive sum, got {value!r}")
    total = float(sum(value))
    return [float(p) / total for p in value]
