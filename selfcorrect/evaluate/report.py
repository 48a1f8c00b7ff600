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

This module writes report.md and runs the command; ``report_input`` reads and checks the tables and picks the rows,
``report_figures`` draws the figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from selfcorrect.errors import UserError
from selfcorrect.evaluate.paired import MINUS_Q, MINUS_STEP0, is_difference
from selfcorrect.evaluate.report_figures import (
    DeltaFigure,
    Style,
    condition_label,
    condition_order,
    figure_subject,
    format_params,
    plot_benchmark,
    plot_deltas,
    plot_training,
)
from selfcorrect.evaluate.report_input import (
    BENCHMARKS,
    PANELS,
    TRAINING_PANELS,
    Checkpoint,
    Delta,
    Row,
    load_runs,
    rows_at_largest_step,
    rows_with_step,
    self_correction_deltas,
    step0_deltas,
)
from selfcorrect.io import atomic_write_bytes, atomic_write_text
from selfcorrect.rundir import RunDir, report_md

BY = ("step", "size")


# ---- report.md ---------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    return f"{value:+.3f}" if math.isfinite(value) else "n/a"


def _missing(note: str) -> str:
    """An empty cell of the table: ``n/a``, with the reason when there is one."""
    return f"n/a ({note})" if note else "n/a"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def headline_table(rows: Sequence[Row]) -> str:
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
            condition_order(r.condition),
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
    rows: list[Row], checkpoints: list[Checkpoint], style: Style, reference: Sequence[Row] = ()
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
    reference: Sequence[Row] = (),
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
            "more.\n\n" + headline_table(reference)
        )
    return "\n".join(parts)


# ---- the command ------------------------------------------------------------------------------------------
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

    title = f"selfcorrect report: {figure_subject(pooled)} by {'RLHF steps' if by == 'step' else 'model size'}"
    intro, empty = _intro(pooled, style), empty_values(pooled, style)
    text = _markdown(title, intro, drawn, notes, empty, rows, run_dirs, reference)
    for d in drawn:
        atomic_write_bytes(output / d.name, d.png)
    path = report_md(output)
    atomic_write_text(path, text)
    return path
