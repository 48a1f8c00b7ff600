"""The stages as child processes: ``<launcher> -m selfcorrect <stage> CONFIG`` (the launcher defaults to this
Python and may be ``accelerate launch ...``), started so that they die with the pipeline, and waited for with a
stop signal passed on to them; the pipeline stops after a stage when one was received.
"""

from __future__ import annotations

import ctypes
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from selfcorrect import stop
from selfcorrect.errors import EXIT_STOPPED, StageFailed, Stopped, UserError


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


def wait_for_stage(stage: str, proc: subprocess.Popen) -> None:
    """Wait for a stage's process; a stop signal meanwhile is passed on to it, and the pipeline stops after it."""
    with stop.deferred(), stop.forwarding(proc):
        code = proc.wait()
    if code != 0:  # asked to stop, a stage ends with 75 (under accelerate launch with the launcher's own code, 1)
        raise StageFailed(stage, EXIT_STOPPED if stop.requested() else code)


def stop_if_requested(where: str) -> None:
    """Stop the pipeline (:class:`Stopped`) if a stop signal was received; ``where``: after what, in words."""
    if stop.requested():
        raise Stopped(f"{stop.requested()} received: the pipeline stopped {where}; rerun it to continue")
