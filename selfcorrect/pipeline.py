"""``selfcorrect pipeline CONFIG``: SFT -> reward -> PPO -> evaluate every checkpoint -> report, in one run dir.

Each stage's resolved config is hashed (with the hashes of the stages before it) and recorded in
``runs/<name>/pipeline.json`` when the stage finishes. A rerun skips finished stages with the same hash,
continues unfinished ones (PPO from ``ppo/last/``, evaluation from its per-item files), and refuses a
finished stage whose config changed, naming the changed keys, unless ``--force``. ``--from STAGE`` and
``--only STAGE`` rerun stages from scratch. Local data files count by content, not path, so a data directory
that moved is the same run (records made by path before are recorded by content once, :func:`upgrade_records`).
Rerunning ``sft`` while kept PPO checkpoints that are LoRA adapters on it stay is refused unless ``--force``.

Training stages run as child processes (``<launcher> -m selfcorrect <stage> CONFIG``; the launcher defaults
to this Python and may be ``accelerate launch ...``) that die with the pipeline. Evaluation runs in this
process, either after PPO or while PPO saves later checkpoints (``evaluation.when: during``); either way
each checkpoint is evaluated once.
"""

from __future__ import annotations

import ctypes
import json
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfcorrect import stop
from selfcorrect.config.run import RunConfig, load_run_config
from selfcorrect.errors import EXIT_STOPPED, StageFailed, Stopped, UserError
from selfcorrect.io import atomic_write_text
from selfcorrect.rundir import RunDir

if TYPE_CHECKING:
    from selfcorrect.memory import Launch

STAGES = ("sft", "reward", "ppo", "evaluate", "report")


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
        if stage in ("sft", "reward", "ppo"):
            skip = cfg.ppo.unhashed() if stage == "ppo" else set()
            own = {**common, stage: dump(getattr(cfg, stage), exclude=skip)}
            if stage == "reward" and cfg.sft is not None:  # the reward is normalised on the SFT demonstrations
                own["sft_data"] = dump(cfg.sft.data)
        elif stage == "evaluate":
            evaluation = cfg.evaluation
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


def _write_state(root: Path, state: dict[str, Any]) -> None:
    atomic_write_text(RunDir(root).state, json.dumps(state, indent=2, sort_keys=True) + "\n")


def forget_from(root: Path, stage: str) -> list[str]:
    """Remove the records of ``stage`` and the stages after it from ``pipeline.json`` (their outputs are no longer
    what the records say: e.g. kept checkpoints whose base was retrained); returns the stages forgotten."""
    state = read_state(root)
    later = STAGES[STAGES.index(stage) :]
    forgotten = [s for s in later if state.get("stages", {}).pop(s, None) is not None]
    if forgotten:
        _write_state(root, state)
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


# ---- what can be checked before anything trains ------------------------------------------------------------


def launcher_command(launcher: str | None) -> list[str]:
    """The command prefix of the training stages: the launcher (found on PATH or beside this Python), or this Python.

    A launcher whose program cannot be found, or whose ``--config_file`` does not exist, is a one-line UserError.
    """
    if not launcher:
        return [sys.executable]
    from selfcorrect.config import shipped_file

    words = shlex.split(launcher)
    program = shutil.which(words[0]) or shutil.which(words[0], path=str(Path(sys.executable).parent))
    if program is None:
        raise UserError(f"launcher: '{words[0]}' not found (on PATH or beside {sys.executable})")
    for i, flag in enumerate(words[:-1]):
        if flag == "--config_file":  # a shipped accelerate config is found from any working directory
            found = shipped_file(words[i + 1])
            if found is None:
                raise UserError(f"launcher: --config_file {words[i + 1]}: file not found")
            words[i + 1] = str(found)
    return [program, *words[1:]]


def _model_refs(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """``(stage, key, reference)`` of every model the stages load."""
    refs = []
    if cfg.sft is not None or cfg.reward is not None or (cfg.ppo is not None and cfg.ppo.policy is None):
        refs.append(("sft" if cfg.sft is not None else "reward", "model.name_or_path", cfg.model.name_or_path))
    if cfg.ppo is not None and cfg.ppo.policy is not None:
        refs.append(("ppo", "ppo.policy", cfg.ppo.policy))
    if cfg.ppo is not None and cfg.ppo.reward_model is not None and ":" not in cfg.ppo.reward_model:
        refs.append(("ppo", "ppo.reward_model", cfg.ppo.reward_model))
    if cfg.evaluation is not None:
        refs += [("evaluate", "evaluation.models", ref) for ref in cfg.evaluation.models]
    return refs


def _datasets(cfg: RunConfig) -> list[tuple[str, str, Any]]:
    """``(stage, key, DatasetSpec)`` of every dataset the training stages read."""
    specs = []
    for stage, keys in (("sft", ("data", "ptx_data")), ("reward", ("data",)), ("ppo", ("prompts", "ptx_data"))):
        section = getattr(cfg, stage)
        for key in keys if section is not None else ():
            if getattr(section, key, None) is not None:
                specs.append((stage, f"{stage}.{key}", getattr(section, key)))
    return specs


def check_config(cfg: RunConfig, path: Path, launcher: str | None) -> dict[str, list[str]]:
    """Check what can be checked without training, raising a one-line UserError at the first problem.

    The run dir is writable; every training stage's trainer arguments build (as on a machine with the run's devices:
    on a CPU-only machine they are built for the CPU, so ``bf16: true`` is checked for the rest); local data and
    model paths exist; function rewards import; the launcher is found. References to the Hugging Face Hub cannot be
    checked while it is unreachable: they are returned per stage, ``{stage: [notes]}``, for the caller to decide.
    """
    import torch

    from selfcorrect import hub
    from selfcorrect.data import dataset_source
    from selfcorrect.io import check_writable_dir
    from selfcorrect.memory import Launch
    from selfcorrect.models import EMBEDDED_PREFIX, embedded_gguf_path

    check_writable_dir(cfg.root(), "output_dir")
    launcher_command(launcher)
    cpu = {} if torch.cuda.is_available() else {"use_cpu": True}
    launched = Launch.from_launcher(launcher)  # the precision plan of each stage, as the launcher will run it
    launch = {"deepspeed": launched.zero is not None, "mixed_precision": launched.mixed_precision}
    if cfg.sft is not None:
        from selfcorrect.train.sft import sft_config, sft_precision

        sft = cfg.sft.model_copy(update={"trainer": {**cfg.sft.trainer, **cpu}})
        precision = sft_precision(cfg.sft, cfg.model, cfg.lora, **launch)
        sft_config(sft, cfg.run_dir().sft, cfg.seed, "none", has_eval=cfg.sft.data.test_size > 0, precision=precision)
    if cfg.reward is not None and cfg.reward.function is not None:
        from selfcorrect.reward_models.score import load_function

        load_function(cfg.reward.function)
    elif cfg.reward is not None:
        from selfcorrect.reward_models.train import build_reward_config, reward_precision

        reward = cfg.reward.model_copy(update={"trainer": {**cfg.reward.trainer, **cpu}})
        precision = reward_precision(cfg.reward, cfg.model, **launch)
        build_reward_config(reward, cfg.run_dir().reward, cfg.seed, "none", precision)
    if cfg.ppo is not None:
        from selfcorrect.recipes.ppo import ppo_precision, training_arguments

        ppo_precision(cfg, **launch)
        training_arguments(cfg, path, extra=cpu, report="none")
        if cfg.ppo.reward_model is not None and ":" in cfg.ppo.reward_model:
            from selfcorrect.reward_models.score import load_function

            load_function(cfg.ppo.reward_model)
    from selfcorrect.engines import check_engine, check_vllm_section

    for name, section in (("ppo", cfg.ppo), ("evaluation", cfg.evaluation)):
        if section is not None:
            check_engine(section.engine)
            if section.engine == "vllm":
                check_vllm_section(section.vllm, f"{name}.vllm")
    if cfg.evaluation is not None and cfg.evaluation.device is not None:
        from selfcorrect.models import check_device

        check_device(cfg.evaluation.device, "evaluation.device")

    unchecked: dict[str, list[str]] = {}
    for stage, key, spec in _datasets(cfg):
        if dataset_source(spec, f"{path}: {key}.path") == "hub" and not hub.offline_mode() and hub.unreachable():
            unchecked.setdefault(stage, []).append(f"{key}.path {spec.path} (a Hub dataset; the Hub is unreachable)")
    for stage, key, ref in _model_refs(cfg):
        if ref.startswith(EMBEDDED_PREFIX):
            embedded_gguf_path(ref[len(EMBEDDED_PREFIX) :])
        elif Path(ref).expanduser().exists() or _looks_like_path(ref):
            if not Path(ref).expanduser().is_dir():
                raise UserError(f"{path}: {key}: {ref}: no such model directory")
        elif not hub.offline_mode() and hub.unreachable():
            unchecked.setdefault(stage, []).append(f"{key} {ref} (a Hub model; the Hub is unreachable)")
    return unchecked


def _looks_like_path(ref: str) -> bool:
    from selfcorrect.models import looks_like_local_path

    return looks_like_local_path(ref)


# ---- running ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the pipeline dies, so a killed pipeline leaves no stage running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


EVALUATE_STAGE = "evaluate-stage"  # the command of the evaluation stage in processes of its own (cli.py)


def start_stage(
    stage: str, config: Path, launcher: str | None, hide: int | None = None, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """Start ``<launcher> -m selfcorrect <stage> CONFIG`` (launcher default: this Python; ``stage`` a command:
    sft, reward, ppo or :data:`EVALUATE_STAGE`); ``hide``: a CUDA device (an index among the visible ones) the stage
    must not see, as ``CUDA_VISIBLE_DEVICES`` tells it."""
    import os

    command = [*launcher_command(launcher), "-m", "selfcorrect", stage, str(config), *extra]
    # torchrun (under accelerate launch) kills its workers 30 s after passing on a SIGTERM by default: give PPO the
    # time to end its step and save (the scheduler's own kill still bounds it).
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")}
    if hide is not None:
        visible = _visible_gpus()
        env["CUDA_VISIBLE_DEVICES"] = ",".join(v for i, v in enumerate(visible) if i != hide)
    print(f"pipeline: {shlex.join(command)}", file=sys.stderr, flush=True)
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def _visible_gpus() -> list[str]:
    """This process's CUDA devices as ``CUDA_VISIBLE_DEVICES`` names them (or by index)."""
    import os

    import torch

    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [v.strip() for v in named.split(",") if v.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class Placement:
    """Where the stages run: ``during``, whether the evaluation runs while PPO trains; ``hidden``, the GPU (an index
    among the visible ones) that PPO's processes must not see because the evaluation is on it; ``evaluation``, the
    processes of the evaluation stage (1: in the pipeline's own process; more: under the launcher, each process
    taking its share of every checkpoint's items); ``lines``, the plan in words (the dry run prints them)."""

    during: bool
    hidden: int | None
    lines: tuple[str, ...]
    evaluation: int = 1


def placement(cfg: RunConfig, launch: Launch, gpus: int) -> Placement:
    """Where each stage runs on a machine with ``gpus`` CUDA devices, training with the ``launch``'s processes.

    The evaluation never silently shares a training GPU: ``evaluation.when: during`` on GPUs runs it on
    ``evaluation.device`` (a GPU PPO's processes then do not see, or the CPU), and without one it waits until PPO
    ends. After training it runs on ``evaluation.num_processes`` of the launcher's processes (default: all of them,
    or 1 where ``evaluation.device`` names one device). Too few GPUs left for the launcher's processes, or more
    evaluation processes than the launcher starts, is a one-line UserError.
    """
    processes = launch.processes
    training = [s for s in ("sft", "reward", "ppo") if getattr(cfg, s) is not None]
    if cfg.reward is not None and cfg.reward.function is not None:
        training.remove("reward")
    where = f"cuda:0-{gpus - 1}" if gpus > 1 else ("cuda:0" if gpus else "the CPU")
    nodes = f"{launch.machines} nodes x " if launch.machines > 1 else ""
    lines = [f"where: {', '.join(training) or 'no training'} on {nodes}{where} ({processes} process(es) each)"]
    evaluation = cfg.evaluation
    if evaluation is None:
        return Placement(False, None, tuple(lines))
    device = evaluation.device or ("cuda:0" if gpus else "cpu")
    wants_during = evaluation.when == "during" and cfg.ppo is not None
    if not wants_during:
        return _after_training(cfg, launch, device, f"{nodes}{where}", lines)
    if not gpus or device == "cpu":
        lines.append(f"where: evaluate on {device}, while PPO trains (sharing the CPU's cores)" if not gpus else
                     "where: evaluate on the CPU, while PPO trains on the GPUs")  # fmt: skip
        return Placement(True, None, tuple(_one_process(cfg, lines)))
    if evaluation.device is None:
        lines.append(
            "where: evaluate after PPO ends: evaluation.when is during, but evaluation.device names no GPU of its "
            "own, and it never shares a training GPU"
        )
        return _after_training(cfg, launch, device, f"{nodes}{where}", lines)
    index = int(device.partition(":")[2] or 0)
    if processes > gpus - 1:
        raise UserError(
            f"evaluation.device {device}: PPO's {processes} processes need {processes} of the other {gpus - 1} GPUs; "
            "launch fewer processes (accelerate launch --num_processes) or evaluate after training (when: after)"
        )
    lines[-1] = lines[-1].replace(where, f"{where} (PPO without cuda:{index})")
    lines.append(f"where: evaluate on {device}, while PPO trains on the other GPUs")
    return Placement(True, index, tuple(_one_process(cfg, lines)))


def _one_process(cfg: RunConfig, lines: list[str]) -> list[str]:
    """The evaluation beside PPO runs in the pipeline's own process: more than one asked for is a UserError."""
    if (cfg.evaluation.num_processes or 1) > 1:
        raise UserError(
            f"evaluation.num_processes {cfg.evaluation.num_processes}: an evaluation while PPO trains runs in one "
            "process (on evaluation.device); set evaluation.when: after to share it out over the launcher's processes"
        )
    return lines


def _after_training(cfg: RunConfig, launch: Launch, device: str, where: str, lines: list[str]) -> Placement:
    """The evaluation after training: in the pipeline's own process, or on N of the launcher's processes."""
    evaluation = cfg.evaluation
    asked = evaluation.num_processes
    n = asked or (1 if evaluation.device is not None else launch.processes)
    if n > launch.processes:
        raise UserError(
            f"evaluation.num_processes {n}: the launcher starts {launch.processes} process(es); ask for at most "
            f"{launch.processes}, or launch more (accelerate launch --num_processes)"
        )
    if n > 1 and evaluation.device is not None:
        raise UserError(
            f"evaluation.device {evaluation.device}: with evaluation.num_processes {n} each process takes its own "
            "device; leave evaluation.device out, or set evaluation.num_processes: 1"
        )
    if 1 < n < launch.processes and launch.machines > 1:
        raise UserError(
            f"evaluation.num_processes {n}: a launcher over {launch.machines} nodes evaluates on all its "
            f"{launch.processes} processes or in the pipeline's own process; set {launch.processes} or 1"
        )
    if n == 1:
        lines.append(f"where: evaluate on {device}, after training (in the pipeline's process)")
    else:
        lines.append(
            f"where: evaluate on {where} after training: {n} processes under the launcher, each checkpoint's items "
            "shared out over them"
        )
    return Placement(False, None, tuple(lines), n)


def evaluation_launcher(launcher: str | None, launch: Launch, processes: int) -> str | None:
    """The launcher of an evaluation on ``processes`` of ``launch``'s processes: the same, told the count."""
    if processes == launch.processes:
        return launcher
    words = shlex.split(launcher or "")
    for i, word in enumerate(words):
        if word == "--num_processes" or word.startswith("--num_processes="):
            del words[i : i + (2 if word == "--num_processes" else 1)]
            break
    return shlex.join([*words, "--num_processes", str(processes)])


def _wait(stage: str, proc: subprocess.Popen) -> None:
    """Wait for a stage's process; a stop signal meanwhile is passed on to it, and the pipeline stops after it."""
    with stop.deferred(), stop.forwarding(proc):
        code = proc.wait()
    if code != 0:  # asked to stop, a stage ends with 75 (under accelerate launch with the launcher's own code, 1)
        raise StageFailed(stage, EXIT_STOPPED if stop.requested() else code)


def _stop_if_requested(where: str) -> None:
    if stop.requested():
        raise Stopped(f"{stop.requested()} received: the pipeline stopped {where}; rerun it to continue")


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
        _write_state(root, state)
        print(f"pipeline: {RunDir(root).state}: the data of {', '.join(upgraded)} recorded by content (was by path)")
    if not todo:
        print(f"pipeline: nothing to do; report: {cfg.run_dir().report / 'report.md'}")
        return cfg.run_dir().report / "report.md"
    root.mkdir(parents=True, exist_ok=True)
    resolved = resolved_configs(cfg)
    state = {"name": cfg.name, "config": str(config), "stages": dict(state.get("stages", {}))}
    for plan in plans:  # a stage that runs again invalidates its record and its outputs first
        if plan.action != "skip":
            state["stages"].pop(plan.stage, None)
    if invalidated:  # --force: the kept checkpoints on a replaced directory no longer load
        for later in STAGES[STAGES.index("ppo") :]:
            state["stages"].pop(later, None)
    _write_state(root, state)
    for plan in plans:
        stage_dir = cfg.run_dir().stage(plan.stage)
        if plan.clear and stage_dir.exists():
            print(f"pipeline: removing {stage_dir} ({plan.reason})", file=sys.stderr)
            # eval/ has a lock of its own (selfcorrect evaluate RUN_DIR writes it too): never removed under its writer
            with dirlock.hold(stage_dir) if plan.stage == "evaluate" else nullcontext():
                shutil.rmtree(stage_dir)

    def finished(stage: str) -> None:
        state["stages"][stage] = {"resolved": resolved[stage], "completed_at": _now()}
        _write_state(root, state)

    report_path = None
    for stage in [p.stage for p in plans if p.stage in todo]:
        if stage in ("sft", "reward"):
            forced = ("--force",) if stage in invalidated else ()  # decided above (sft only takes --force)
            _wait(stage, start_stage(stage, config, launcher, extra=forced))
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
                _wait("ppo", proc)
                finished("ppo")
                finished("evaluate")
                _stop_if_requested("after stages 'ppo' and 'evaluate'")
                continue
            _wait("ppo", proc)
        elif stage == "evaluate":
            if "evaluate" in state["stages"]:  # done during PPO
                continue
            if where.evaluation > 1:  # shared out over the launcher's processes (selfcorrect.evaluate.shards)
                shared = evaluation_launcher(launcher, launch, where.evaluation)
                _wait("evaluate", start_stage(EVALUATE_STAGE, config, shared))
            else:
                evaluate.run(cfg)
        elif stage == "report":
            report_path = report.run(cfg)
        finished(stage)
        _stop_if_requested(f"after stage '{stage}'")
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
