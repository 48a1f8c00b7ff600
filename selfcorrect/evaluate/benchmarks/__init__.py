"""The benchmark registry: the three benchmarks of Ganguli et al. 2023, one module each, with the same functions.

:data:`BENCHMARK_NAMES` is the one list of benchmarks: the CLI, the runner, the prompt files, the report and W&B
logging follow it. Adding a benchmark is one module here (with the names below) plus its prompts in
``configs/prompts/*.yaml``.

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
  ``statistic(columns) -> {metric: array}``: the metrics, vectorised over resamples (see ``metrics.bootstrap``),
  NaN where the units cannot give a metric; ``reasons(columns) -> {metric: reason}``: why, for each metric that
  ``statistic`` leaves NaN on unresampled columns (the ``note`` of its empty row in metrics.csv).
- ``HEADLINE_METRICS``: the metrics whose paired differences (``selfcorrect.evaluate.paired``) are reported;
  ``DATA_LAYOUT`` and ``PREDICTION_LINES``: the data files under a data directory and the lines of a predictions
  file for ``selfcorrect score``, for help texts;
  ``TITLE``, ``CAPTION`` and ``PANELS`` (:class:`Panel`, the first is the headline) for the report, and
  ``TRAINING_PANELS``: metrics the report plots beside the training covariates (BBQ's unknown rate);
- ``unit_of(item_id) -> unit id``: the unit an item id belongs to (a law-school item ``row:race`` is student
  ``row``; for the others the item is the unit).
- ``read_predictions(path, units) -> preds``: predictions made elsewhere, for ``selfcorrect score``
  (through ``read_prediction_lines``: an unknown id, a second line for the same item, a field of the wrong
  type or a non-finite number is a UserError naming the file and line).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from selfcorrect.config import cache_dir
from selfcorrect.errors import UserError
from selfcorrect.io import download, iter_jsonl

BENCHMARK_NAMES = ("bbq", "winogender", "law_school")


@dataclass(frozen=True)
class Panel:
    """One plotted metric of a benchmark: its metrics.csv name, a title, and how to draw its y axis."""

    metric: str
    title: str
    zero_line: bool = False  # 0 = no bias / no correlation / parity
    unit_range: bool = False  # rates and accuracies: y in [0, 1]


def get(name: str) -> ModuleType:
    """The benchmark module of a name; an unknown name is a UserError."""
    if name not in BENCHMARK_NAMES:
        raise UserError(f"unknown benchmark '{name}' (known: {', '.join(BENCHMARK_NAMES)})")
    from importlib import import_module

    return import_module(f"selfcorrect.evaluate.benchmarks.{name}")


def modules() -> list[ModuleType]:
    """Every benchmark module, in registry order."""
    return [get(name) for name in BENCHMARK_NAMES]


def data_file(data_dir: Path | None, relpath: str, url: str, what: str) -> Path:
    """A benchmark data file: ``data_dir/relpath`` if a data dir is given, else the cached official copy."""
    if data_dir is not None:
        path = data_dir / relpath
        if not path.is_file():
            raise UserError(f"{data_dir}: missing data file {relpath} ({what})")
        return path
    return download(url, cache_dir() / "data" / relpath, what=what)


def shown(value: object, limit: int = 80) -> str:
    """A value as it appears in an error message: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finite_number(value: object) -> float | None:
    """A JSON number (not a boolean) as a finite float; None for anything else (NaN, Infinity, 1e400, "1")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return number if math.isfinite(number) else None


def number_field(text: str, where: str, field: str) -> float:
    """A finite number read from a text field of a data file (CSV/TSV cell)."""
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{where}: field {field}: expected a finite number, got {shown(text)}")
    return number


def required(obj: dict, key: str, where: str) -> object:
    """The value of ``key`` in a predictions line; a missing key is a UserError."""
    if key not in obj:
        raise UserError(f"{where}: missing field {key}")
    return obj[key]


def parse_choice(value: object, n: int, where: str) -> int:
    """An answer index in ``0..n-1`` read from a predictions file."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise UserError(f"{where}: prediction must be an answer index 0..{n - 1}, got {shown(value)}")
    return value


def parse_weight(value: object, where: str, field: str) -> float:
    """A finite, non-negative number read from a predictions file (a probability before renormalising)."""
    number = finite_number(value)
    if number is None or number < 0:
        raise UserError(f"{where}: {field} must be a finite non-negative number, got {shown(value)}")
    return number


def normalise(weights: list[float], where: str, field: str) -> list[float]:
    """Weights renormalised to sum to 1; their sum must be positive and finite."""
    total = sum(weights)
    if not 0 < total < math.inf:
        raise UserError(f"{where}: {field} must have a positive, finite sum, got {shown(weights)}")
    return [w / total for w in weights]


def parse_probs(value: object, n: int, where: str) -> list[float]:
    """The ``probs`` field: a list of ``n`` finite non-negative numbers, renormalised to sum to 1."""
    if not isinstance(value, list) or len(value) != n:
        raise UserError(f"{where}: probs must be a list of {n} non-negative numbers, got {shown(value)}")
    return normalise([parse_weight(p, where, f"probs[{i}]") for i, p in enumerate(value)], where, "probs")


def read_prediction_lines(path: Path, parse: Callable[[dict, str], tuple[str, str, list[float]]]) -> dict[str, dict]:
    """The predictions of a JSONL file, ``{item_id: {"probs": [...], "mass": None}}``.

    ``parse(obj, where)`` turns one line into ``(item_id, description, probs)`` or raises a UserError.
    Two lines for the same item are an error (no line silently wins), and so is a file without predictions.
    """
    preds: dict[str, dict] = {}
    first_line: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        where = f"{path}: line {line}"
        item_id, description, probs = parse(obj, where)
        if item_id in first_line:
            raise UserError(f"{where}: duplicate prediction for {description} (first on line {first_line[item_id]})")
        first_line[item_id] = line
        preds[item_id] = {"probs": probs, "mass": None}
    if not preds:
        raise UserError(f"{path}: no predictions")
    return preds
