"""Every path of a run directory and of an evaluation directory is built here, and nowhere else.

::

    runs/<name>/pipeline.json                       the pipeline's record of finished stages
    runs/<name>/sft/                                the SFT policy (model or LoRA adapter) + manifest.json
    runs/<name>/reward/                             the reward model + reward_manifest.json
    runs/<name>/ppo/checkpoints/step-NNNNNN/        the policy at each step of ppo.save_at_steps + manifest.json
    runs/<name>/ppo/merged/step-NNNNNN/             with ppo.save_merged: the same, adapters merged (plain model)
    runs/<name>/ppo/last/                           what resuming needs (replaced atomically)
    runs/<name>/ppo/last-deepspeed/step-NNNNNN/     under DeepSpeed: the engine checkpoint that last/ names
    runs/<name>/<stage>/trainer/                    a trainer's working directory
    runs/<name>/eval/step-NNNNNN/                   the evaluation of a kept checkpoint
    runs/<name>/eval/models/<model>/                the evaluation of an extra model (evaluation.models)
    runs/<name>/eval/reward/                        the probe of the run's reward model (selfcorrect probe)
    runs/<name>/eval/metrics.csv                    the run's joined metrics table
    runs/<name>/report/                             report.md and its figures (<figure>.png)
    runs/<name>/.selfcorrect.lock                   while a process writes the run: its lock (selfcorrect.dirlock)
    runs/<name>/eval/.selfcorrect.lock              while a process writes the evaluations: their lock

An evaluation directory (``selfcorrect evaluate MODEL --output DIR``, and each ``eval/...`` above) is an
:class:`EvalDir`::

    DIR/evaluation.json                             settings and prompt hashes; the (benchmark, condition) complete
    DIR/<benchmark>/sample.json                     the evaluated units
    DIR/<benchmark>/<condition>.jsonl               one line per item, appended as items finish
    DIR/<benchmark>/<condition>.part-<rank>.jsonl   under ``accelerate launch``: process ``rank``'s share, folded in
    DIR/metrics.csv                                 the metrics table

A training stage that is given its own directory (the PPO trainer, tests) uses the functions that take that
directory (:func:`checkpoint_dir`, :func:`last_dir`...), so the layout inside a stage has one owner too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

STEP_PATTERN = re.compile(r"step-(\d{6})")
# The pipeline's stages in their order, and each one's directory.
STAGE_DIRS = {"sft": "sft", "reward": "reward", "ppo": "ppo", "evaluate": "eval", "report": "report"}
STAGES = tuple(STAGE_DIRS)
TRAINING_STAGES = ("sft", "reward", "ppo")
PIPELINE_STATE = "pipeline.json"  # the pipeline's record of finished stages, in the run directory
MANIFEST = "manifest.json"  # beside a policy's weights (SFT output, kept checkpoint, export): what made it
REWARD_MANIFEST = "reward_manifest.json"  # beside a reward model's weights: its bias, dialogue format, what made it
EVALUATION = "evaluation.json"  # an evaluation directory's identity and progress
METRICS = "metrics.csv"  # an evaluation's (or a run's joined) metrics table
SAMPLE = "sample.json"  # a benchmark's evaluated units
REPORT = "report.md"
# The lock file of a directory that one process at a time writes (a run directory, an evaluation output directory):
# :mod:`selfcorrect.dirlock` holds it while the process writes, and removes it when it lets go.
LOCK = ".selfcorrect.lock"


def lock_file(directory: Path) -> Path:
    """The lock file of a directory that one process at a time writes (:mod:`selfcorrect.dirlock`)."""
    return Path(directory) / LOCK


def step_name(step: int) -> str:
    """``step-000050``: the directory name of RLHF step 50 (kept checkpoints, their evaluations, engine states)."""
    return f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a :func:`step_name`, or None for any other name."""
    match = STEP_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else None


# ---- inside a PPO stage directory (``runs/<name>/ppo``) ---------------------------------------------------------


def checkpoints_dir(ppo_dir: Path) -> Path:
    """Where the kept checkpoints of a PPO stage are."""
    return Path(ppo_dir) / "checkpoints"


def checkpoint_dir(ppo_dir: Path, step: int) -> Path:
    """The kept checkpoint of ``step``: ``ppo/checkpoints/step-000050``."""
    return checkpoints_dir(ppo_dir) / step_name(step)


def merged_dir(ppo_dir: Path, step: int) -> Path:
    """The kept checkpoint of ``step`` with its adapters merged (``ppo.save_merged``)."""
    return Path(ppo_dir) / "merged" / step_name(step)


def last_dir(ppo_dir: Path) -> Path:
    """The resume state of a stage (``last/``); :mod:`selfcorrect.train.checkpoints` owns its contents."""
    return Path(ppo_dir) / "last"


def engine_dir(ppo_dir: Path) -> Path:
    """Under DeepSpeed: where the engine checkpoints that ``last/`` names are written (``step-NNNNNN`` tags)."""
    return Path(ppo_dir) / "last-deepspeed"


def trainer_dir(stage_dir: Path) -> Path:
    """A trainer's working directory inside its stage's directory."""
    return Path(stage_dir) / "trainer"


def kept_steps(ppo_dir: Path) -> list[int]:
    """The steps of the complete kept checkpoints (they appear by rename, with their manifest)."""
    found = []
    for path in checkpoints_dir(ppo_dir).glob("step-*"):
        step = parse_step(path.name)
        if step is not None and (path / MANIFEST).is_file():
            found.append(step)
    return sorted(found)


# ---- a run directory -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (``runs/<name>``, or a config's ``output_dir``)."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / PIPELINE_STATE

    def stage(self, stage: str) -> Path:
        """The directory of a pipeline stage (``sft``, ``reward``, ``ppo``, ``evaluate`` -> ``eval``, ``report``)."""
        return self.root / STAGE_DIRS[stage]

    @property
    def sft(self) -> Path:
        return self.stage("sft")

    @property
    def reward(self) -> Path:
        return self.stage("reward")

    @property
    def ppo(self) -> Path:
        return self.stage("ppo")

    @property
    def eval(self) -> Path:
        return self.stage("evaluate")

    @property
    def report(self) -> Path:
        return self.stage("report")

    @property
    def report_md(self) -> Path:
        return report_md(self.report)

    @property
    def metrics(self) -> Path:
        """The run's joined metrics table."""
        return self.eval / METRICS

    def checkpoint(self, step: int) -> Path:
        return checkpoint_dir(self.ppo, step)

    def kept_steps(self) -> list[int]:
        return kept_steps(self.ppo)

    def checkpoint_manifests(self) -> list[Path]:
        """The manifests of the kept checkpoints, by step."""
        return [self.checkpoint(step) / MANIFEST for step in self.kept_steps()]

    def eval_checkpoint(self, step: int, eval_root: Path | None = None) -> Path:
        """Where the evaluation of the kept checkpoint of ``step`` goes (under ``eval_root``, default ``eval/``)."""
        return (eval_root or self.eval) / step_name(step)

    def eval_reward(self) -> Path:
        """Where the probe of the run's reward model goes (``selfcorrect probe``: its preferences between answers)."""
        return self.eval / "reward"

    def eval_model(self, slug: str) -> Path:
        """Where the evaluation of an extra model goes (``evaluation.models``)."""
        return self.eval / "models" / slug

    @staticmethod
    def is_run(path: Path) -> bool:
        """Whether ``path`` looks like a run directory with kept PPO checkpoints."""
        return checkpoints_dir(Path(path) / STAGE_DIRS["ppo"]).is_dir()


# ---- a report directory ----------------------------------------------------------------------------------------


def report_md(report_dir: Path) -> Path:
    """The report's text, beside its figures."""
    return Path(report_dir) / REPORT


# ---- an evaluation directory -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalDir:
    """The paths of one evaluation directory (``selfcorrect evaluate MODEL --output DIR``; a run's ``eval/...``)."""

    root: Path

    @property
    def identity(self) -> Path:
        """``evaluation.json``: the settings and prompt hashes it was made with, and what is complete."""
        return self.root / EVALUATION

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    def sample(self, benchmark: str) -> Path:
        return self.root / benchmark / SAMPLE

    def results(self, benchmark: str, condition: str) -> Path:
        """One line per finished item of (benchmark, condition)."""
        return self.root / benchmark / f"{condition}.jsonl"

    def result_files(self, benchmark: str) -> list[Path]:
        """Every per-item file of a benchmark (part files included), by name."""
        return sorted((self.root / benchmark).glob("*.jsonl"))

    def all_result_files(self) -> list[Path]:
        """Every per-item file of every benchmark, by path."""
        return sorted(self.root.glob("*/*.jsonl"))


def part_file(results: Path, rank: int) -> Path:
    """The part file of process ``rank`` beside a results file ``<condition>.jsonl``."""
    return results.with_name(f"{results.stem}.part-{rank}.jsonl")


def part_files(results: Path) -> list[Path]:
    """Every part file beside ``results`` (of this launch or of an earlier one with another process count)."""
    return sorted(results.parent.glob(f"{results.stem}.part-*.jsonl"))
