"""Experiment tracking: W&B (offline unless an API key is configured), tensorboard or none.

Every stage of a run is one W&B run in a group named after the run (``WANDB_RUN_GROUP``), named
``<run>-<stage>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from selfcorrect.config import TrackingSection
from selfcorrect.rundir import EvalDir


def report_to(tracking: TrackingSection, run_name: str, stage: str, run_dir: Path) -> str:
    """Set up the tracking backend for one stage and return the trainers' ``report_to`` value."""
    if tracking.backend == "wandb":
        mode: str = tracking.mode
        if mode == "auto":  # an explicit WANDB_MODE wins; else online only with an API key
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        os.environ["WANDB_MODE"] = mode
        os.environ.setdefault("WANDB_PROJECT", tracking.project)
        os.environ["WANDB_RUN_GROUP"] = run_name
        os.environ["WANDB_NAME"] = f"{run_name}-{stage}"
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    return tracking.backend


def finish(tracking: TrackingSection) -> None:
    """Close the stage's W&B run (transformers leaves it open), so the next stage starts its own."""
    if tracking.backend == "wandb":
        import wandb

        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()  # W&B reads WANDB_NAME and friends once per setup: the next stage sets them anew


def _start(tracking: TrackingSection, run_name: str, stage: str, run_dir: Path):
    """A W&B run for a stage the pipeline runs itself (evaluate, report)."""
    import wandb

    report_to(tracking, run_name, stage, run_dir)
    return wandb.init(
        project=os.environ["WANDB_PROJECT"],
        group=run_name,
        name=f"{run_name}-{stage}",
        dir=os.environ["WANDB_DIR"],
        mode=os.environ["WANDB_MODE"],  # type: ignore[arg-type]  # one of wandb's modes: report_to set it
        job_type=stage,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    from selfcorrect.evaluate import table

    return table.read(path)


class EvalLog:
    """The W&B run of a run's evaluation, logged live: one row per checkpoint as soon as it is evaluated.

    Keys are ``eval/<benchmark>/<condition>/<metric>`` (+ ``_ci_low``/``_ci_high``) against ``rlhf_step``,
    per-item predictions as Tables (``predictions/<benchmark>/<condition>``), and, on close, one
    ``eval/models`` Table for models evaluated without RLHF. Every method is a no-op unless the backend is
    W&B. Use as a context manager.
    """

    def __init__(self, tracking: TrackingSection, run_name: str, run_dir: Path):
        self.tracking = tracking
        self.run = None
        if tracking.backend == "wandb":
            self.run = _start(tracking, run_name, "eval", run_dir)
            self.run.define_metric("rlhf_step")
            self.run.define_metric("eval/*", step_metric="rlhf_step")
            self.run.define_metric("predictions/*", step_metric="rlhf_step")

    def __enter__(self) -> EvalLog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.run is not None:
            finish(self.tracking)
            self.run = None

    def checkpoint(self, target: Any) -> None:
        """Log one evaluated checkpoint (a target with ``step``, ``output``); the probe of the run's reward model
        (``scorer`` reward) goes into the run's summary as ``reward_model/<benchmark>/<condition>/<metric>``."""
        if self.run is not None and getattr(target, "scorer", "policy") == "reward":
            for r in _rows(EvalDir(target.output).metrics):
                if r["subset"] == "all" and r["value"]:
                    key = f"reward_model/{r['benchmark']}/{r['condition']}/{r['metric']}"
                    self.run.summary[key] = float(r["value"])
            return
        if self.run is None or target.step is None:
            return
        import wandb

        from selfcorrect.io import iter_jsonl

        record: dict[str, Any] = {"rlhf_step": target.step}
        for r in _rows(EvalDir(target.output).metrics):
            if r["subset"] == "all" and r["value"]:
                key = f"eval/{r['benchmark']}/{r['condition']}/{r['metric']}"
                record[key] = float(r["value"])
                if r["ci_low"]:
                    record[f"{key}_ci_low"], record[f"{key}_ci_high"] = float(r["ci_low"]), float(r["ci_high"])
        if self.tracking.log_predictions:
            columns = ["id", "prediction", "probs", "mass", "reasoning"]
            for path in EvalDir(target.output).all_result_files():
                data = [
                    [o["id"], o["prediction"], json.dumps(o["probs"]), o.get("mass"), o.get("reasoning", "")]
                    for _, o in iter_jsonl(path, tolerate_torn_tail=True)
                ]
                record[f"predictions/{path.parent.name}/{path.stem}"] = wandb.Table(columns=[*columns], data=data)
        self.run.log(record)

    def models(self, targets: list) -> None:
        """Log the tables of the models evaluated without RLHF (targets without ``step``) as one Table."""
        extra = [
            t
            for t in targets
            if t.step is None and getattr(t, "scorer", "policy") == "policy" and EvalDir(t.output).metrics.is_file()
        ]
        if self.run is None or not extra:
            return
        import wandb

        columns = ["model", "benchmark", "condition", "subset", "metric", "value", "ci_low", "ci_high", "n"]
        data = [[t.label, *(r[c] for c in columns[1:])] for t in extra for r in _rows(EvalDir(t.output).metrics)]
        self.run.log({"eval/models": wandb.Table(columns=[*columns], data=data)})


def log_report(tracking: TrackingSection, run_name: str, run_dir: Path, report_md: Path) -> None:
    """Log the report's PNG plots to W&B as images (no-op unless the backend is W&B)."""
    if tracking.backend != "wandb":
        return
    import wandb

    run = _start(tracking, run_name, "report", run_dir)
    try:
        run.log({f"report/{png.stem}": wandb.Image(str(png)) for png in sorted(report_md.parent.glob("*.png"))})
    finally:
        finish(tracking)
