"""Evaluating a run: its reward model probed on the same items (:mod:`.reward_probe`), every kept PPO checkpoint
(and extra models), each with :func:`runner.evaluate`, joined into one table (``RUN_DIR/eval/metrics.csv``, leading
columns ``model,params,step,scorer``) with each checkpoint's paired differences from step 0 (``<m>_minus_step0``)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from selfcorrect.config.evaluation import EvalSettings
from selfcorrect.errors import UserError
from selfcorrect.evaluate import table
from selfcorrect.evaluate.paired import minus_step0_rows
from selfcorrect.evaluate.prompts import PromptSet, load_prompts
from selfcorrect.evaluate.runner import evaluate, is_defined, read_evaluation
from selfcorrect.evaluate.shards import Shard
from selfcorrect.evaluate.table import MetricRow
from selfcorrect.rundir import REWARD_MANIFEST, EvalDir, RunDir


@dataclass(frozen=True)
class EvalTarget:
    """One model of a run to evaluate: a PPO checkpoint (``step`` set), an extra model (``step`` None), or the run's
    reward model, probed (``scorer`` reward)."""

    label: str  # the ``model`` column: the run name, or the model reference of an extra model
    model: str  # what `load_model` (a policy) or `RewardModel.load` (a reward) loads
    output: Path  # its evaluation output dir
    step: int | None = None
    scorer: str = "policy"  # the ``scorer`` column: policy, or reward (selfcorrect.evaluate.reward_probe)


def model_slug(reference: str) -> str:
    """A directory name for a model reference (``HuggingFaceTB/SmolLM2-360M`` -> ``HuggingFaceTB--SmolLM2-360M``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", reference.replace("/", "--")).strip("-") or "model"


def checkpoint_targets(run: RunDir, steps: list[int], label: str, eval_dir: Path) -> list[EvalTarget]:
    """The targets of a run's PPO checkpoints at ``steps`` (whether or not they exist yet)."""
    return [EvalTarget(label, str(run.checkpoint(s)), run.eval_checkpoint(s, eval_dir), s) for s in steps]


def reward_target(run: RunDir, label: str, eval_dir: Path) -> list[EvalTarget]:
    """The probe of the run's reward model into ``eval_dir/reward``, if the run has one (its ``reward/`` holds a
    reward manifest); else nothing."""
    if not (run.reward / REWARD_MANIFEST).is_file():
        return []
    return [EvalTarget(label, str(run.reward), eval_dir / run.eval_reward().name, scorer="reward")]


def evaluate_target(template: EvalSettings, target: EvalTarget, count: tuple[int, int] | None = None) -> Path:
    """Evaluate one target with the template's settings; returns its ``metrics.csv``. ``count``: (this target's
    number, how many there are), for the line that says which one starts."""
    if Shard.from_env().main:
        step = f" step {target.step}" if target.step is not None else ""
        what = " reward model (probe)" if target.scorer == "reward" else ""
        of = f" ({count[0]} of {count[1]})" if count else ""
        print(f"evaluate: {target.label}{what}{step}{of}", file=sys.stderr)
    settings = replace(template, model=target.model, output=target.output)
    if target.scorer == "reward":  # the same items, Q-type conditions only: a probe has no reasoning to sample
        settings = replace(
            settings,
            scorer="reward",
            conditions=q_type(template),
            cot_limit=None,
            engine="hf",
            override_dialogue=False,
            skip_unfit=True,  # a benchmark whose prompts the reward model cannot read is left out, with a note
        )
    return evaluate(settings)


def q_type(template: EvalSettings) -> list[str]:
    """The conditions of ``template`` that are no chain of thought in any of its benchmarks."""
    prompts = load_prompts(template.prompt_files)
    return [
        c
        for c in template.conditions
        if not any(c in prompts.conditions(b) and prompts.condition(b, c).cot is not None for b in template.benchmarks)
    ]


def _minus_step0(template: EvalSettings, prompts: PromptSet, target: EvalTarget, step0: EvalTarget) -> list[MetricRow]:
    """A checkpoint's ``<m>_minus_step0`` rows, for each (benchmark, condition) complete at it and at step 0."""
    complete = [set(json.loads(EvalDir(t.output).identity.read_text())["complete"]) for t in (target, step0)]
    rows = []
    for key in sorted(complete[0] & complete[1]):
        if is_defined(prompts, key):
            at_step, at_step0 = (read_evaluation(template, prompts, t.output, key) for t in (target, step0))
            benchmark, condition = key.split("/")
            rows += minus_step0_rows(
                benchmark, condition, at_step, at_step0, n_boot=template.n_boot, seed=template.seed
            )
    return rows


def join_metrics(targets: list[EvalTarget], path: Path, template: EvalSettings, *, deltas: bool = True) -> Path:
    """Write the run's ``metrics.csv``: each evaluated target's table with ``model,params,step,scorer`` in front.

    A checkpoint past step 0 whose run's step 0 is evaluated too also gets its ``<m>_minus_step0`` rows
    (``selfcorrect.evaluate.paired``), computed from the per-item files of both with ``template``'s
    bootstrap settings, right after its own rows. ``deltas=False`` leaves them out: the pipeline's live
    joins after each checkpoint, which its last join replaces, would otherwise recompute every
    checkpoint's differences each time.
    """
    prompts = load_prompts(template.prompt_files)
    done = [t for t in targets if EvalDir(t.output).metrics.is_file()]
    step0 = {t.label: t for t in done if t.step == 0}
    blocks: list[tuple[Sequence[object], Sequence[Sequence[object]]]] = []
    for target in done:
        manifest = json.loads(EvalDir(target.output).identity.read_text())
        leading = (
            target.label,
            manifest.get("model_info", {}).get("n_parameters", ""),
            "" if target.step is None else target.step,
            target.scorer,
        )
        blocks.append((leading, [table.row_cells(r) for r in table.read(EvalDir(target.output).metrics)]))
        if deltas and target.step and target.label in step0:
            differences = _minus_step0(template, prompts, target, step0[target.label])
            blocks.append((leading, [table.cells(r) for r in differences]))
    return table.write_run(path, blocks)


def evaluate_run(template: EvalSettings, run_dir: Path, label: str | None = None) -> Path:
    """``selfcorrect evaluate RUN_DIR``: evaluate every kept checkpoint of a run into ``template.output``."""
    run = RunDir(Path(run_dir))
    steps = run.kept_steps()
    if not steps:
        raise UserError(f"{run_dir}: no kept checkpoints to evaluate")
    label = label or Path(run_dir).resolve().name
    targets = reward_target(run, label, template.output) + checkpoint_targets(run, steps, label, template.output)
    for number, target in enumerate(targets, 1):
        evaluate_target(template, target, (number, len(targets)))
    if not Shard.from_env().main:  # under accelerate launch: process 0 joins the tables
        return EvalDir(template.output).metrics
    return join_metrics(targets, EvalDir(template.output).metrics, template)
