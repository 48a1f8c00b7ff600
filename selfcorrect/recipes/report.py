"""The report recipe: the run's metrics table and checkpoint manifests as plots and report.md, also to W&B."""

from __future__ import annotations

from pathlib import Path

from selfcorrect.config.run import RunConfig


def run(cfg: RunConfig) -> Path:
    """The report of the run (by RLHF step when it trains, else by model size); returns report.md's path."""
    from selfcorrect import tracking
    from selfcorrect.evaluate.report import report

    assert cfg.evaluation is not None  # the report stage runs only with an evaluation section
    by = "step" if cfg.ppo is not None and cfg.evaluation.checkpoints else "size"
    path = report([cfg.root()], by=by, output=cfg.run_dir().report)
    tracking.log_report(cfg.tracking, cfg.name, cfg.root(), path)
    return path
