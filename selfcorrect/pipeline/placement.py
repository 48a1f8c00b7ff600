"""Where each stage runs: the devices and processes of the training stages and of the evaluation (while PPO
trains, on a device of its own; after it, in the pipeline's process or on the launcher's processes), and the plan
in words that the dry run prints.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from selfcorrect.config.evaluation import EvaluationSection
from selfcorrect.config.run import RunConfig
from selfcorrect.errors import UserError
from selfcorrect.rundir import TRAINING_STAGES

if TYPE_CHECKING:
    from selfcorrect.memory import Launch


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
    training = [s for s in TRAINING_STAGES if getattr(cfg, s) is not None]
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
        return _after_training(evaluation, launch, device, f"{nodes}{where}", lines)
    if not gpus or device == "cpu":
        lines.append(f"where: evaluate on {device}, while PPO trains (sharing the CPU's cores)" if not gpus else
                     "where: evaluate on the CPU, while PPO trains on the GPUs")  # fmt: skip
        return Placement(True, None, tuple(_one_process(evaluation, lines)))
    if evaluation.device is None:
        lines.append(
            "where: evaluate after PPO ends: evaluation.when is during, but evaluation.device names no GPU of its "
            "own, and it never shares a training GPU"
        )
        return _after_training(evaluation, launch, device, f"{nodes}{where}", lines)
    index = int(device.partition(":")[2] or 0)
    if processes > gpus - 1:
        raise UserError(
            f"evaluation.device {device}: PPO's {processes} processes need {processes} of the other {gpus - 1} GPUs; "
            "launch fewer processes (accelerate launch --num_processes) or evaluate after training (when: after)"
        )
    lines[-1] = lines[-1].replace(where, f"{where} (PPO without cuda:{index})")
    lines.append(f"where: evaluate on {device}, while PPO trains on the other GPUs")
    return Placement(True, index, tuple(_one_process(evaluation, lines)))


def _one_process(evaluation: EvaluationSection, lines: list[str]) -> list[str]:
    """The evaluation beside PPO runs in the pipeline's own process: more than one asked for is a UserError."""
    if (evaluation.num_processes or 1) > 1:
        raise UserError(
            f"evaluation.num_processes {evaluation.num_processes}: an evaluation while PPO trains runs in one "
            "process (on evaluation.device); set evaluation.when: after to share it out over the launcher's processes"
        )
    return lines


def _after_training(
    evaluation: EvaluationSection, launch: Launch, device: str, where: str, lines: list[str]
) -> Placement:
    """The evaluation after training: in the pipeline's own process, or on N of the launcher's processes."""
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
