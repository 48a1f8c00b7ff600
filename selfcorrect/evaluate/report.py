"""Tidy metrics tables -> plots (PNG) and a Markdown report: ``selfcorrect report``.

Input, per run directory::

    RUN_DIR/eval/metrics.csv      model,params,step,scorer + the columns of evaluate's metrics.csv
    the kept PPO checkpoints' manifest.json (selfcorrect.rundir)   optional: mean_reward, kl, metrics.response_length

Output (``RUN_DIR/report/`` for one run by step, ``RUN_DIR/report-by-size/`` by size, else ``--output``)::

    <benchmark>.png        the benchmark's metrics vs RLHF steps (or vs parameter count), one line per
                           condition, 95% CI bands
    self_correction.png    the ``<c>_minus_q`` rows: each condition's headline metric minus Q's at the same
                           checkpoint, paired 95% CI bands (not drawn for a table without them)
    vs_step0.png           by step only, the ``<m>_minus_step0`` rows: each checkpoint's headline metric minus
                           step 0's, same condition, paired 95% CI bands (not drawn without them)
    training.png           by step only: mean reward, KL, response length per kept checkpoint, BBQ unknown rate
    report.md              the figures with captions and a table of the headline numbers

The paired-difference rows (``selfcorrect.evaluate.paired``) are drawn only in their own two figures, never
as conditions or metrics of the benchmark figures or the table. A metrics.csv written before they existed
still gives every other figure; report.md then says how to add them.

Rows of the run's reward model (``scorer`` reward: ``selfcorrect probe``, its preferences between the candidate
answers) are no line of their own: each benchmark figure draws their values as dotted horizontal reference lines,
one per condition, and report.md lists them in a table of their own.

An empty metric (no value: its units cannot give it, the reason in metrics.csv's ``note``) is not drawn: its line
has a gap there, and report.md lists it with its reason under "Empty values"; a value without a CI is drawn without
a band. The table reads ``n/a (reason)`` for either.

Every input is read and every figure drawn in memory before anything is written; each file is then
replaced atomically, so bad input leaves an existing report untouched. Figures are drawn on matplotlib's
Agg canvas, without pyplot.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from selfcorrect.errors import UserError, first_line
from selfcorrect.evaluate import benchmarks as bench_registry
from selfcorrect.evaluate.benchmarks import Panel
from selfcorrect.evaluate.paired import MINUS_Q, MINUS_STEP0, is_difference
from selfcorrect.evaluate.table import ADDED_COLUMNS, METRIC_COLUMNS, RUN_COLUMNS, MetricRow
from selfcorrect.io import atomic_write_bytes, atomic_write_text
from selfcorrect.rundir import RunDir

COLUMNS = (*RUN_COLUMNS, *METRIC_COLUMNS)
SCORERS = ("policy", "reward")
BY = ("step", "size")

CONDITION_LABELS = {"q": "Q", "q_if": "Q+IF", "q_if_cot": "Q+IF+CoT", "match_stats": "Q+Match Stats"}
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")

# What each benchmark declares for the report (selfcorrect.evaluate.benchmarks): its panels (the first is the headline
# metric), title and caption, and the metrics drawn beside the training covariates.
BENCHMARKS = {module.NAME: module for module in bench_registry.modules()}
PANELS: dict[str, tuple[Panel, ...]] = {name: module.PANELS for name, module in BENCHMARKS.items()}
HEADLINE = {name: panels[0] for name, panels in PANELS.items()}
TRAINING_PANELS = [(name, panel) for name, module in BENCHMARKS.items() for panel in module.TRAINING_PANELS]


# ---- 1. input ------------------------------------------------------------------------------------------------
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
    text = {c: (raw[c] or "").strip() for c in ("model", "benchmark", "condition", "subset", "metric")}
    empty = [c for c, v in text.items() if not v]
    if empty:
        raise UserError(f"{where}: empty {', '.join(empty)}")
    text["note"] = (raw.get("note") or "").strip()
    text["scorer"] = (raw.get("scorer") or "policy").strip()
    if text["scorer"] not in SCORERS:
        raise UserError(f"{where}: column 'scorer': expected {' or '.join(SCORERS)}, got {text['scorer']!r}")
    integers = {c: _cell_number(raw[c] or "", where, c, integer=True) for c in ("params", "step", "n")}
    floats = {c: _cell_number(raw[c] or "", where, c, integer=False) for c in ("value", "ci_low", "ci_high")}
    return Row(**text, **integers, **{c: float("nan") if v is None else v for c, v in floats.items()}, source=source)


def read_metrics(run_dir: Path) -> list[Row]:
    """The rows of a run's metrics table, or of one model's evaluation directory.

    A run directory has ``eval/metrics.csv`` with the leading columns ``model,params,step,scorer``. The output of
    ``selfcorrect evaluate MODEL --output DIR`` has ``DIR/metrics.csv`` without them: its rows get the model and its
    parameter count from ``DIR/evaluation.json`` and no step. A missing file, missing columns or no rows is a
    UserError.
    """
    path, one_model = RunDir(Path(run_dir)).metrics, _one_model(Path(run_dir))
    if not path.is_file() and one_model is not None:
        path = Path(run_dir) / "metrics.csv"
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
    manifest_path = directory / "evaluation.json"
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


# ---- 2. which rows are plotted -------------------------------------------------------------------------------
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
            raise UserError(f"{source}: model {model!r} has several parameter counts: {sorted(counts)}")
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


# ---- 3. drawing ----------------------------------------------------------------------------------------------
def condition_label(condition: str) -> str:
    """Display name of a prompt condition (its id when it has none)."""
    return CONDITION_LABELS.get(condition, condition)


def format_params(params: float) -> str:
    """A parameter count for people: 135M, 1.7B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return f"{params:.0f}"


def _condition_order(condition: str) -> tuple[int, str]:
    known = list(CONDITION_LABELS)
    return (known.index(condition), "") if condition in known else (len(known), condition)


@dataclass(frozen=True)
class Style:
    """Colours by condition and line styles by model, the same in every figure of a report."""

    by: str
    colors: dict[str, str]
    lines: dict[str, tuple[str, str]]  # model -> (line style, marker)

    @classmethod
    def of(cls, by: str, conditions: Iterable[str], models: Iterable[str]) -> Style:
        conditions = sorted(set(conditions), key=_condition_order)
        models = sorted(set(models))
        return cls(
            by=by,
            colors={c: f"C{i % 10}" for i, c in enumerate(conditions)},
            lines={m: (LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(models)},
        )

    def x(self, point: Row | Delta) -> float:
        """The x coordinate of a point: its RLHF step, or its parameter count."""
        return point.step if self.by == "step" else point.params

    def series(self, point: Row | Delta) -> tuple[str, str]:
        """(model, condition) by step; by size one line per condition runs across the models."""
        return (point.model if self.by == "step" else "", point.condition)

    def line(self, model: str) -> tuple[str, str]:
        """(line style, marker) of a model; by size every line runs across models and is solid."""
        return self.lines.get(model, ("-", "o"))

    def legend(self, fig: Figure, conditions: set[str], models: set[str]) -> None:
        """Conditions (colours) to the right of the panels; models (line styles) below them if several."""
        if conditions:
            handles = [
                Line2D([], [], color=self.colors[c], marker="o", lw=2, label=condition_label(c))
                for c in sorted(conditions, key=_condition_order)
            ]
            fig.legend(handles=handles, title="condition", loc="outside right upper", frameon=False)
        if self.by == "step" and len(models) > 1:
            handles = [
                Line2D([], [], color="0.25", ls=self.line(m)[0], marker=self.line(m)[1], label=m)
                for m in sorted(models)
            ]
            ncols = min(4, len(models))
            fig.legend(handles=handles, title="model", loc="outside lower center", ncols=ncols, frameon=False)


def _new_figure(n_panels: int, title: str, subject: str) -> tuple[Figure, list]:
    """A figure with its panels in one row (up to three) or two per row (drawn on the Agg canvas).

    The title's second line names the model(s), so a long model id does not run into the legend.
    """
    ncols = n_panels if n_panels <= 3 else 2
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(4.8 * ncols + 1.8, 3.5 * nrows + 1.0), layout="constrained", dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    fig.suptitle(f"{title}\n{subject}", fontsize=12)
    return fig, axes[:n_panels]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _format_axes(ax, style: Style, xs: Iterable[float], panel: Panel | None) -> None:
    """x axis by step (integer steps) or by size (log scale, ticks at the models' sizes), zero line, y range."""
    xs = sorted(set(xs))
    if style.by == "size":
        ax.set_xscale("log")
        ax.set_xticks(xs)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_params(v)))
        ax.set_xlabel("parameters")
    else:
        if len(xs) <= 3:
            ax.set_xticks(xs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        pad = 0.04 * (xs[-1] - xs[0]) or 0.5
        ax.set_xlim(xs[0] - pad, xs[-1] + pad)
        ax.set_xlabel("RLHF steps")
    if panel is not None and panel.zero_line:
        ax.axhline(0.0, color="0.35", lw=0.9, zorder=0)
    if panel is not None and panel.unit_range:
        ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.25)


def _draw_series(ax, points: list, style: Style, value: Callable, ci: Callable | None = None) -> None:
    """One line per series with markers; 95% CI as a band, or as an error bar at a point without a neighbour that
    has a CI (a series of one point, or one cut off by empty values).

    An empty value (NaN) is a gap in its line, and a CI that could not be computed is a gap in the band. By step,
    single points are spread a little around their step by condition, so their error bars show.
    """
    series: dict[tuple[str, str], list] = {}
    for p in points:
        series.setdefault(style.series(p), []).append(p)
    conditions = sorted({c for _, c in series}, key=_condition_order)
    for (model, condition), ps in sorted(series.items(), key=lambda kv: (kv[0][0], _condition_order(kv[0][1]))):
        ps.sort(key=style.x)
        xs, ys = [style.x(p) for p in ps], [value(p) for p in ps]
        if len(ps) == 1 and style.by == "step":
            xs = [xs[0] + 0.08 * (conditions.index(condition) - (len(conditions) - 1) / 2)]
        color = style.colors.get(condition, "0.25")
        ls, marker = style.line(model)
        ax.plot(xs, ys, color=color, ls=ls, marker=marker, ms=5, lw=1.8)
        if ci is None:
            continue
        lo, hi = zip(*(ci(p) for p in ps))
        with_ci = [all(map(math.isfinite, (y, low, high))) for y, low, high in zip(ys, lo, hi)]
        if len(ps) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
        alone = [
            i for i in range(len(ps)) if with_ci[i] and not any(with_ci[j] for j in (i - 1, i + 1) if 0 <= j < len(ps))
        ]
        if alone:
            err = [[max(ys[i] - lo[i], 0.0) for i in alone], [max(hi[i] - ys[i], 0.0) for i in alone]]
            xs_alone, ys_alone = [xs[i] for i in alone], [ys[i] for i in alone]
            ax.errorbar(xs_alone, ys_alone, yerr=err, color=color, capsize=4, lw=1.2, fmt="none")


def _x_word(style: Style) -> str:
    return "RLHF steps" if style.by == "step" else "parameter count"


def _subject(points: Iterable[Row | Delta | Checkpoint]) -> str:
    """What a figure shows: the model's name, or how many models."""
    models = sorted({p.model for p in points})
    return models[0] if len(models) == 1 else f"{len(models)} models"


def plot_benchmark(benchmark: str, rows: list[Row], style: Style, reference: list[Row] = ()) -> bytes | None:
    """The benchmark's metrics (pooled subset) vs steps or size, one panel per metric with a value; None if none.
    ``reference``: the reward model's rows (pooled), drawn as a dotted horizontal line per condition."""
    panels = [p for p in PANELS[benchmark] if any(r.metric == p.metric and math.isfinite(r.value) for r in rows)]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), f"{BENCHMARKS[benchmark].TITLE} vs {_x_word(style)}", _subject(rows))
    for ax, panel in zip(axes, panels):
        points = [r for r in rows if r.metric == panel.metric]
        _draw_series(ax, points, style, lambda r: r.value, lambda r: (r.ci_low, r.ci_high))
        for r in reference:
            if r.metric == panel.metric and math.isfinite(r.value):
                ax.axhline(r.value, color=style.colors.get(r.condition, "0.25"), ls=":", lw=1.6, zorder=1)
        _format_axes(ax, style, map(style.x, points), panel)
        ax.set_title(panel.title, fontsize=10.5)
        ax.set_ylabel(panel.metric)
    style.legend(fig, {r.condition for r in rows}, {r.model for r in rows})
    if any(r.metric in {p.metric for p in panels} and math.isfinite(r.value) for r in reference):
        fig.legend(handles=[Line2D([], [], color="0.25", ls=":", lw=1.6, label="reward model (probe)")],
                   loc="outside right lower", frameon=False)  # fmt: skip
    return _png(fig)


def plot_deltas(deltas: list[Delta], style: Style, figure: DeltaFigure) -> bytes | None:
    """Paired differences of each benchmark's headline metric vs steps or size; None without a difference that has a
    value.

    One panel per benchmark, 95% CI bands, a zero line; the title and y label state the sign.
    """
    benchmarks = [b for b in PANELS if any(d.benchmark == b and math.isfinite(d.value) for d in deltas)]
    if not benchmarks:
        return None
    title = f"{figure.heading} ({figure.sign}) vs {_x_word(style)}"
    fig, axes = _new_figure(len(benchmarks), title, _subject(deltas))
    for ax, benchmark in zip(axes, benchmarks):
        points = [d for d in deltas if d.benchmark == benchmark]
        _draw_series(ax, points, style, lambda d: d.value, lambda d: (d.ci_low, d.ci_high))
        panel = HEADLINE[benchmark]
        _format_axes(ax, style, map(style.x, points), Panel(panel.metric, panel.title, zero_line=True))
        ax.set_title(f"{BENCHMARKS[benchmark].TITLE}: {panel.metric}", fontsize=10.5)
        ax.set_ylabel(f"Δ {panel.metric} ({figure.sign})")
    style.legend(fig, {d.condition for d in deltas}, {d.model for d in deltas})
    return _png(fig)


def plot_training(checkpoints: list[Checkpoint], rows: list[Row], style: Style) -> bytes | None:
    """Mean reward, KL, response length per kept checkpoint and the benchmarks' training panels (BBQ's unknown
    rate) per condition vs step."""
    covariates = [
        ("mean_reward", "Mean reward (reward model)", "mean reward"),
        ("kl", "KL(policy ‖ reference) per response", "KL (nats)"),
        ("response_length", "Response length", "tokens"),
    ]
    covariates = [c for c in covariates if any(math.isfinite(getattr(k, c[0])) for k in checkpoints)]
    extra = [(panel, [r for r in rows if r.benchmark == name and r.metric == panel.metric]) for name, panel in
             TRAINING_PANELS]
    extra = [(panel, points) for panel, points in extra if points]
    n_panels = len(covariates) + len(extra)
    if not n_panels:
        return None
    fig, axes = _new_figure(n_panels, "Training covariates vs RLHF steps", _subject(rows))
    plotted = [r for _, points in extra for r in points]
    steps = [k.step for k in checkpoints] + [r.step for r in plotted]  # one x range for every panel
    for ax, (field, title, ylabel) in zip(axes, covariates):
        for model in sorted({k.model for k in checkpoints}):
            ks = [k for k in checkpoints if k.model == model and math.isfinite(getattr(k, field))]
            ks.sort(key=lambda k: k.step)
            ls, marker = style.line(model)
            ax.plot([k.step for k in ks], [getattr(k, field) for k in ks], color="0.2", ls=ls, marker=marker, ms=5)
        _format_axes(ax, style, steps, None)
        ax.set_title(title, fontsize=10.5)
        ax.set_ylabel(ylabel)
    for ax, (panel, points) in zip(axes[len(covariates) :], extra):
        _draw_series(ax, points, style, lambda r: r.value, lambda r: (r.ci_low, r.ci_high))
        _format_axes(ax, style, steps, panel)
        ax.set_title(panel.title, fontsize=10.5)
        ax.set_ylabel(panel.metric)
    style.legend(fig, {r.condition for r in plotted}, {r.model for r in rows} | {k.model for k in checkpoints})
    return _png(fig)


# ---- 4. report.md ---------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "n/a"


def _missing(note: str) -> str:
    """An empty cell of the table: ``n/a``, with the reason when there is one."""
    return f"n/a ({note})" if note else "n/a"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def headline_table(rows: list[Row]) -> str:
    """Markdown table of the plotted metrics (pooled subset): value, 95% CI and n per model, step, condition.

    An empty value or CI reads ``n/a (reason)`` (the row's note). Paired-difference rows are left out (they have their
    own figures).
    """
    order = [(b, p.metric) for b, panels in PANELS.items() for p in panels]
    table = [
        r
        for r in rows
        if r.subset == "all" and (r.benchmark, r.metric) in order and not is_difference(r.condition, r.metric)
    ]
    table.sort(
        key=lambda r: (
            r.params or 0,
            r.model,
            -1 if r.step is None else r.step,
            order.index((r.benchmark, r.metric)),
            _condition_order(r.condition),
        )
    )
    lines = [
        "| model | params | step | benchmark | condition | metric | value | 95% CI | n |",
        "|---|---:|---:|---|---|---|---:|---|---:|",
    ]
    for r in table:
        value = _number(r.value) if math.isfinite(r.value) else _missing(r.note)
        if math.isfinite(r.ci_low + r.ci_high):
            ci = f"[{_number(r.ci_low)}, {_number(r.ci_high)}]"
        else:  # the note of an empty value is in its value cell
            ci = _missing(r.note if math.isfinite(r.value) else "")
        lines.append(
            "| "
            + " | ".join(
                _cell(v)
                for v in (
                    r.model,
                    "–" if r.params is None else format_params(r.params),
                    "–" if r.step is None else r.step,
                    r.benchmark,
                    r.condition,
                    r.metric,
                    value,
                    ci,
                    "–" if r.n is None else r.n,
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _intro(rows: list[Row], style: Style) -> str:
    """How to read the figures: what x is, what a line is, what a band is."""
    if style.by == "step":
        models = len({r.model for r in rows})
        lines = "one line per prompt condition (colour)" + ("; line style per model" if models > 1 else "")
        x = "x: RLHF steps of the kept checkpoints"
    else:
        at = ", ".join(
            f"{m} {'without RLHF' if s is None else f'at step {s}'}"
            for m, s in sorted({(r.model, r.step) for r in rows})
        )
        lines = "one line per prompt condition (colour) across the models"
        x = f"x: parameter count (log scale), each model at its largest evaluated RLHF step ({at})"
    return (
        f"{x}; {lines}. Bands are 95% bootstrap CIs (error bars at a point whose neighbours on its line have no CI, "
        "such as a line of one point; neither where a CI could not be computed). Metrics are pooled over all "
        "items (`subset` = all); an empty value is not drawn."
    )


@dataclass(frozen=True)
class Drawn:
    """One figure of the report: file name, heading, caption and the PNG bytes."""

    name: str
    heading: str
    caption: str
    png: bytes


DELTA_READING = (
    "Below zero: the metric fell (a negative BBQ bias-score difference means less bias; for Winogender, less "
    "tracking of occupational statistics). Law-school parity is best at 0, so read its Δ together with its level "
    "in the law-school figure."
)
SELF_CORRECTION_CAPTION = (
    "Self-correction, condition minus Q: each condition's headline metric minus Q's at the same checkpoint "
    "(metrics.csv rows `<condition>_minus_q`), over the units evaluated under both (for a CoT condition its "
    "smaller subsample; n in metrics.csv). Bands: 95% paired bootstrap CIs, the same resampled units for both "
    "conditions. " + DELTA_READING
)
STEP0_CAPTION = (
    "RLHF, step k minus step 0: each checkpoint's headline metric minus that of step 0 (the RL-init policy) under "
    "the same condition (metrics.csv rows `<metric>_minus_step0`), over the units evaluated at both steps. Bands: "
    "95% paired bootstrap CIs, the same resampled units at both steps. " + DELTA_READING
)


@dataclass(frozen=True)
class DeltaFigure:
    """A figure of paired differences: which rows it draws, and how it is titled, signed and captioned."""

    name: str
    heading: str
    sign: str  # what minus what, in the title and the y label
    select: Callable[[list[Row]], list[Delta]]
    rows: str  # how metrics.csv names the rows
    none: str  # why a table may have none
    caption: str
    by_step_only: bool


DELTA_FIGURES = (
    DeltaFigure(
        "self_correction.png",
        "Self-correction",
        "condition − Q",
        self_correction_deltas,
        f"`<condition>{MINUS_Q}`",
        "no condition besides Q was evaluated with Q",
        SELF_CORRECTION_CAPTION,
        by_step_only=False,
    ),
    DeltaFigure(
        "vs_step0.png",
        "RLHF vs step 0",
        "step k − step 0",
        step0_deltas,
        f"`<metric>{MINUS_STEP0}`",
        "step 0 and a later checkpoint were not both evaluated",
        STEP0_CAPTION,
        by_step_only=True,
    ),
)
TRAINING_CAPTION = (
    "Training covariates of each kept checkpoint from its PPO manifest (mean reward, KL to the reference policy, "
    "response length; step 0 has no rollout yet), and the share of BBQ answers that pick the 'unknown' option, "
    "so that a fall in bias can be told apart from more 'unknown' answers."
)


def empty_values(rows: list[Row], style: Style) -> list[str]:
    """One line per point a figure leaves out because its value is empty (pooled rows), with the reason."""
    drawn = {(b, p.metric) for b, panels in PANELS.items() for p in panels}
    if style.by == "step":
        drawn |= {(b, p.metric) for b, p in TRAINING_PANELS}

    def where(p: Row | Delta) -> str:
        step = "" if p.step is None else f" step {p.step}"
        return f"{p.model}{step}"

    lines = [
        f"{BENCHMARKS[r.benchmark].TITLE} `{r.metric}`, {condition_label(r.condition)}, {where(r)}: "
        f"{r.note or 'no value'}"
        for r in rows
        if (r.benchmark, r.metric) in drawn and not is_difference(r.condition, r.metric) and not math.isfinite(r.value)
    ]
    for figure in DELTA_FIGURES:
        if figure.by_step_only and style.by != "step":
            continue
        lines += [
            f"{figure.heading} ({figure.sign}): {BENCHMARKS[d.benchmark].TITLE} `{d.metric}`, "
            f"{condition_label(d.condition)}, {where(d)}: {d.note or 'no value'}"
            for d in figure.select(rows)
            if not math.isfinite(d.value)
        ]
    return lines


REFERENCE_CAPTION = (
    " Dotted horizontal lines: the run's reward model, probed on the same items (`selfcorrect probe`): the same "
    "metric computed from its preferences between the candidate answers (the softmax of its rewards for each "
    "answer as a finished reply) in place of a policy's probabilities. It is where the reward would pull a policy "
    "that only followed it: a policy line that moves toward it over RLHF steps moves the way the reward prefers. "
    "It measures the reward model's preference between the given answers, not what any policy would say."
)


def draw_figures(
    rows: list[Row], checkpoints: list[Checkpoint], style: Style, reference: list[Row] = ()
) -> tuple[list[Drawn], list[str]]:
    """Every figure there is data for (pooled rows), and a note for each one left out; ``reference``: the reward
    model's pooled rows, drawn into the benchmark figures."""
    drawn: list[Drawn] = []
    notes: list[str] = []
    levels = [r for r in rows if not is_difference(r.condition, r.metric)]
    for benchmark, module in BENCHMARKS.items():
        mine = [r for r in levels if r.benchmark == benchmark]
        lines = [r for r in reference if r.benchmark == benchmark and not is_difference(r.condition, r.metric)]
        png = plot_benchmark(benchmark, mine, style, lines)
        if png is None and any(r.metric == p.metric for r in mine for p in PANELS[benchmark]):
            notes.append(f"{module.TITLE}: every plotted value is empty (see Empty values), no figure.")
        elif png is None:
            notes.append(f"{module.TITLE}: no metric values in the input, no figure.")
        else:
            with_lines = any(math.isfinite(r.value) for r in lines)
            drawn.append(
                Drawn(f"{benchmark}.png", module.TITLE, module.CAPTION + (REFERENCE_CAPTION if with_lines else ""), png)
            )
    for figure in DELTA_FIGURES:
        if figure.by_step_only and style.by != "step":
            continue
        deltas = figure.select(rows)
        png = plot_deltas(deltas, style, figure)
        if png is None and deltas:
            notes.append(f"{figure.heading}: every difference is empty (see Empty values), no figure.")
        elif png is None:
            notes.append(
                f"{figure.heading}: metrics.csv has no {figure.rows} rows ({figure.none}, or the table was written "
                "before paired differences were computed: rerunning the same `selfcorrect evaluate` command adds "
                "them from the per-item files without scoring again), no figure."
            )
        else:
            drawn.append(Drawn(figure.name, figure.heading, figure.caption, png))
    if style.by == "step":
        png = plot_training(checkpoints, levels, style)
        if png is None:
            notes.append("Training covariates: no PPO checkpoint manifests and no BBQ unknown rate, no figure.")
        else:
            missing = "" if checkpoints else " No PPO checkpoint manifests were found (evaluation-only run)."
            drawn.append(Drawn("training.png", "Training covariates", TRAINING_CAPTION + missing, png))
    return drawn, notes


def _markdown(
    title: str,
    intro: str,
    drawn: list[Drawn],
    notes: list[str],
    empty: list[str],
    rows: list[Row],
    run_dirs: list[Path],
    reference: list[Row] = (),
) -> str:
    parts = [f"# {title}\n", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs) + "\n", intro + "\n"]
    for d in drawn:
        parts.append(f"## {d.heading}\n\n![{d.heading}]({d.name})\n\n*{d.caption}*\n")
    if empty:
        parts.append(
            "## Empty values\n\nNot drawn: these points have no value, because their units cannot give the metric "
            "(metrics.csv `note`).\n\n" + "".join(f"- {line}\n" for line in empty)
        )
    if notes:
        parts.append("## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    parts.append(
        "## Headline numbers\n\nValue, 95% bootstrap CI and n (units behind the metric).\n\n" + headline_table(rows)
    )
    if reference:
        parts.append(
            "## Reward model (probe)\n\nThe run's reward model on the same items: each metric computed from its "
            "preferences between the candidate answers (softmax of its rewards), drawn as the dotted lines above. "
            "Its `q_if_minus_q` rows in metrics.csv (`scorer` reward) say whether it rewards the self-corrected answer "
            "more.\n\n"
            + headline_table(reference)
        )
    return "\n".join(parts)


# ---- 5. the command ------------------------------------------------------------------------------------------
def default_output(run_dirs: list[Path], by: str) -> Path:
    """``RUN_DIR/report`` (``report-by-size`` with --by size) for one run directory; several need --output."""
    if len(run_dirs) != 1:
        raise UserError(f"{len(run_dirs)} run directories: give --output DIR for the combined report")
    report_dir = RunDir(Path(run_dirs[0])).report
    return report_dir if by == "step" else report_dir.with_name(f"{report_dir.name}-by-size")


def report(run_dirs: list[Path], by: str | None = None, output: Path | None = None) -> Path:
    """Plots and report.md for one or more run (or single-model evaluation) directories; returns report.md's path.

    ``by="step"``: metrics vs RLHF steps (one line per model and condition) and training covariates;
    ``by="size"``: each model's metrics at its largest step vs its parameter count (a single-model evaluation:
    one point per condition); ``None``: ``step`` when any row has an RLHF step, else ``size``.
    Everything is read and drawn before the first file is written.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("no run directory given")
    all_rows, checkpoints = load_runs(run_dirs)
    reference = [r for r in all_rows if r.scorer == "reward" and r.subset == "all"]
    all_rows = [r for r in all_rows if r.scorer == "policy"]
    if not all_rows:
        raise UserError(
            f"{', '.join(map(str, run_dirs))}: only reward-model (probe) rows; the report draws them beside a "
            "policy's (give the run directory, or an evaluation of a model)"
        )
    if by is None:  # RLHF steps when there are any; evaluations of single models are compared by size
        by = "step" if any(r.step is not None for r in all_rows) else "size"
    if by not in BY:
        raise UserError(f"--by must be one of {', '.join(BY)}, got {by!r}")
    output = Path(output) if output is not None else default_output(run_dirs, by)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a directory")
    rows = rows_with_step(all_rows) if by == "step" else rows_at_largest_step(all_rows)
    pooled = [r for r in rows if r.subset == "all"]
    conditions = (r.condition for r in [*pooled, *reference] if not is_difference(r.condition, r.metric))
    style = Style.of(by, conditions, [r.model for r in pooled] + [k.model for k in checkpoints])
    drawn, notes = draw_figures(pooled, checkpoints, style, reference)
    no_step = sorted({r.model for r in all_rows if r.step is None})
    if by == "step" and no_step:
        notes.append(f"Left out of the step plots (no RLHF step): {', '.join(no_step)}; see --by size.")

    title = f"selfcorrect report: {_subject(pooled)} by {'RLHF steps' if by == 'step' else 'model size'}"
    intro, empty = _intro(pooled, style), empty_values(pooled, style)
    text = _markdown(title, intro, drawn, notes, empty, rows, run_dirs, reference)
    for d in drawn:
        atomic_write_bytes(output / d.name, d.png)
    path = output / "report.md"
    atomic_write_text(path, text)
    return path
