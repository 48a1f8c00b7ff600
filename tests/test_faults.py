"""What a cluster does to a run: stop signals (SIGTERM, SIGUSR1) end PPO and evaluation cleanly, with real processes.

A first signal saves what resumes the run and exits with code 75; the rerun continues exactly; a second signal stops
at once. (Locks: test_locks.py; failing rewards: test_reward_faults.py; failing writes: test_write_faults.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import last_ppo_step, wait_until
from safetensors.torch import load_file
from test_ppo import LORA, write_config

from selfcorrect.cli import main
from selfcorrect.errors import EXIT_STOPPED

SLOW = '''
import os
import time


def slow_vowels(prompts, responses):
    """The vowel share, after a pause on every call from the second on (a reward server that is slow to answer)."""
    calls = os.environ["SLOW_REWARD_CALLS"]
    with open(calls, "a") as f:
        f.write("call\\n")
    if open(calls).read().count("call") >= 2:
        time.sleep(float(os.environ.get("SLOW_REWARD_SECONDS", "0")))
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]
'''


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def _steps_printed(log: Path) -> int:
    """How many RLHF steps the run reported done (its ``ppo step N/M`` lines, printed when stderr is a file)."""
    return sum(line.startswith("ppo step ") for line in log.read_text().splitlines())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    (path,) = directory.glob("*.safetensors")
    return load_file(path)


def test_sigterm_mid_ppo_on_the_embedded_model_saves_the_step_and_the_rerun_continues_it(
    embedded_model_dir, tmp_path, monkeypatch
):
    """SIGTERM after the first RLHF step (LoRA, so that saving is quick): exit 75 with one line, ``last/`` holds every
    completed step (none lost, although ``save_last_every`` is 10), and the rerun writes the checkpoints of an
    uninterrupted run, bit for bit."""
    monkeypatch.syspath_prepend(str(tmp_path))
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"
    extra = {"steps": 3, "save_at_steps": [1, 3], "save_last_every": 10, "rollout_batch_size": 2,
             "mini_batch_size": 2, "max_new_tokens": 4, "learning_rate": 1e-4}  # fmt: skip
    config = write_config(tmp_path, embedded_model_dir, stopped, lora=LORA, **extra)
    log = tmp_path / "stopped.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "selfcorrect", "ppo", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, env=_env(tmp_path))  # fmt: skip
        wait_until(proc, lambda: _steps_printed(log) >= 1, timeout=600)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == EXIT_STOPPED
    done = _steps_printed(log)
    assert 1 <= done < 3, "the run finished before the signal"
    assert last_ppo_step(stopped) == done  # no completed step lost
    lines = log.read_text().strip().splitlines()
    assert lines[-1].startswith("selfcorrect: stopped: SIGTERM received:") and f"RLHF step {done} of 3" in lines[-1]
    assert "Traceback" not in log.read_text()

    assert main(["ppo", str(config)]) == 0
    assert main(["ppo", str(write_config(tmp_path, embedded_model_dir, clean, lora=LORA, **extra))]) == 0
    for part in ["checkpoints/step-000001", "checkpoints/step-000003", "last/policy", "last/value"]:
        a, b = _weights(stopped / "ppo" / part), _weights(clean / "ppo" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    history = lambda run: json.loads((run / "ppo" / "last" / "state.json").read_text())["state"]["history"]  # noqa: E731
    assert [h["reward"] for h in history(stopped)] == [h["reward"] for h in history(clean)]


def test_sigusr1_while_the_reward_is_scored_abandons_the_step_and_a_second_signal_stops_at_once(
    peaked_policy_dir, tmp_path
):
    """Slurm's SIGUSR1 arrives while step 2 is being scored (before its update): the step is abandoned and ``last/``
    holds step 1. A second signal (more than 2 s later) kills the process at once, without waiting for the reward."""
    (tmp_path / "slow_mod.py").write_text(SLOW)
    runs = {}
    for name, second in (("once", False), ("twice", True)):
        out = tmp_path / name
        config = write_config(tmp_path, peaked_policy_dir, out, reward_model="slow_mod:slow_vowels", steps=4,
                              save_at_steps=[0], save_last_every=10)  # fmt: skip
        calls = tmp_path / f"{name}.calls"
        env = _env(tmp_path, SLOW_REWARD_CALLS=str(calls), SLOW_REWARD_SECONDS="6" if not second else "120")
        proc = subprocess.Popen([sys.executable, "-m", "selfcorrect", "ppo", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)  # fmt: skip
        wait_until(proc, lambda c=calls: c.exists() and c.read_text().count("call") >= 2, timeout=300)
        proc.send_signal(signal.SIGUSR1)
        clock = time.monotonic()
        if second:
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        runs[name] = (proc.returncode, time.monotonic() - clock, err, out)
    code, _, err, out = runs["once"]
    assert code == EXIT_STOPPED, err
    assert err.strip().splitlines()[-1].startswith("selfcorrect: stopped: SIGUSR1 received:")
    assert "RLHF step 1 of 4" in err and last_ppo_step(out) == 1
    code, seconds, err, out = runs["twice"]
    assert code == -signal.SIGTERM and seconds < 60, (code, seconds)
    assert last_ppo_step(out) == -1  # killed at once: nothing saved (last/ comes every 10 steps here)


def test_sigterm_mid_evaluation_keeps_every_finished_item(tiny_model_dir, tmp_path):
    args = ["--benchmarks", "bbq", "--conditions", "q", "--limit", "300", "--batch-size", "1", "--bootstrap", "100"]
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"
    cmd = [sys.executable, "-m", "selfcorrect", "evaluate", str(tiny_model_dir), "--output", str(stopped), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results = stopped / "bbq" / "q.jsonl"
    wait_until(proc, lambda: results.exists() and results.read_bytes().count(b"\n") >= 20, timeout=300)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_STOPPED, err
    assert err.strip().splitlines()[-1].startswith("selfcorrect: stopped: SIGTERM received:")
    before = results.read_bytes()
    assert 20 <= before.count(b"\n") < 300 and not (stopped / "metrics.csv").exists()

    assert main(["evaluate", str(tiny_model_dir), "--output", str(stopped), *args]) == 0
    assert results.read_bytes().startswith(before[: before.rfind(b"\n") + 1])  # every finished item kept
    assert main(["evaluate", str(tiny_model_dir), "--output", str(clean), *args]) == 0
    assert (stopped / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()
