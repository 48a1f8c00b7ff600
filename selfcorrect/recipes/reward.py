"""The reward-model recipe: comparisons from the run config, the K-wise (or pairwise) loss, normalised on the SFT
demonstrations; or a function reward recorded as it is. Writes ``reward/``."""

from __future__ import annotations

from pathlib import Path

from selfcorrect.config import ModelSection
from selfcorrect.config.run import RunConfig, report_to


def run(cfg: RunConfig, path: Path) -> Path:
    """Train the reward model (pairwise or K-wise) or record a function reward; returns the stage's directory."""
    from selfcorrect import data
    from selfcorrect.train.reward import run_reward

    section = cfg.section("reward", path)
    train_ds = eval_ds = None
    if section.function is None:
        build = data.ranked_dataset if section.loss == "kwise" else data.preference_dataset
        train_ds, eval_ds = data.train_test_split(build(section.data, cfg.seed), section.data.test_size, cfg.seed)
    demonstrations = None
    if cfg.sft is not None:
        demonstrations = list(data.sft_dataset(cfg.sft.data, cfg.seed)["messages"])
    start = ModelSection(**{**cfg.model.model_dump(), "name_or_path": cfg.policy_start()})
    return run_reward(
        section,
        start,
        cfg.lora,
        cfg.run_dir().reward,
        cfg.seed,
        train_ds,
        eval_ds,
        demonstrations=demonstrations,
        report_to=report_to(cfg, "reward"),
        dialogue=cfg.dialogue,
    )
