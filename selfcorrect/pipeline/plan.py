"""The plan of a pipeline run: per stage, run, skip or rerun.

What decides a stage's outputs is its resolved config (:func:`resolved_configs`: its section, the shared settings,
local data by content, the hashes of the stages before it); ``pipeline.json`` records it when the stage finishes,
and :func:`make_plan` compares the current config with that record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfcorrect.config.run import RunConfig
from selfcorrect.errors import UserError
from selfcorrect.io import atomic_write_text
from selfcorrect.rundir import STAGES, TRAINING_STAGES, RunDir

# ---- what each stage depends on -------------------------------------------------------------------------


def stages_in(cfg: RunConfig) -> list[str]:
    """The stages the config defines, in pipeline order."""
    present = {
        "sft": cfg.sft is not None,
        "reward": cfg.reward is not None,
        "ppo": cfg.ppo is not None,
        "evaluate": cfg.evaluation is not None,
        "report": cfg.evaluation is not None,
    }
    return [s for s in STAGES if present[s]]


def resolved_configs(cfg: RunConfig, by_content: bool = True) -> dict[str, dict[str, Any]]:
    """Per stage, the config that decides its outputs (tracking, launcher and batch sizes do not).

    Each includes the hashes of the stages before it, so a change upstream changes every later hash. Local data
    files (datasets, evaluation prompt files) are recorded by content, not path (:func:`by_content_identity`): the
    same bytes at another path are the same run. ``by_content=False``: by path, as runs recorded them before (and as
    the messages name the files). A local data file that does not exist is a UserError naming its key.
    """
    from selfcorrect.engines import unhashed
    from selfcorrect.provenance import config_hash

    # JSON mode: what pipeline.json stores reads back equal (enums as strings, tuples as lists)
    dump = lambda section, **kw: section and section.model_dump(mode="json", **kw)  # noqa: E731
    common = {"model": dump(cfg.model), "lora": dump(cfg.lora), "seed": cfg.seed, "dialogue": dump(cfg.dialogue)}
    out: dict[str, dict[str, Any]] = {}
    upstream: dict[str, str] = {}
    for stage in stages_in(cfg):
        if stage in TRAINING_STAGES:
            section = getattr(cfg, stage)
            skip = section.unhashed() if stage == "ppo" else set()
            own = {**common, stage: dump(section, exclude=skip)}
            if stage == "reward" and cfg.sft is not None:  # the reward is normalised on the SFT demonstrations
                own["sft_data"] = dump(cfg.sft.data)
        elif stage == "evaluate":
            evaluation = cfg.evaluation
            assert evaluation is not None  # stages_in: evaluate only with an evaluation section
            skip = {"when", "device", "num_processes", "batch_size", "gen_batch_size", "poll_seconds",
                    *unhashed(evaluation.engine)}  # fmt: skip
            if evaluation.engine == "hf" or evaluation.vllm.is_default():  # configs that name neither keep their hash
                skip.add("vllm")
            if evaluation.probe_reward:  # the default: runs recorded before the probe existed keep their hash
                skip.add("probe_reward")
            own = {
                "evaluation": dump(cfg.evaluation, exclude=skip),
                "model": common["model"],
                "seed": cfg.seed,
                "dialogue": common["dialogue"],
            }
        else:
            own = {}
        if by_content:
            own = by_content_identity(own, strict=True)
        own["after"] = dict(upstream)
        out[stage] = own
        upstream[stage] = config_hash(own)
    return out


def by_content_identity(resolved: dict[str, Any], *, strict: bool) -> dict[str, Any]:
    """A stage's resolved config with its local data by content: every dataset (:func:`data.datasets_by_content`)
    and every evaluation prompts file (``{"content": {size, sha256}}`` in place of its path).

    ``strict``: a missing local data file is a UserError; otherwise (a record made before) it stays a path.
    Idempotent, so records made either way can go through it.
    """
    from selfcorrect.data import datasets_by_content
    from selfcorrect.provenance import content_fingerprint

    out = datasets_by_content(resolved, "" if strict else None)
    evaluation = out.get("evaluation")
    if isinstance(evaluation, dict) and isinstance(evaluation.get("prompts"), list):
        evaluation["prompts"] = [
            {"content": content_fingerprint(p)} if isinstance(p, str) and Path(p).is_file() else p
            for p in evaluation["prompts"]
        ]
    return out


def upgrade_records(state: dict[str, Any]) -> list[str]:
    """Bring records made before local data were recorded by content up to date, in place; returns their stages.

    Such a record names each data file by path: where that path still holds a file, the record takes its content
    (what it held when the stage ran was not recorded: what it holds now is taken for it, once), and the upstream
    hashes of the later records follow. A path that holds nothing any more stays a path, and that stage counts as
    changed (its data cannot be compared).
    """
    from selfcorrect.provenance import config_hash

    records = state.get("stages", {})
    old_hashes: dict[str, str] = {}
    new_hashes: dict[str, str] = {}
    upgraded = []
    for stage in STAGES:
        record = records.get(stage)
        if not isinstance(record, dict) or not isinstance(record.get("resolved"), dict):
            continue
        old = record["resolved"]
        new = by_content_identity({k: v for k, v in old.items() if k != "after"}, strict=False)
        after = old.get("after", {})
        new["after"] = {u: new_hashes[u] if old_hashes.get(u) == h else h for u, h in after.items()}
        old_hashes[stage], new_hashes[stage] = config_hash(old), config_hash(new)
        if new != old:
            record["resolved"] = new
            upgraded.append(stage)
    return upgraded


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        flat: dict[str, Any] = {}
        for key, value in obj.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: obj}


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (upstream hashes left out)."""
    a, b = (
        _flatten({k: v for k, v in old.items() if k != "after"}),
        _flatten({k: v for k, v in new.items() if k != "after"}),
    )
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))


def describe_changes(old: dict[str, Any], new: dict[str, Any], by_path: dict[str, Any]) -> str:
    """The keys that differ between a stage's recorded and current resolved configs, in words; a local data file is
    named by its key and path (``by_path``: the current config by path): ``the content of sft.data.path
    /data/hh.jsonl.gz``, or for a record made by path before, the path it recorded."""
    keys = changed_keys(old, new)
    recorded, paths = _flatten(old), _flatten(by_path)
    contents = sorted({key.partition(".content")[0] for key in keys if ".content" in key})
    words = []
    for head in contents:
        now = paths.get(f"{head}.path", "?")
        if f"{head}.path" in recorded:  # recorded by path before contents were recorded, and not found there
            words.append(f"{head}.path (recorded by path: {recorded[f'{head}.path']}, not there now; now {now})")
        else:
            words.append(f"the content of {head}.path {now}")
    words += [key for key in keys if ".content" not in key and key.removesuffix(".path") not in contents]
    return ", ".join(words)


# ---- the state file and the plan ------------------------------------------------------------------------


def read_state(root: Path) -> dict[str, Any]:
    """``pipeline.json`` of a run dir ({} when absent); malformed JSON is a UserError."""
    path = RunDir(root).state
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: malformed JSON; move the run dir away or fix the file") from None


def write_state(root: Path, state: dict[str, Any]) -> None:
    """Replace ``pipeline.json`` of a run dir (atomically)."""
    atomic_write_text(RunDir(root).state, json.dumps(state, indent=2, sort_keys=True) + "\n")


def forget_from(root: Path, stage: str) -> list[str]:
    """Remove the records of ``stage`` and the stages after it from ``pipeline.json`` (their outputs are no longer
    what the records say: e.g. kept checkpoints whose base was retrained); returns the stages forgotten."""
    state = read_state(root)
    later = STAGES[STAGES.index(stage) :]
    forgotten = [s for s in later if state.get("stages", {}).pop(s, None) is not None]
    if forgotten:
        write_state(root, state)
    return forgotten


@dataclass
class StagePlan:
    """What the pipeline will do with one stage."""

    stage: str
    action: str  # "run" | "rerun" | "skip"
    reason: str
    clear: bool = False  # remove the stage's outputs before running it


def make_plan(
    cfg: RunConfig, path: Path, state: dict[str, Any], *, from_stage: str | None, only: str | None, force: bool
) -> list[StagePlan]:
    """Decide per stage: run, rerun (from scratch) or skip. Raises UserError on a changed finished stage."""
    present = stages_in(cfg)
    for flag, stage in (("--from", from_stage), ("--only", only)):
        if stage is not None and stage not in present:
            raise UserError(f"{path}: {flag} {stage}: the config defines the stages {', '.join(present)}")
    if state.get("name") not in (None, cfg.name):
        raise UserError(f"{cfg.run_dir().state}: the run dir belongs to run '{state['name']}', not '{cfg.name}'")
    try:
        resolved = resolved_configs(cfg)
    except UserError as exc:  # a local data file that is not there
        raise UserError(f"{path}: {exc}") from None
    done = state.get("stages", {})
    plans: list[StagePlan] = []
    selected = (
        [only] if only else present[present.index(from_stage) :] if from_stage else None
    )  # None: run what is needed
    for stage in present:
        record = done.get(stage)
        finished_same = record is not None and record.get("resolved") == resolved[stage]
        if selected is not None and stage not in selected:
            if not finished_same and present.index(stage) < present.index(selected[0]):
                raise UserError(
                    f"{path}: stage '{stage}' has not finished with this config; run it first "
                    f"(selfcorrect pipeline {path} --from {stage})"
                )
            plans.append(StagePlan(stage, "skip", "not selected"))
        elif selected is not None:
            plans.append(StagePlan(stage, "rerun", "selected", clear=True))
        elif finished_same:
            plans.append(StagePlan(stage, "skip", f"done ({record.get('completed_at', '?')})"))
        elif record is not None:
            by_path = resolved_configs(cfg, by_content=False)[stage]
            what = describe_changes(record.get("resolved", {}), resolved[stage], by_path) or "an earlier stage"
            if not force:
                raise UserError(
                    f"{path}: stage '{stage}' finished with another config (changed: {what}); "
                    "rerun with --force to redo it and the stages after it, or use another run name"
                )
            plans.append(StagePlan(stage, "rerun", f"config changed: {what}", clear=True))
        elif force:
            plans.append(StagePlan(stage, "rerun", "--force", clear=True))
        else:
            partial = cfg.run_dir().stage(stage).exists()
            plans.append(StagePlan(stage, "run", "continue from its partial outputs" if partial else "not run yet"))
    return plans


def invalidated_checkpoints(cfg: RunConfig, plans: list[StagePlan]) -> dict[str, list[Path]]:
    """Per stage that will run, the kept checkpoints that are adapters on its directory and that the plan keeps
    (PPO's directory is not cleared): running it would leave them on another base. Only ``sft/`` is such a base."""
    from selfcorrect.train.checkpoints import dependent_checkpoints

    run = cfg.run_dir()
    if any(p.stage == "ppo" and p.clear for p in plans) or not run.ppo.is_dir():
        return {}
    found = {}
    for plan in plans:
        if plan.action != "skip" and plan.stage == "sft":  # only SFT's output is a base of kept checkpoints
            kept = dependent_checkpoints(run.ppo, run.stage(plan.stage))
            if kept:
                found[plan.stage] = kept
    return found
