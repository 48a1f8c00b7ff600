"""The evaluation recipe: every kept PPO checkpoint of ``ppo.save_at_steps`` and every extra model of
``evaluation.models``, each into its own directory under ``eval/``, joined into the run's metrics table and logged to
W&B as each finishes. With a PPO process given, checkpoints are evaluated as they appear while PPO trains on."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from selfcorrect.config.run import RunConfig
from selfcorrect.errors import StageFailed, UserError
from selfcorrect.rundir import MANIFEST


def targets(cfg: RunConfig) -> list:
    """Every model the evaluate stage covers: the run's reward model (probed, if the run trains one and
    ``evaluation.probe_reward``), the PPO checkpoints in save_at_steps, then the extra models."""
    from selfcorrect.evaluate.run_targets import EvalTarget, checkpoint_targets, model_slug, reward_target

    evaluation, run = cfg.evaluation, cfg.run_dir()
    assert evaluation is not None  # the evaluate stage runs only with an evaluation section
    found = []
    if evaluation.probe_reward and cfg.reward is not None:
        found += reward_target(run, cfg.name, run.eval)
    if evaluation.checkpoints and cfg.ppo is not None:
        found += checkpoint_targets(run, list(cfg.ppo.save_at_steps), cfg.name, run.eval)
    for ref in evaluation.models:
        found.append(EvalTarget(ref, ref, run.eval_model(model_slug(ref))))
    return found


def settings(cfg: RunConfig):
    """The evaluation settings of the run (the model is set per target), in the run's dialogue format."""
    assert cfg.evaluation is not None  # the evaluate stage runs only with an evaluation section
    return cfg.evaluation.settings(
        cfg.run_dir().eval,
        seed=cfg.seed,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        dialogue=cfg.dialogue,
    )


def wait_for(proc: subprocess.Popen, seconds: float) -> int | None:
    """Sleep up to ``seconds`` or until ``proc`` ends; returns its exit code, or None while it runs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.returncode
        time.sleep(min(0.5, seconds))
    return proc.poll()


def run(cfg: RunConfig, config: Path | None = None, *, training: subprocess.Popen | None = None) -> Path:
    """Evaluate every target once; with ``training`` (PPO running), evaluate checkpoints as they appear.

    Under a launch of several processes (the pipeline's evaluation stage under its launcher) each target's items are
    shared out over them (:mod:`selfcorrect.evaluate.shards`); process 0 alone joins the tables and logs to W&B.
    ``config``, the run config's path, is unused: every stage recipe takes it.
    """
    from contextlib import nullcontext

    from selfcorrect import dirlock, tracking
    from selfcorrect.evaluate.run_targets import evaluate_target, join_metrics
    from selfcorrect.evaluate.shards import Shard

    assert cfg.evaluation is not None  # the evaluate stage runs only with an evaluation section
    main = Shard.from_env().main
    all_targets = targets(cfg)
    if not all_targets:
        raise UserError(f"{cfg.name}: evaluation: nothing to evaluate (no ppo checkpoints and no evaluation.models)")
    template = settings(cfg)
    metrics = cfg.run_dir().metrics
    pending = list(all_targets)
    # one writer per evaluation directory (`selfcorrect evaluate RUN_DIR` writes it too); the pipeline holds the run dir
    with (
        dirlock.hold(cfg.run_dir().eval, what="the evaluation directory"),
        tracking.EvalLog(cfg.tracking, cfg.name, cfg.root()) if main else nullcontext() as log,
    ):
        while pending:
            ready = [t for t in pending if t.step is None or (Path(t.model) / MANIFEST).is_file()]
            if not ready:
                if training is None:
                    missing = ", ".join(t.model for t in pending)
                    raise UserError(f"{cfg.name}: evaluation: checkpoints missing after PPO finished: {missing}")
                code = wait_for(training, cfg.evaluation.poll_seconds)
                if code not in (None, 0):
                    raise StageFailed("ppo", code)
                if code == 0:
                    training = None
                continue
            evaluate_target(template, ready[0], (len(all_targets) - len(pending) + 1, len(all_targets)))
            pending.remove(ready[0])
            if main:
                assert log is not None  # the main process's EvalLog
                join_metrics(all_targets, metrics, template, deltas=not pending)  # the last join adds step-0 deltas
                log.checkpoint(ready[0])  # live, so a W&B dashboard follows the run
        if main:
            assert log is not None  # the main process's EvalLog
            log.models(all_targets)
    return metrics
