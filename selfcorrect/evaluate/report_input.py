"""The report's input: the rows of a run's metrics table and its checkpoints' training covariates, read and checked;
the rows a report by step or by size plots; the paired-difference rows its difference figures draw.

What each benchmark declares for the report (its panels, title, caption) is gathered here too
(:data:`BENCHMARKS`, :data:`PANELS`), for the figures and report.md.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from selfcorrect.errors import UserError, first_line
from selfcorrect.evaluate import benchmarks as bench_registry
from selfcorrect.evaluate.benchmarks import Panel
from selfcorrect.evaluate.paired import MINUS_Q, MINUS_STEP0
from selfcorrect.evaluate.table import ADDED_COLUMNS, METRIC_COLUMNS, RUN_COLUMNS, MetricRow
from selfcorrect.rundir import EvalDir, RunDir

COLUMNS = (*RUN_COLUMNS, *METRIC_COLUMNS)
SCORERS = ("policy", "reward")

# What each benchmark declares for the report (selfcorrect.evaluate.benchmarks): its panels (the first is the headline
# metric), title and caption, and the metrics drawn beside the training covariates.
BENCHMARKS = {module.NAME: module for module in bench_registry.modules()}
PANELS: dict[str, tuple[Panel, ...]] = {name: module.PANELS for name, module in BENCHMARKS.items()}
HEADLINE = {name: panels[0] for name, panels in PANELS.items()}
TRAINING_PANELS = [(name, panel) for name, module in BENCHMARKS.items() for panel in module.TRAINING_PANELS]


# ---- input ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Row(MetricRow):
    """One row of a run's eval/metrics.csv: a :class:`MetricRow` (NaN for an empty value or CI cell, ``n`` None when
    empty) with the run columns and the file it came from."""

    model: str
    params: int | None
    step: int | None
    source: Path
    scorer: str = "policy"  # or reward: the probe of a reward model (selfcorrect.evaluate.reward_probe)


@dataclass(frozen=True)
class Checkpoint:
    """Training covariates of one kept PPO checkpoint (NaN where not logged)."""

    model: str
    step: int
    mean_reward: float
    kl: float
    response_length: float


def _cell_number(text: str, where: str, column: str, *, integer: bool) -> float | int | None:
    """A CSV cell as a number; None for an empty cell."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{where}: column '{column}': not a number: {text!r}") from None
    if integer:
        if not value.is_integer():
            raise UserError(f"{where}: column '{column}': expected an integer, got {text!r}")
        return int(value)
    return value


def _parse_row(raw: dict[str, str], where: str, source: Path) -> Row:
    text: dict[str, Any] = {c: (raw[c] or "").strip() for c in ("model", "benchmark", "condition", "subset", "metric")}
    empty = [c for c, v in text.items() if not v]
    if empty:
        raise UserError(f"{where}: empty {', '.join(empty)}")
    text["note"] = (raw.get("note") or "").strip()
    text["scorer"] = (raw.get("scorer") or "policy").strip()
    if text["scorer"] not in SCORERS:
        raise UserError(f"{where}: column 'scorer': expected {' or '.join(SCORERS)}, got {text['scorer']!r}")
    integers: dict[str, Any] = {c: _cell_number(raw[c] or "", where, c, integer=True) for c in ("params", "step", "n")}
    floats = {c: _cell_number(raw[c] or "", where, c, integer=False) for c in ("value", "ci_low", "ci_high")}
    numbers: dict[str, Any] = {c: float("nan") if v is None else v for c, v in floats.items()}
    return Row(**text, **integers, **numbers, source=source)  # the dicts are Any: Row's fields have several types


def read_metrics(run_dir: Path) -> list[Row]:
    """The rows of a run's metrics table, or of one model's evaluation directory.

    A run directory has ``eval/metrics.csv`` with the leading columns ``model,params,step,scorer``. The output of
    ``selfcorrect evaluate MODEL --output DIR`` has ``DIR/metrics.csv`` without them: its rows get the model and its
    parameter count from ``DIR/evaluation.json`` and no step. A missing file, missing columns or no rows is a
    UserError.
    """
    path, one_model = RunDir(Path(run_dir)).metrics, _one_model(Path(run_dir))
    if not path.is_file() and one_model is not None:
        path = EvalDir(Path(run_dir)).metrics
    if not path.is_file():
        raise UserError(f"{path}: no metrics (is {run_dir} a run or evaluation directory whose evaluation finished?)")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            leading = {} if RUN_COLUMNS[0] in fields or one_model is None else one_model
            missing = [c for c in COLUMNS if c not in fields and c not in leading and c not in ADDED_COLUMNS]
            if missing:
                raise UserError(f"{path}: missing columns {', '.join(missing)}")
            rows = [_parse_row({**raw, **leading}, f"{path}: line {reader.line_num}", path) for raw in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read ({first_line(exc)})") from None
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _one_model(directory: Path) -> dict[str, str] | None:
    """The model and parameter count of an evaluation directory of one model (its evaluation.json), or None."""
    manifest_path = EvalDir(directory).identity
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        model = str(manifest["settings"]["model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{manifest_path}: unreadable evaluation manifest ({first_line(exc)})") from None
    params = (manifest.get("model_info") or {}).get("n_parameters")
    scorer = str(manifest["settings"].get("scorer", "policy"))
    return {"model": Path(model).name or model, "params": "" if params is None else str(params), "step": "",
            "scorer": scorer}  # fmt: skip


def _manifest_number(manifest: dict, key: str, path: Path) -> float:
    value = manifest.get(key)
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{path}: '{key}' must be a number or null, got {value!r}")
    return float(value)


def read_checkpoints(run_dir: Path, model: str) -> list[Checkpoint]:
    """Training covariates from the kept PPO checkpoints' manifests (none for eval-only runs)."""
    checkpoints = []
    for path in RunDir(Path(run_dir)).checkpoint_manifests():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: unreadable manifest ({first_line(exc)})") from None
        if not isinstance(manifest, dict) or isinstance(manifest.get("step"), bool):
            raise UserError(f"{path}: expected a JSON object with an integer 'step'")
        if not isinstance(manifest.get("step"), int):
            raise UserError(f"{path}: 'step' must be an integer, got {manifest.get('step')!r}")
        logged = manifest.get("metrics") or {}
        if not isinstance(logged, dict):
            raise UserError(f"{path}: 'metrics' must be a JSON object")
        checkpoints.append(
            Checkpoint(
                model=model,
                step=manifest["step"],
                mean_reward=_manifest_number(manifest, "mean_reward", path),
                kl=_manifest_number(manifest, "kl", path),
                response_length=_manifest_number(logged, "response_length", path),
            )
        )
    return checkpoints


def load_runs(run_dirs: Iterable[Path]) -> tuple[list[Row], list[Checkpoint]]:
    """All metric rows and checkpoint covariates of the run directories; a row given twice is a UserError.

    The checkpoints of a run are labelled with its model when its metrics.csv names one model, else with
    the directory name.
    """
    rows: list[Row] = []
    checkpoints: list[Checkpoint] = []
    for run_dir in run_dirs:
        run_rows = read_metrics(run_dir)
        models = {r.model for r in run_rows}
        label = models.pop() if len(models) == 1 else Path(run_dir).name
        rows += run_rows
        checkpoints += read_checkpoints(run_dir, label)
    seen: dict[tuple, Row] = {}
    for r in rows:
        key = (r.model, r.step, r.scorer, r.benchmark, r.condition, r.subset, r.metric)
        if key in seen:
            other = seen[key].source
            where = str(r.source) if other == r.source else f"{other} and {r.source}"
            raise UserError(
                f"{where}: two rows for model {r.model!r}, step {r.step}, {r.benchmark}/{r.condition}/{r.subset}/"
                f"{r.metric} (give each run its own model label)"
            )
        seen[key] = r
    return rows, checkpoints


# ---- which rows are plotted -------------------------------------------------------------------------------
def rows_with_step(rows: list[Row]) -> list[Row]:
    """``--by step``: the rows that have an RLHF step; a UserError when none has."""
    kept = [r for r in rows if r.step is not None]
    if not kept:
        sources = ", ".join(sorted({str(r.source) for r in rows}))
        raise UserError(f"{sources}: no row has an RLHF step (empty 'step' column); use --by size to compare models")
    return kept


def rows_at_largest_step(rows: list[Row]) -> list[Row]:
    """``--by size``: each model's rows at its largest RLHF step (or without a step, if it has none).

    Every model needs one parameter count; a missing or ambiguous count is a UserError.
    """
    params: dict[str, set[int | None]] = {}
    for r in rows:
        params.setdefault(r.model, set()).add(r.params)
    for model, counts in params.items():
        source = next(r.source for r in rows if r.model == model)
        if None in counts:
            raise UserError(f"{source}: model {model!r} has no 'params' (parameter count); --by size needs it")
        if len(counts) > 1:
            raise UserError(f"{source}: model {model!r} has several parameter counts: {sorted(cast(set[int], counts))}")
    last: dict[str, int] = {}
    for r in rows:
        last[r.model] = max(last.get(r.model, -1), -1 if r.step is None else r.step)
    return [r for r in rows if (-1 if r.step is None else r.step) == last[r.model]]


@dataclass(frozen=True)
class Delta:
    """A paired difference row of metrics.csv: ``condition``'s ``metric`` minus its reference's (Q, or step 0)."""

    model: str
    params: int | None
    step: int | None
    benchmark: str
    metric: str  # the headline metric, without suffix
    condition: str  # the condition, without suffix
    value: float
    ci_low: float
    ci_high: float
    note: str = ""  # why the value or CI is empty


def _headline_deltas(rows: list[Row], condition: Callable[[Row], str], metric: Callable[[Row], str]) -> list[Delta]:
    """Pooled difference rows of each benchmark's headline metric, named by their condition and metric."""
    return [
        Delta(r.model, r.params, r.step, r.benchmark, metric(r), condition(r), r.value, r.ci_low, r.ci_high, r.note)
        for r in rows
        if r.subset == "all" and r.benchmark in HEADLINE and metric(r) == HEADLINE[r.benchmark].metric
    ]


def self_correction_deltas(rows: list[Row]) -> list[Delta]:
    """The ``<c>_minus_q`` rows of each benchmark's headline metric: condition c minus Q, same checkpoint."""
    diffs = [r for r in rows if r.condition.endswith(MINUS_Q)]
    return _headline_deltas(diffs, lambda r: r.condition.removesuffix(MINUS_Q), lambda r: r.metric)


def step0_deltas(rows: list[Row]) -> list[Delta]:
    """The ``<m>_minus_step0`` rows of each benchmark's headline metric: step k minus step 0, same condition."""
    diffs = [r for r in rows if r.metric.endswith(MINUS_STEP0)]
    return _headline_deltas(diffs, lambda r: r.condition, lambda r: r.metric.removesuffix(MINUS_STEP0))
