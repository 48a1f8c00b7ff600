"""The SFT recipe: demonstrations (and ptx texts) from the run config, TRL's SFTTrainer, the policy in ``sft/``.

Kept PPO checkpoints trained with LoRA are adapters on ``sft/``: retraining SFT over them would silently make each
another model, so it is refused unless ``force`` (then they are refused when loaded, and the pipeline forgets PPO
and the stages after it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from selfcorrect.config.run import RunConfig, report_to
from selfcorrect.errors import UserError


def check_dependents(cfg: RunConfig, path: Path, force: bool) -> list[Path]:
    """The kept PPO checkpoints that are adapters on the run's ``sft/``, which retraining SFT invalidates.

    Without ``force`` any is a one-line UserError naming them (nothing is touched); with it, a note says what is
    invalidated and ``pipeline.json`` forgets PPO and the stages after it. Returns them.
    """
    from selfcorrect.pipeline.plan import forget_from
    from selfcorrect.train.checkpoints import dependent_checkpoints, describe_kept

    run = cfg.run_dir()
    kept = dependent_checkpoints(run.ppo, run.sft)
    if not kept:
        return []
    names = describe_kept(kept)
    if not force:
        raise UserError(
            f"{path}: {run.sft}: the kept checkpoints {names} are LoRA adapters on it, and retraining it would make "
            "each another model; retrain SFT and PPO together (selfcorrect pipeline CONFIG --from sft), use another "
            "output_dir, or --force to retrain SFT anyway (loading those checkpoints is then refused)"
        )
    print(
        f"sft: --force: retraining {run.sft} invalidates the kept checkpoints {names} (LoRA adapters on it): loading "
        f"them is refused from now on; retrain them with selfcorrect pipeline {path} --from ppo",
        file=sys.stderr,
    )
    forget_from(run.root, "ppo")
    return kept


def run(cfg: RunConfig, path: Path, force: bool = False) -> Path:
    """SFT on the demonstrations; returns the stage's directory. Refuses to replace an ``sft/`` that kept PPO
    checkpoints are adapters on unless ``force`` (:func:`check_dependents`)."""
    from selfcorrect.train.sft import run_sft

    section = cfg.section("sft", path)
    out = cfg.run_dir().sft
    check_dependents(cfg, path, force)
    return run_sft(section, cfg.model, cfg.lora, out, cfg.seed, report_to=report_to(cfg, "sft"), dialogue=cfg.dialogue)
