"""`selfcorrect evaluate` under `accelerate launch` with 2 CPU processes (gloo), on the embedded model: the same
per-item results and the same metrics.csv as one process; a kill of one process, then a rerun with one process,
reuses every finished item and gives the same files again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

from selfcorrect.evaluate.shards import Shard
from selfcorrect.rundir import part_files

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--benchmarks", "bbq,law_school,winogender", "--conditions", "q,q_if,q_if_cot",
        "--limit", "16", "--cot-limit", "2", "--bootstrap", "50"]  # fmt: skip


def evaluate_command(model: Path, out: Path, processes: int, *extra: str) -> list[str]:
    launch = [sys.executable, "-m", "selfcorrect"]
    if processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "selfcorrect"]  # fmt: skip
    return [*launch, "evaluate", str(model), "--output", str(out), *ARGS, *extra]


def env() -> dict[str, str]:
    """One thread per process in every run (torchrun's default for several processes), so that the runs compute the
    same sums in the same order."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return {**base, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def results(out: Path) -> dict[tuple[str, str], dict]:
    """Every item's record by (benchmark/condition, id), from the results files and any part files."""
    found = {}
    for path in out.glob("*/*.jsonl"):
        condition = path.stem.split(".part-")[0]
        for line in path.read_text().splitlines():
            if line.endswith("}"):  # a line torn by a kill is not a finished item
                record = json.loads(line)
                found.setdefault((f"{path.parent.name}/{condition}", record["id"]), record)
    return found


def assert_same_items(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].get("reasoning") == b[key].get("reasoning"), key
        assert a[key]["probs"] == pytest.approx(b[key]["probs"], abs=1e-6), key


@pytest.fixture(scope="module")
def cot_prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "short_cot.yaml"
    path.write_text("name: short_cot\ncot_sampling:\n  max_new_tokens: 8\n")
    return path


@pytest.fixture(scope="module")
def single(embedded_model_dir, cot_prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "eval"
    command = evaluate_command(embedded_model_dir, out, 1, "--prompts", str(cot_prompts), "--batch-size", "4")
    subprocess.run(command, env=env(), check=True, capture_output=True, timeout=900)
    return out


def test_two_processes_give_the_results_and_the_table_of_one(embedded_model_dir, cot_prompts, single, tmp_path):
    out = tmp_path / "eval"
    command = evaluate_command(embedded_model_dir, out, 2, "--prompts", str(cot_prompts), "--batch-size", "4")
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(process 1 of 2)" in done.stderr and "(process 0 of 2)" in done.stderr  # both took a share
    assert (out / "metrics.csv").read_bytes() == (single / "metrics.csv").read_bytes()
    assert_same_items(results(out), results(single))
    assert not list(out.glob("*/*.part-*.jsonl"))  # folded into the results files
    assert (
        json.loads((out / "evaluation.json").read_text())["complete"]
        == json.loads((single / "evaluation.json").read_text())["complete"]
    )


def test_a_killed_process_then_a_rerun_with_one_process_gives_the_same_files(embedded_model_dir, cot_prompts, tmp_path):
    """Batches of one item (a kill never leaves a batch half done), so the rerun's items are scored exactly as an
    uninterrupted run scores them: the same metrics.csv, byte for byte."""
    import psutil

    extra = ["--prompts", str(cot_prompts), "--batch-size", "1"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(evaluate_command(embedded_model_dir, killed, 2, *extra), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_until(proc, lambda: any(p.read_bytes().count(b"\n") >= 3 for p in killed.glob("*/*.part-1.jsonl")))
    workers = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)}
    workers["1"].send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    psutil.wait_procs(list(workers.values()), timeout=60)
    assert not (killed / "metrics.csv").exists()
    kept = results(killed)  # the items finished before the kill (in results or part files)
    parts = list(killed.glob("*/*.part-*.jsonl"))
    assert parts, "the kill left no part file to resume from"
    assert all(part in part_files(part.with_name(part.name.split(".part-")[0] + ".jsonl")) for part in parts)

    env_one = env()
    assert subprocess.run(evaluate_command(embedded_model_dir, killed, 1, *extra), env=env_one,
                          capture_output=True, timeout=900).returncode == 0  # fmt: skip
    assert subprocess.run(evaluate_command(embedded_model_dir, clean, 1, *extra), env=env_one,
                          capture_output=True, timeout=900).returncode == 0  # fmt: skip
    assert (killed / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()
    assert_same_items(results(killed), results(clean))
    assert not list(killed.glob("*/*.part-*.jsonl"))
    for key, record in kept.items():  # nothing finished was scored again
        assert results(killed)[key] == record


@pytest.mark.parametrize("world", [2, 3, 8])
def test_shards_take_whole_batches_balanced_by_token_work(world):
    costs = [float(c) for c in [90, 10, 40, 40, 30, 70, 5, 5, 60, 20, 15]]
    shares = [Shard(rank, world).take(costs) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))  # each batch once, whole
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)  # the greedy deal: no process more than one batch ahead
    assert Shard(0, 1).take(costs) == set(range(len(costs)))
