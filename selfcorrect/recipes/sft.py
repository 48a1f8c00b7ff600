"""The SFT recipe: demonstrations (and ptx texts) from the run config, TRL's SFTTrainer, the policy in ``sft/``."""

from __future__ import annotations

from pathlib import Path

from selfcorrect.stages import RunConfig, report_to


def run(cfg: RunConfig, path: Path) -> Path:
    """SFT on the demonstrations; returns the stage's directory."""
    from selfcorrect.train.sft import run_sft

    section = cfg.section("sft", path)
    out = cfg.run_dir().sft
    return run_sft(section, cfg.model, cfg.lora, out, cfg.seed, report_to=report_to(cfg, "sft"), dialogue=cfg.dialogue)
