"""One writer per directory (selfcorrect.dirlock): run and evaluation directories locked by real processes."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import last_ppo_step, wait_until
from test_ppo import write_config as ppo_config

from selfcorrect import dirlock
from selfcorrect.cli import main
from selfcorrect.errors import UserError
from selfcorrect.rundir import lock_file

HOLDER = """
import sys, time
from selfcorrect.dirlock import hold
with hold(sys.argv[1]):  # a process that holds a directory for some seconds
    time.sleep(float(sys.argv[2]))
"""
# an evaluation that runs a few seconds on the tiny model, and a quick one
LONG_EVAL = ["--benchmarks", "bbq", "--conditions", "q", "--limit", "30", "--batch-size", "1", "--bootstrap", "10"]
QUICK_EVAL = ["--benchmarks", "winogender", "--conditions", "q", "--limit", "4", "--bootstrap", "10"]


def write_config(tmp_path: Path, policy: Path, out: Path, **ppo) -> Path:
    """test_ppo's small PPO run config (rule reward ``rules_mod:vowels``), with ``model`` set to ``policy`` too (the
    dry run's memory plan reads it, not the embedded model)."""
    path = ppo_config(tmp_path, policy, out, **ppo)
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "model": {"name_or_path": str(policy)}}))
    return path


@pytest.fixture
def rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The rule reward importable here and in the processes started from here."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return tmp_path


def start(tmp_path: Path, *argv: str) -> subprocess.Popen:
    """``python -m selfcorrect ARGV`` in a process of its own (its stderr in tmp_path, to read on a failure)."""
    log = (tmp_path / f"stderr-{time.monotonic_ns()}.txt").open("w")
    return subprocess.Popen([sys.executable, "-m", "selfcorrect", *argv], stdout=subprocess.DEVNULL, stderr=log)


def start_holder(directory: Path, seconds: float) -> subprocess.Popen:
    """A process that holds ``directory`` for ``seconds`` and ends."""
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(seconds)])


def holds(directory: Path, proc: subprocess.Popen) -> bool:
    """Whether ``proc`` holds ``directory`` (its lock file names it)."""
    return (dirlock.holder(directory) or {}).get("pid") == proc.pid


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_run_dir_in_use_is_refused_in_one_line_and_the_pipelines_stages_run_under_its_lock(
    peaked_policy_dir, tmp_path, rules, capsys
):
    out = tmp_path / "run"
    config = str(write_config(tmp_path, peaked_policy_dir, out, steps=2, save_at_steps=[0, 2]))
    first = start(tmp_path, "pipeline", config)  # its PPO stage, a child process, must not wait for it
    wait_until(first, lambda: holds(out, first), timeout=300)
    identity = dirlock.holder(out)
    assert identity["host"] == socket.gethostname() and identity["command"] == f"selfcorrect pipeline {config}"
    assert identity["since"].endswith("Z")

    capsys.readouterr()
    assert main(["ppo", config]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"selfcorrect: error: {out.resolve()}: in use by PID {first.pid} on host ")
    assert socket.gethostname() in line and f"(selfcorrect pipeline {config})" in line and "--wait-for-lock" in line
    assert main(["pipeline", config]) == 2  # before it reads pipeline.json
    assert f"PID {first.pid}" in one_error_line(capsys)
    assert first.poll() is None, "the first run ended before the others were tried"

    assert first.wait(timeout=600) == 0  # the first run is unaffected
    kept = sorted(p.name for p in (out / "ppo" / "checkpoints").iterdir())
    assert kept == ["step-000000", "step-000002"] and last_ppo_step(out) == 2
    assert json.loads((out / "pipeline.json").read_text())["stages"].keys() == {"ppo"}
    assert not lock_file(out).exists()

    holder = start_holder(out, 2)
    wait_until(holder, lambda: holds(out, holder), timeout=60)
    capsys.readouterr()
    assert main(["pipeline", config, "--wait-for-lock"]) == 0  # waits, then finds the run done
    captured = capsys.readouterr()
    assert f"in use by PID {holder.pid}" in captured.err and "waiting for it to end" in captured.err
    assert "nothing to do" in captured.out and holder.wait() == 0
    assert not lock_file(out).exists() and dirlock.ENV not in os.environ


def test_evaluations_of_one_output_dir_one_at_a_time(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    command = ["evaluate", str(tiny_model_dir), "--output", str(out), *LONG_EVAL]
    first = start(tmp_path, *command)
    wait_until(first, lambda: holds(out, first), timeout=300)
    capsys.readouterr()
    assert main(command) == 2
    line = one_error_line(capsys)
    assert f"{out.resolve()}: in use by PID {first.pid} on host {socket.gethostname()}" in line
    assert "selfcorrect evaluate" in line

    assert first.poll() is None, "the first evaluation ended before the second was tried"
    assert main([*command, "--wait-for-lock"]) == 0  # waits for the first, then finds every item done
    err = capsys.readouterr().err
    assert f"in use by PID {first.pid}" in err and "waiting for it to end" in err
    assert first.wait(timeout=60) == 0
    assert (out / "metrics.csv").is_file() and not lock_file(out).exists()
    lines = (out / "bbq" / "q.jsonl").read_text().splitlines()
    assert len(lines) == len({json.loads(x)["id"] for x in lines})  # each item once


def test_a_killed_holder_leaves_no_stale_lock(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    command = ["evaluate", str(tiny_model_dir), "--output", str(out), *QUICK_EVAL]
    first = start(tmp_path, *command)
    wait_until(first, lambda: holds(out, first), timeout=300)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert dirlock.holder(out)["pid"] == first.pid  # its lock file stays, naming it, but nobody holds it
    capsys.readouterr()
    started = time.monotonic()
    assert main(command) == 0
    assert "in use" not in capsys.readouterr().err and time.monotonic() - started < 120
    assert (out / "metrics.csv").is_file() and not lock_file(out).exists()


def test_read_only_commands_take_no_lock(tiny_model_dir, peaked_policy_dir, tmp_path, rules):
    evaluation, run = tmp_path / "eval", tmp_path / "run"
    assert main(["evaluate", str(tiny_model_dir), "--output", str(evaluation), *QUICK_EVAL]) == 0
    config = str(write_config(tmp_path, peaked_policy_dir, run))
    holders = [start_holder(evaluation, 300), start_holder(run, 300)]
    try:
        for directory, holder in zip((evaluation, run), holders):
            wait_until(holder, lambda d=directory, h=holder: holds(d, h), timeout=60)
        assert main(["report", str(evaluation), "--output", str(tmp_path / "report")]) == 0
        assert main(["pipeline", config, "--dry-run"]) == 0
        assert all(holds(directory, holder) for directory, holder in zip((evaluation, run), holders))
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


# ---- the rules, in this process ------------------------------------------------------------------------------------


def test_a_process_holds_a_directory_once_and_its_children_inherit_it(tmp_path):
    where = tmp_path / "a" / "b"
    with dirlock.hold(where):
        assert dirlock.holder(where)["pid"] == os.getpid()
        assert os.environ[dirlock.ENV].split(os.pathsep) == [str(where.resolve())]
        with dirlock.hold(where):  # again in this process: no-op
            pass
        assert lock_file(where).exists()
        child = subprocess.run([sys.executable, "-c", HOLDER, str(where), "0"], capture_output=True, text=True)
        assert child.returncode == 0, child.stderr  # started by the holder: runs under its lock
        other = subprocess.run(
            [sys.executable, "-c", HOLDER, str(where), "0"],
            env={k: v for k, v in os.environ.items() if k != dirlock.ENV},
            capture_output=True,
            text=True,
        )
        assert other.returncode != 0 and f"in use by PID {os.getpid()}" in other.stderr
        ranked = subprocess.run(
            [sys.executable, "-c", HOLDER, str(where), "0"],
            env={**{k: v for k, v in os.environ.items() if k != dirlock.ENV}, "RANK": "1"},
            capture_output=True,
            text=True,
        )
        assert ranked.returncode == 0, ranked.stderr  # only global rank 0 locks
    assert not (tmp_path / "a").exists() and dirlock.ENV not in os.environ  # it created them, nothing was written


def test_a_directory_that_cannot_be_written_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is not a directory"):
        with dirlock.hold(tmp_path / "file", what="--output"):
            pass


def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with dirlock.hold(tmp_path / "run"):
        (tmp_path / "run" / "written").write_text("x")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not support file locks" in err[0] and "without the one-writer lock" in err[0]
    assert not lock_file(tmp_path / "run").exists()
