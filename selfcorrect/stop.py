"""Stop signals: SIGTERM (a scheduler's preemption, ``kill``) and SIGUSR1 (Slurm's ``--signal`` before a time limit).

A cluster stops a job by sending SIGTERM and killing it a grace period later. selfcorrect turns the first signal into
a clean stop that loses no finished work, and a second one into an immediate stop:

* by default (SFT, reward-model training, evaluation, the report) the first signal raises :class:`Stopped` at once,
  like Ctrl-C raises ``KeyboardInterrupt``: whatever was saved stays (evaluation keeps every finished item; the
  writes that matter are atomic), and the CLI exits with code 75;
* inside :func:`deferred` (PPO's loop, a pipeline waiting for its stage) the first signal only sets a flag that the
  code reads at safe points with :func:`requested`: PPO saves ``last/`` at the end of the step in progress (or at the
  end of the previous step when the signal came before this step's update) and then raises :class:`Stopped`;
* child processes registered with :func:`forwarding` get the signal as SIGTERM (every launcher handles it);
* a second signal, more than :data:`REPEAT_S` seconds after the first, kills this process (and its children) at once.
  One stop delivered twice (a scheduler signals every process of a job, and a launcher forwards it to its workers as
  well) arrives within that window and counts once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from selfcorrect.errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_S = 2.0  # a second signal within this many seconds of the first is the same stop, delivered twice


class _State:
    signal_name: str | None = None
    at: float = 0.0
    deferring: int = 0
    children: list[subprocess.Popen] = []


_state = _State()


@contextmanager
def handling() -> Iterator[None]:
    """Handle SIGTERM and SIGUSR1 while it lasts (the CLI runs each command inside it); the previous handlers after."""
    _state.signal_name, _state.deferring, _state.children = None, 0, []
    previous = {sig: signal.signal(sig, _handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def requested() -> str | None:
    """The name of the stop signal received (``"SIGTERM"``...), or None."""
    return _state.signal_name


def _handle(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    now = time.monotonic()
    if _state.signal_name is None:
        _state.signal_name, _state.at = name, now
        for child in _state.children:
            _send(child, signal.SIGTERM)
        if not _state.deferring:
            raise Stopped(f"{name} received: what was finished is saved; rerun the same command to continue")
        print(
            f"selfcorrect: {name} received: stopping after saving the work in progress (a second signal stops at once)",
            file=sys.stderr,
            flush=True,
        )
        return
    if now - _state.at < REPEAT_S:
        return
    for child in _state.children:
        _send(child, signal.SIGKILL)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _send(child: subprocess.Popen, sig: int) -> None:
    if child.poll() is None:
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass


@contextmanager
def deferred() -> Iterator[None]:
    """Within it the first stop signal only sets :func:`requested`; the code stops at its next safe point."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1


def after_deferred() -> None:
    """Raise the stop that a signal during a :func:`deferred` block asked for, once outside every such block."""
    name = _state.signal_name
    if name is not None and not _state.deferring:
        raise Stopped(f"{name} received: what was finished is saved; rerun the same command to continue")


@contextmanager
def forwarding(child: subprocess.Popen) -> Iterator[None]:
    """While it lasts a stop signal is passed on to ``child`` (as SIGTERM; a second one as SIGKILL)."""
    _state.children.append(child)
    if _state.signal_name is not None:  # the stop came just before the child started
        _send(child, signal.SIGTERM)
    try:
        yield
    finally:
        _state.children.remove(child)
