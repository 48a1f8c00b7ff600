"""The pipeline command: read the run config, plan and check it, print the plan (all a dry run does), then run the
stages in order, recording each in ``pipeline.json`` as it finishes. The evaluation runs in this process, after PPO
or while PPO saves later checkpoints (``evaluation.when: during``), or under the launcher on several processes.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from selfcorrect import stop
from selfcorrect.config.run import RunConfig, load_run_config
from selfcorrect.errors import Stopped, UserError
from selfcorrect.pipeline.checks import check_config
from selfcorrect.pipeline.launch import EVALUATE_STAGE, launcher_command, start_stage, stop_if_requested, wait_for_stage
from selfcorrect.pipeline.placement import evaluation_launcher, placement
from selfcorrect.pipeline.plan import (
    StagePlan,
    invalidated_checkpoints,
    make_plan,
    read_state,
    resolved_configs,
    upgrade_records,
    write_state,
)
from selfcorrect.rundir import STAGES, RunDir


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_pipeline(
    config: Path,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    force: bool = False,
    dry_run: bool = False,
    launcher: str | None = None,
    device_memory: float | None = None,
) -> Path | None:
    """Run (or with ``dry_run`` only print) the pipeline of a run config; returns the report path if made.

    ``device_memory`` (GB per device): the plan flags a training stage whose estimated peak is larger.
    """
    from contextlib import nullcontext

    import torch

    from selfcorrect import dirlock
    from selfcorrect.memory import Launch
    from selfcorrect.recipes import evaluate, report
    from selfcorrect.train.checkpoints import describe_kept

    cfg = load_run_config(config)
    root = cfg.root()
    state = read_state(root)
    upgraded = upgrade_records(state)  # records made before data were recorded by content
    plans = make_plan(cfg, config, state, from_stage=from_stage, only=only, force=force)
    invalidated = invalidated_checkpoints(cfg, plans)
    for stage, kept in invalidated.items():
        replaced, names = cfg.run_dir().stage(stage), describe_kept(kept)
        if not force:
            raise UserError(
                f"{config}: rerunning stage '{stage}' replaces {replaced}, and the kept checkpoints {names} are LoRA "
                f"adapters on it; rerun it with the stages after it (--from {stage}), or --force to rerun it anyway "
                "(loading those checkpoints is then refused)"
            )
        print(
            f"pipeline: --force: rerunning '{stage}' invalidates the kept checkpoints {names} (LoRA adapters on "
            f"{replaced}): loading them is refused from then on, and PPO and the stages after it are no longer "
            f"recorded as done; retrain them with selfcorrect pipeline {config} --from ppo",
            file=sys.stderr,
        )
    launcher = launcher or cfg.launcher
    unchecked = check_config(cfg, config, launcher)
    launch = Launch.from_launcher(launcher)
    try:
        where = placement(cfg, launch, torch.cuda.device_count())
    except UserError as exc:
        raise UserError(f"{config}: {exc}") from None
    print(describe_plan(cfg, plans))
    print("\n".join(where.lines))
    if launcher:
        print(f"launch: {shlex.join(launcher_command(launcher))} -m selfcorrect STAGE {config}")
    print(describe_memory(cfg, launcher, device_memory))
    todo = {p.stage for p in plans if p.action != "skip"}
    if dry_run:
        for note in (note for notes in unchecked.values() for note in notes):
            print(f"note: not checked: {note}")
        return None
    blocked = [note for stage, notes in unchecked.items() if stage in todo for note in notes]
    if blocked:
        raise UserError(f"{config}: {blocked[0]}; set HF_HUB_OFFLINE=1 to use the Hugging Face cache")
    if upgraded:  # once: from now on they compare by content
        write_state(root, state)
        print(f"pipeline: {RunDir(root).state}: the data of {', '.join(upgraded)} recorded by content (was by path)")
    if not todo:
        print(f"pipeline: nothing to do; report: {cfg.run_dir().report_md}")
        return cfg.run_dir().report_md
    root.mkdir(parents=True, exist_ok=True)
    resolved = resolved_configs(cfg)
    state = {"name": cfg.name, "config": str(config), "stages": dict(state.get("stages", {}))}
    for plan in plans:  # a stage that runs again invalidates its record and its outputs first
        if plan.action != "skip":
            state["stages"].pop(plan.stage, None)
    if invalidated:  # --force: the kept checkpoints on a replaced directory no longer load
        for later in STAGES[STAGES.index("ppo") :]:
            state["stages"].pop(later, None)
    write_state(root, state)
    for plan in plans:
        stage_dir = cfg.run_dir().stage(plan.stage)
        if plan.clear and stage_dir.exists():
            print(f"pipeline: removing {stage_dir} ({plan.reason})", file=sys.stderr)
            # eval/ has a lock of its own (selfcorrect evaluate RUN_DIR writes it too): never removed under its writer
            with dirlock.hold(stage_dir) if plan.stage == "evaluate" else nullcontext():
                shutil.rmtree(stage_dir)

    def finished(stage: str) -> None:
        state["stages"][stage] = {"resolved": resolved[stage], "completed_at": _now()}
        write_state(root, state)

    report_path = None
    for stage in [p.stage for p in plans if p.stage in todo]:
        if stage in ("sft", "reward"):
            forced = ("--force",) if stage in invalidated else ()  # decided above (sft only takes --force)
            wait_for_stage(stage, start_stage(stage, config, launcher, extra=forced))
        elif stage == "ppo":
            during = "evaluate" in todo and where.during
            proc = start_stage("ppo", config, launcher, hide=where.hidden if during else None)
            if during:
                with stop.forwarding(proc):
                    try:
                        evaluate.run(cfg, training=proc)
                    except Stopped:  # PPO got the signal too: it saves the step in progress before the pipeline ends
                        with stop.deferred():
                            proc.wait()
                        raise
                wait_for_stage("ppo", proc)
                finished("ppo")
                finished("evaluate")
                stop_if_requested("after stages 'ppo' and 'evaluate'")
                continue
            wait_for_stage("ppo", proc)
        elif stage == "evaluate":
            if "evaluate" in state["stages"]:  # done during PPO
                continue
            if where.evaluation > 1:  # shared out over the launcher's processes (selfcorrect.evaluate.shards)
                shared = evaluation_launcher(launcher, launch, where.evaluation)
                wait_for_stage("evaluate", start_stage(EVALUATE_STAGE, config, shared))
            else:
                evaluate.run(cfg)
        elif stage == "report":
            report_path = report.run(cfg)
        finished(stage)
        stop_if_requested(f"after stage '{stage}'")
    if report_path is not None:
        print(f"pipeline: done; report: {report_path}")
    return report_path


def describe_plan(cfg: RunConfig, plans: list[StagePlan]) -> str:
    """The plan as text: stages to run or skip, checkpoints, and what the evaluation costs."""
    lines = [f"pipeline '{cfg.name}' in {cfg.root()}"]
    for p in plans:
        lines.append(f"  {p.stage:<9} {p.action:<6} {p.reason}")
    lines.append(f"dialogue: {cfg.dialogue.describe()} in every stage")
    if cfg.ppo is not None:
        ppo = cfg.ppo
        lines.append(
            f"ppo: {ppo.steps} RLHF steps x {ppo.rollout_batch_size} episodes (<= "
            f"{ppo.steps * ppo.rollout_batch_size * ppo.max_new_tokens:,} generated tokens); "
            f"checkpoints at steps {', '.join(map(str, ppo.save_at_steps))}"
        )
        engine = f"; rollouts sampled by engine {ppo.engine}" if ppo.engine != "hf" else ""  # hf: as before engines
        lines.append(f"ppo optimizer: {ppo.describe_optimizer()}{engine}")
    if cfg.evaluation is not None:
        lines += _describe_evaluation(cfg)
    return "\n".join(lines)


def describe_memory(cfg: RunConfig, launcher: str | None, device_memory: float | None) -> str:
    """Each training stage's estimated peak memory per process (selfcorrect.memory), flagged against
    ``device_memory`` GB."""
    import torch

    from selfcorrect.memory import GB, VLLM_TRAINING_SHARE, Launch, estimate_run

    launch = Launch.from_launcher(launcher)
    dtype = cfg.model.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    zero = f", DeepSpeed ZeRO-{launch.zero}" if launch.zero is not None else ""
    lines = [f"memory per process (estimate; {launch.processes} process(es){zero}, {dtype}):"]
    gpu = device_memory is not None or torch.cuda.is_available()
    for stage, estimate in estimate_run(cfg, launch, dtype, gpu).items():
        if isinstance(estimate, str):
            lines.append(f"  {stage:<9} unknown ({estimate})")
            continue
        flag = ""
        if device_memory is not None:
            fits = estimate.total <= device_memory * GB
            flag = f"  fits {device_memory:g} GB" if fits else f"  WILL NOT FIT {device_memory:g} GB"
        lines.append(f"  {stage:<9} {estimate.describe()}{flag}")
        engine = estimate.parts.get("vllm")
        if engine and device_memory is not None:
            assert cfg.ppo is not None  # only PPO's estimate has a vllm part
            vllm = cfg.ppo.vllm
            share = vllm.gpu_memory_utilization or min(VLLM_TRAINING_SHARE, engine / (device_memory * GB))
            sleeping = "awake throughout" if vllm.sleep is False else "asleep during the update"
            lines.append(f"  {'':<9} vllm: gpu_memory_utilization {share:.2f} of {device_memory:g} GB, {sleeping}")
    return "\n".join(lines)


def _describe_evaluation(cfg: RunConfig) -> list[str]:
    from selfcorrect.evaluate.prompts import load_prompts
    from selfcorrect.evaluate.runner import plan
    from selfcorrect.recipes import evaluate

    evaluation = cfg.evaluation
    assert evaluation is not None  # describe_plan calls this only with an evaluation section
    settings = evaluate.settings(cfg)
    targets = [t for t in evaluate.targets(cfg) if t.scorer == "policy"]  # the probe is counted below
    prompts = load_prompts(settings.prompt_files)
    tasks, _ = plan(settings, prompts)
    max_new = prompts.cot_sampling.max_new_tokens
    when = f" ({evaluation.when} training)" if cfg.ppo is not None and evaluation.checkpoints else ""
    lines = [f"evaluate{when}: {len(targets)} models x {len(tasks)} (benchmark, condition)"]
    passes = tokens = 0
    for task in tasks:
        n = len(task.items)
        # CoT: one pass over the prompt, then one decoding pass per generated token, then the scoring pass
        passes += n * (2 if task.is_cot else 1)
        tokens += n * max_new if task.is_cot else 0
        lines.append(f"  {task.benchmark:<11} {task.condition:<12} {n:>7,} items" + ("  (CoT)" if task.is_cot else ""))
    lines.append(
        f"  per model: {passes:,} prompt forward passes, <= {tokens:,} generated tokens; "
        f"all {len(targets)} models: {passes * len(targets):,} passes, <= {tokens * len(targets):,} tokens"
        + (f" (CoT sampled by engine {evaluation.engine})" if evaluation.engine != "hf" else "")
    )
    if evaluation.probe_reward and cfg.reward is not None:
        q_type = [t for t in tasks if not t.is_cot]
        exchanges = sum(len(it.candidates) for t in q_type for it in t.items)
        lines.append(
            f"  reward model: probed first on the same items, {len(q_type)} Q-type (benchmark, condition), "
            f"{exchanges:,} scored exchanges (selfcorrect probe; evaluation.probe_reward)"
        )
    return lines
