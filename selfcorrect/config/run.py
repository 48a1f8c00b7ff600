"""The run config: one YAML file for every stage of a run (``selfcorrect pipeline | sft | reward | ppo CONFIG``).

A run config names the model, optional LoRA, the dialogue format and one section per stage; every stage writes
into the run directory (``output_dir``, default ``runs/<name>``; its layout is :mod:`selfcorrect.rundir`'s) and
reads only what earlier stages wrote, so any stage can be rerun alone. The stages themselves are the recipes
(:mod:`selfcorrect.recipes`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from selfcorrect import tracking
from selfcorrect.config import LoraSection, ModelSection, StrictModel, TrackingSection, load_config, shipped_file
from selfcorrect.config.evaluation import EvaluationSection
from selfcorrect.config.ppo import PPOSection
from selfcorrect.config.reward import RewardSection
from selfcorrect.config.sft import SFTSection
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError
from selfcorrect.rundir import MANIFEST, RunDir


class RunConfig(StrictModel):
    """A run: model, LoRA, and the sections of the stages it uses."""

    name: str
    output_dir: str | None = None
    seed: int = Field(0, ge=0)
    model: ModelSection = ModelSection()
    dialogue: DialogueSpec = DialogueSpec()  # one format for SFT, reward model, PPO and evaluation (dialogue.py)
    lora: LoraSection | None = None
    sft: SFTSection | None = None
    reward: RewardSection | None = None
    ppo: PPOSection | None = None
    evaluation: EvaluationSection | None = None
    tracking: TrackingSection = TrackingSection()
    # `selfcorrect pipeline` starts each training stage as `<launcher> -m selfcorrect <stage> CONFIG`;
    # default: this Python. E.g. "accelerate launch --config_file accelerate/deepspeed_zero2.yaml" (a shipped file)
    launcher: str | None = None

    def root(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)

    def run_dir(self) -> RunDir:
        """The paths of this run's directory."""
        return RunDir(self.root())

    def section(self, name: str, path: Path):
        """A stage's section; a config without it is a one-line UserError naming the file."""
        section = getattr(self, name)
        if section is None:
            raise UserError(f"{path}: {name}: the config has no '{name}' section")
        return section

    def policy_start(self) -> str:
        """Where the reward model and PPO start: the SFT stage's output once it exists, else ``model.name_or_path``."""
        sft = self.run_dir().sft
        return str(sft) if (sft / MANIFEST).exists() else self.model.name_or_path


def load_run_config(path: str | Path, *, schema_only: bool = False) -> RunConfig:
    """Load and validate a run config: a path, or a shipped pipeline's name (one-line errors naming the file and
    field). ``schema_only``: leave the sections' ``trainer:`` mappings unchecked, so that no deep-learning library is
    imported (:func:`selfcorrect.config.load_config`)."""
    return load_config(shipped_file(path, "pipelines") or path, RunConfig, schema_only=schema_only)


def report_to(cfg: RunConfig, stage: str) -> str:
    """The trainers' ``report_to`` for one stage (W&B runs grouped by the run name)."""
    return tracking.report_to(cfg.tracking, cfg.name, stage, cfg.root())
