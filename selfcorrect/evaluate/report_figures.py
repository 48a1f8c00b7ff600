"""The report's figures: colours and line styles per condition and model (:class:`Style`), and each figure drawn as
PNG bytes in memory on matplotlib's Agg canvas, without pyplot: a benchmark's metrics, paired differences, training
covariates.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from selfcorrect.evaluate.benchmarks import Panel
from selfcorrect.evaluate.report_input import BENCHMARKS, HEADLINE, PANELS, TRAINING_PANELS, Checkpoint, Delta, Row

CONDITION_LABELS = {"q": "Q", "q_if": "Q+IF", "q_if_cot": "Q+IF+CoT", "match_stats": "Q+Match Stats"}
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


def condition_label(condition: str) -> str:
    """Display name of a prompt condition (its id when it has none)."""
    return CONDITION_LABELS.get(condition, condition)


def format_params(params: float) -> str:
    """A parameter count for people: 135M, 1.7B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.3g}{suffix}"
    return f"{params:.0f}"


def condition_order(condition: str) -> tuple[int, str]:
    """Sort key of a prompt condition: the known ones in their order, then the others by id."""
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
        conditions = sorted(set(conditions), key=condition_order)
        models = sorted(set(models))
        return cls(
            by=by,
            colors={c: f"C{i % 10}" for i, c in enumerate(conditions)},
            lines={m: (LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]) for i, m in enumerate(models)},
        )

    def x(self, point: Row | Delta) -> float:
        """The x coordinate of a point: its RLHF step, or its parameter count."""
        x = point.step if self.by == "step" else point.params
        assert x is not None  # the rows drawn have one: rows_with_step, rows_at_largest_step
        return x

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
                for c in sorted(conditions, key=condition_order)
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
    conditions = sorted({c for _, c in series}, key=condition_order)
    for (model, condition), ps in sorted(series.items(), key=lambda kv: (kv[0][0], condition_order(kv[0][1]))):
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


def figure_subject(points: Iterable[Row | Delta | Checkpoint]) -> str:
    """What a figure shows: the model's name, or how many models."""
    models = sorted({p.model for p in points})
    return models[0] if len(models) == 1 else f"{len(models)} models"


def plot_benchmark(benchmark: str, rows: list[Row], style: Style, reference: Sequence[Row] = ()) -> bytes | None:
    """The benchmark's metrics (pooled subset) vs steps or size, one panel per metric with a value; None if none.
    ``reference``: the reward model's rows (pooled), drawn as a dotted horizontal line per condition."""
    panels = [p for p in PANELS[benchmark] if any(r.metric == p.metric and math.isfinite(r.value) for r in rows)]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels), f"{BENCHMARKS[benchmark].TITLE} vs {_x_word(style)}", figure_subject(rows))
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


def plot_deltas(deltas: list[Delta], style: Style, figure: DeltaFigure) -> bytes | None:
    """Paired differences of each benchmark's headline metric vs steps or size; None without a difference that has a
    value.

    One panel per benchmark, 95% CI bands, a zero line; the title and y label state the sign.
    """
    benchmarks = [b for b in PANELS if any(d.benchmark == b and math.isfinite(d.value) for d in deltas)]
    if not benchmarks:
        return None
    title = f"{figure.heading} ({figure.sign}) vs {_x_word(style)}"
    fig, axes = _new_figure(len(benchmarks), title, figure_subject(deltas))
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
    extra = [
        (panel, [r for r in rows if r.benchmark == name and r.metric == panel.metric])
        for name, panel in TRAINING_PANELS
    ]
    extra = [(panel, points) for panel, points in extra if points]
    n_panels = len(covariates) + len(extra)
    if not n_panels:
        return None
    fig, axes = _new_figure(n_panels, "Training covariates vs RLHF steps", figure_subject(rows))
    plotted = [r for _, points in extra for r in points]
    steps = [k.step for k in checkpoints] + [style.x(r) for r in plotted]  # one x range for every panel
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
