"""`selfcorrect pipeline` on a tiny random Llama: every stage, W&B, skip/refuse/force, SIGKILL resume, dry runs."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import last_ppo_step, wait_until
from wandb_offline import read_offline_run

from selfcorrect.cli import main
from selfcorrect.evaluate.table import METRIC_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
WANDB_KEYS = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_DIR", "WANDB_API_KEY")
STEPS = [0, 1, 3]
BENCHMARKS = ["bbq", "winogender", "law_school"]
CONDITIONS = ["q", "q_if", "q_if_cot"]
PPO_KEYS = (
    "reward rlhf_reward kl kl_k3 kl_coef policy/entropy policy/clipfrac policy/approx_kl value/clipfrac "
    "loss/policy loss/value loss/ptx response_length eos_rate episodes tokens"
).split()


def tiny_config(tmp: Path, model: Path, out: Path, backend: str = "none") -> dict:
    hh = str(Path(os.environ["SELFCORRECT_DATA_DIR"]) / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    short_cot = tmp / "short_cot.yaml"
    short_cot.write_text("name: short_cot\ncot_sampling:\n  max_new_tokens: 6\n")
    return {
        "name": "tiny",
        "output_dir": str(out),
        "seed": 0,
        "model": {"name_or_path": str(model)},
        "sft": {
            "data": {"path": hh, "format": "hh", "limit": 8},
            "max_length": 128,
            "trainer": {"max_steps": 2, "per_device_train_batch_size": 4},
        },
        "reward": {
            "data": {"path": hh, "format": "hh", "limit": 8},
            "max_length": 128,
            "trainer": {"max_steps": 2, "per_device_train_batch_size": 4},
        },
        "ppo": {
            "prompts": {"path": hh, "format": "hh", "limit": 8},
            "steps": 3,
            "save_at_steps": STEPS,
            "rollout_batch_size": 2,
            "mini_batch_size": 2,
            "max_new_tokens": 4,
            "max_prompt_length": 64,
        },
        "evaluation": {"limit": 5, "cot_limit": 2, "prompts": [str(short_cot)], "bootstrap": 50},
        "tracking": {"backend": backend, "project": "selfcorrect-test", "mode": "offline"},
    }


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def metric_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> dict:
    """One uninterrupted pipeline run, with W&B offline."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "clean"
    path = write(tmp / "clean.yaml", tiny_config(tmp, tiny_model_dir, out, backend="wandb"))
    with pytest.MonkeyPatch.context() as mp:
        for key in WANDB_KEYS:  # report_to sets these for the stage it runs
            mp.setenv(key, "")
            mp.delenv(key)
        mp.setenv("WANDB_SILENT", "true")
        assert main(["pipeline", str(path)]) == 0
    return {"tmp": tmp, "out": out, "path": path}


def test_pipeline_runs_every_stage_and_covers_every_checkpoint(finished_run):
    out = finished_run["out"]
    state = json.loads((out / "pipeline.json").read_text())
    assert set(state["stages"]) == {"sft", "reward", "ppo", "evaluate", "report"}
    rows = metric_rows(out / "eval" / "metrics.csv")
    assert list(rows[0])[:4] == ["model", "params", "step", "scorer"]
    # first the probe of the run's reward model on the same items (Q-type conditions; law school's prompts are
    # longer than this reward model's max_length of 128 tokens, so it is left out), then the checkpoints
    probe = [r for r in rows if r["scorer"] == "reward"]
    assert rows[: len(probe)] == probe and {(r["model"], r["step"]) for r in probe} == {("tiny", "")}
    assert {(r["benchmark"], r["condition"]) for r in probe} == {
        (b, c) for b in ("bbq", "winogender") for c in ("q", "q_if", "q_if_minus_q")
    }
    assert [{k: r[k] for k in METRIC_COLUMNS} for r in probe] == metric_rows(out / "eval" / "reward" / "metrics.csv")
    probed = json.loads((out / "eval" / "reward" / "evaluation.json").read_text())
    assert probed["settings"]["scorer"] == "reward" and probed["dialogue"]["source"] == "recorded"
    sample = json.loads((out / "eval" / "reward" / "bbq" / "sample.json").read_text())["ids"]
    assert sample == json.loads((out / "eval" / "step-000000" / "bbq" / "sample.json").read_text())["ids"]
    rows = [r for r in rows if r["scorer"] == "policy"]
    covered = {(r["step"], r["benchmark"], r["condition"]) for r in rows}
    minus_q = {f"{c}_minus_q" for c in CONDITIONS[1:]}
    assert covered == {(str(s), b, c) for s in STEPS for b in BENCHMARKS for c in [*CONDITIONS, *minus_q]}
    assert {r["model"] for r in rows} == {"tiny"} and all(int(r["params"]) > 0 for r in rows)
    # each checkpoint's table is its own evaluation, joined unchanged, then its paired differences from step 0
    step3 = [r for r in rows if r["step"] == "3"]
    own = metric_rows(out / "eval" / "step-000003" / "metrics.csv")
    assert [{k: r[k] for k in own[0]} for r in step3[: len(own)]] == own
    deltas = [r for r in rows if r["metric"].endswith("_minus_step0")]
    assert step3[len(own) :] == [r for r in deltas if r["step"] == "3"]
    headline = {"bbq": 4, "winogender": 1, "law_school": 1}  # headline metrics per benchmark
    assert len(deltas) == 2 * len(CONDITIONS) * sum(headline.values()) and {r["step"] for r in deltas} == {"1", "3"}
    value = {(r["step"], r["benchmark"], r["condition"], r["metric"]): r for r in rows if r["subset"] == "all"}
    delta = value[("3", "law_school", "q", "parity_difference_minus_step0")]  # the same 5 students at both steps
    at = {s: float(value[(s, "law_school", "q", "parity_difference")]["value"]) for s in ("0", "3")}
    assert delta["n"] == "5" and float(delta["value"]) == pytest.approx(at["3"] - at["0"], abs=1e-9)
    report = out / "report" / "report.md"
    assert report.is_file() and list((out / "report").glob("*.png"))


def test_every_stage_and_every_evaluation_names_the_runs_dialogue(finished_run):
    out = finished_run["out"]
    spec = {"format": "human_assistant", "system_prompt": None}  # the run config's default
    assert json.loads((out / "sft" / "manifest.json").read_text())["dialogue"] == spec
    assert json.loads((out / "reward" / "reward_manifest.json").read_text())["dialogue"] == spec
    for step in STEPS:
        kept = json.loads((out / "ppo" / "checkpoints" / f"step-{step:06d}" / "manifest.json").read_text())
        evaluation = json.loads((out / "eval" / f"step-{step:06d}" / "evaluation.json").read_text())
        assert kept["dialogue"] == spec and evaluation["settings"]["dialogue"] == spec
        assert evaluation["dialogue"]["source"] == "recorded"  # scored in the format the checkpoint recorded


def test_eval_metrics_are_logged_to_wandb_keyed_by_rlhf_step(finished_run):
    runs = {r["name"]: r for r in map(read_offline_run, sorted((finished_run["out"] / "wandb").glob("offline-run-*")))}
    assert set(runs) == {f"tiny-{s}" for s in ("sft", "reward", "ppo", "eval", "report")}
    assert {r["group"] for r in runs.values()} == {"tiny"}
    ev = runs["tiny-eval"]
    assert ev["metrics"].get("eval/*") == "rlhf_step"
    logged = [row for row in ev["history"] if "eval/bbq/q/bias_score_ambig" in row]
    assert [row["rlhf_step"] for row in logged] == STEPS
    rows = metric_rows(finished_run["out"] / "eval" / "metrics.csv")
    want = {
        int(r["step"]): float(r["value"])
        for r in rows
        if (r["benchmark"], r["condition"], r["subset"], r["metric"]) == ("winogender", "q", "all", "pearson_r")
        and r["scorer"] == "policy"
    }
    probe = {  # the probe of the reward model: in the run's summary, not against an RLHF step
        f"reward_model/{r['benchmark']}/{r['condition']}/{r['metric']}": float(r["value"])
        for r in rows
        if r["scorer"] == "reward" and r["subset"] == "all" and r["value"]
    }
    assert probe and {k: v for k, v in ev["summary"].items() if k.startswith("reward_model/")} == pytest.approx(probe)
    assert {row["rlhf_step"]: row["eval/winogender/q/pearson_r"] for row in logged} == pytest.approx(want)
    assert any(key.startswith("predictions/bbq/q") for row in logged for key in row)  # W&B Tables
    assert any(key.startswith("report/") for row in runs["tiny-report"]["history"] for key in row)
    # the training stages log through the trainers' report_to
    logged = {name: set().union(*(row.keys() for row in r["history"])) for name, r in runs.items()}
    assert "train/loss" in logged["tiny-sft"]
    assert {"train/loss", "train/accuracy"} <= logged["tiny-reward"]
    ppo_keys = {f"train/{k}" for k in PPO_KEYS}
    assert ppo_keys <= logged["tiny-ppo"], ppo_keys - logged["tiny-ppo"]
    episodes = [row["train/episodes"] for row in runs["tiny-ppo"]["history"] if "train/episodes" in row]
    assert episodes == [2, 4, 6]


def test_rerun_of_a_finished_pipeline_does_nothing(finished_run, capsys):
    out = finished_run["out"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        assert main(["pipeline", str(finished_run["path"])]) == 0
    assert "nothing to do" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}
    assert after == before


def test_changed_config_of_a_finished_stage_is_refused_naming_the_keys(finished_run, tiny_model_dir, capsys):
    tmp, out = finished_run["tmp"], finished_run["out"]
    cfg = tiny_config(tmp, tiny_model_dir, out, backend="wandb")
    cfg["ppo"]["kl_coef"] = 0.5
    cfg["ppo"]["max_new_tokens"] = 5
    path = write(tmp / "changed.yaml", cfg)
    state = (out / "pipeline.json").read_text()
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage 'ppo'" in err
    assert "ppo.kl_coef" in err and "ppo.max_new_tokens" in err and "--force" in err
    assert (out / "pipeline.json").read_text() == state


def light_config(tmp: Path, model: Path, out: Path) -> dict:
    """PPO (rule reward) -> evaluate -> report: the pipeline without the SFT and reward stages."""
    cfg = tiny_config(tmp, model, out)
    cfg.pop("sft"), cfg.pop("reward")
    cfg["ppo"].update(reward_model="selfcorrect_test_rules:length", policy=str(model), save_last_every=1)
    (tmp / "selfcorrect_test_rules.py").write_text(
        "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"
    )
    return cfg


@pytest.fixture(scope="module")
def light_run(tiny_model_dir, tmp_path_factory) -> dict:
    """An uninterrupted light pipeline run (its rule reward is importable by the child processes)."""
    tmp = tmp_path_factory.mktemp("light")
    out = tmp / "clean"
    path = write(tmp / "clean.yaml", light_config(tmp, tiny_model_dir, out))
    with pytest.MonkeyPatch.context() as mp:  # the rule reward: importable here (checked up front) and in children
        mp.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        mp.syspath_prepend(str(tmp))
        assert main(["pipeline", str(path)]) == 0
    return {"tmp": tmp, "out": out, "path": path}


def test_force_reruns_only_the_changed_stages(light_run, tiny_model_dir, capsys, monkeypatch):
    tmp, out = light_run["tmp"], light_run["tmp"] / "force"
    monkeypatch.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # the PPO child
    monkeypatch.syspath_prepend(str(tmp))
    cfg = light_config(tmp, tiny_model_dir, out)
    path = write(tmp / "force.yaml", cfg)
    assert main(["pipeline", str(path)]) == 0
    ckpt = out / "ppo" / "checkpoints" / "step-000003" / "manifest.json"
    created = json.loads(ckpt.read_text())["created_at"]
    cfg["evaluation"]["bootstrap"] = 60
    write(path, cfg)
    capsys.readouterr()
    assert main(["pipeline", str(path), "--dry-run"]) == 2
    assert "evaluation.bootstrap" in capsys.readouterr().err
    assert main(["pipeline", str(path), "--force"]) == 0
    printed = capsys.readouterr().out
    assert "ppo       skip" in printed and "evaluate  rerun  config changed: evaluation.bootstrap" in printed
    assert json.loads(ckpt.read_text())["created_at"] == created  # PPO not retrained
    assert main(["pipeline", str(path), "--only", "report"]) == 0
    assert "report    rerun  selected" in capsys.readouterr().out


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (state from /proc/PID/stat, after the command name)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_during_ppo_and_during_evaluation_then_rerun(light_run, tiny_model_dir, monkeypatch):
    tmp = light_run["tmp"]
    out = tmp / "killed"
    monkeypatch.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp))
    cfg = light_config(tmp, tiny_model_dir, out)
    cfg["evaluation"].update(when="during", poll_seconds=0.5)  # checkpoints evaluated while PPO trains
    path = write(tmp / "killed.yaml", cfg)
    command = [sys.executable, "-m", "selfcorrect", "pipeline", str(path)]
    run = lambda: subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: E731

    proc = run()  # 1. killed during PPO (after its first step), with PPO running in a child process
    wait_until(proc, lambda: last_ppo_step(out) >= 1)
    children = [c.pid for c in psutil.Process(proc.pid).children()]
    assert children, "PPO runs in a child process"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    assert not any(map(_alive, children)), "the PPO child outlived the killed pipeline"
    kept = {p.name: (p / "manifest.json").read_text() for p in (out / "ppo" / "checkpoints").iterdir()}
    assert "step-000001" in kept

    proc = run()  # 2. killed during evaluation, once some items of a checkpoint are written
    wait_until(proc, lambda: any(p.stat().st_size > 0 for p in (out / "eval").glob("step-*/*/*.jsonl")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = {p: p.read_text() for p in (out / "eval").glob("step-*/*/*.jsonl")}

    assert main(["pipeline", str(path)]) == 0  # 3. finishes the rest
    for name, manifest in kept.items():  # no checkpoint retrained
        assert (out / "ppo" / "checkpoints" / name / "manifest.json").read_text() == manifest
    for p, text in partial.items():  # no item evaluated twice: earlier lines kept, no repeated ids
        now = p.read_text()
        assert now.startswith(text.rsplit("\n", 1)[0])
        ids = [json.loads(x)["id"] for x in now.splitlines() if x.strip()]
        assert len(ids) == len(set(ids)), p
    clean = (light_run["out"] / "eval" / "metrics.csv").read_text()
    assert (out / "eval" / "metrics.csv").read_text() == clean  # "when" does not change what is computed


def test_the_slurm_requeue_script_stops_the_pipeline_cleanly_and_the_rerun_finishes(
    light_run, tiny_model_dir, monkeypatch
):
    """``examples/slurm/pipeline.sbatch`` run as Slurm runs it (bash; ``scontrol`` here only records its arguments):
    Slurm's SIGUSR1 to the script reaches the pipeline, which passes it on to the PPO child as SIGTERM; PPO saves its
    step, the pipeline exits 75 with one line and no child left, the script asks for a requeue; the rerun finishes."""
    tmp = light_run["tmp"]
    out = tmp / "stopped"
    bin_dir = tmp / "fake-slurm"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp))
    path = write(tmp / "stopped.yaml", light_config(tmp, tiny_model_dir, out))
    env = {**os.environ, "SLURM_JOB_ID": "4242",
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}  # fmt: skip
    script = ROOT / "examples" / "slurm" / "pipeline.sbatch"
    proc = subprocess.Popen(["bash", str(script), str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    wait_until(proc, lambda: last_ppo_step(out) >= 1)
    descendants = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert (tmp / "scontrol.log").read_text() == "requeue 4242\n"
    assert err.strip().splitlines()[-1].startswith("selfcorrect: stopped:"), err
    assert "Traceback" not in err
    time.sleep(1.0)
    assert not any(map(_alive, descendants)), "a stage outlived the stopped pipeline"
    assert "report" not in json.loads((out / "pipeline.json").read_text())["stages"]

    assert main(["pipeline", str(path)]) == 0
    assert (out / "eval" / "metrics.csv").read_text() == (light_run["out"] / "eval" / "metrics.csv").read_text()


def test_the_slurm_script_plans_ganguli2023_on_two_nodes_of_eight_gpus(tmp_path):
    """``examples/slurm/pipeline.sbatch ganguli2023 --dry-run`` as Slurm runs it on 2 nodes x 8 GPUs (``scontrol``
    here names the nodes; ``srun`` would fail if called): the pipeline plans every stage under one launcher line
    for both nodes, 16 processes, and the evaluation after training over the same 16."""
    bin_dir = tmp_path / "fake-slurm"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-01\\ngpu-02\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\necho "srun: called in a dry run" >&2; exit 1\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "SLURM_JOB_ID": "4243", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8",
           "SLURM_JOB_NODELIST": "gpu-[01-02]",
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}  # fmt: skip
    script = ROOT / "examples" / "slurm" / "pipeline.sbatch"
    proc = subprocess.run(["bash", str(script), "ganguli2023", "--dry-run"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    launch = next(line for line in proc.stdout.splitlines() if line.startswith("launch: "))
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 accelerate launch" in launch
    assert "--num_machines 2 --num_processes 16 --rdzv_backend c10d --main_process_ip gpu-01" in launch
    assert launch.endswith("-m selfcorrect STAGE ganguli2023")
    assert "where: sft, reward, ppo on 2 nodes x" in proc.stdout
    assert "after training: 16 processes under the launcher" in proc.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def _metric_values(path: Path) -> dict[tuple[str, ...], tuple[float | None, ...]]:
    """A run's metrics.csv by (model, step, benchmark, condition, subset, metric): value and CI as numbers."""
    rows = {}
    for r in csv.DictReader(path.open()):
        key = tuple(r[k] for k in ("model", "step", "benchmark", "condition", "subset", "metric"))
        rows[key] = tuple(float(r[k]) if r[k] else None for k in ("value", "ci_low", "ci_high"))
    return rows


def test_the_evaluation_stage_shares_the_kept_checkpoints_over_the_launchers_processes(
    light_run, tiny_model_dir, monkeypatch, capfd
):
    """The light run's kept checkpoints evaluated again by the pipeline under a launcher of 2 CPU processes: the
    evaluation stage runs as `<launcher> -m selfcorrect evaluate-stage CONFIG`, both processes take a share of every
    checkpoint, and the run's metrics.csv (with the step-0 differences) is the one the pipeline's own process wrote
    (to 1e-6: the processes run on one thread each)."""
    tmp = light_run["tmp"]
    out = tmp / "shared"
    path = write(tmp / "shared.yaml", light_config(tmp, tiny_model_dir, out))
    monkeypatch.setenv("PYTHONPATH", f"{tmp}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp))
    assert main(["pipeline", str(path), "--only", "ppo"]) == 0  # PPO is seeded: the light run's checkpoints again
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    launcher = "accelerate launch --config_file accelerate/cpu_2proc.yaml"
    capfd.readouterr()
    assert main(["pipeline", str(path), "--from", "evaluate", "--launcher", launcher]) == 0
    printed = capfd.readouterr()
    assert "where: evaluate on the CPU after training: 2 processes under the launcher" in printed.out
    assert re.search(r"pipeline: \S+accelerate launch .* -m selfcorrect evaluate-stage \S+shared.yaml", printed.err)
    assert "(process 0 of 2)" in printed.err and "(process 1 of 2)" in printed.err
    assert len(re.findall(rf"evaluate: \S+ step \d+ \(\d of {len(STEPS)}\)", printed.err)) == len(STEPS)  # process 0
    assert not list((out / "eval").rglob("*.part-*.jsonl"))  # folded into each condition's results file
    shared = _metric_values(out / "eval" / "metrics.csv")
    single = _metric_values(light_run["out"] / "eval" / "metrics.csv")
    assert shared.keys() == single.keys() and any(k[5].endswith("_minus_step0") for k in shared)
    for key, values in single.items():
        assert shared[key] == pytest.approx(values, abs=1e-6, nan_ok=True), key
    assert "evaluate" in json.loads((out / "pipeline.json").read_text())["stages"]


@pytest.mark.parametrize("name", ["quickstart", "ganguli2023", "liu2024"])
def test_dry_run_of_the_shipped_pipelines(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/<name> of the working directory: empty here
    path = ROOT / "configs" / "pipelines" / f"{name}.yaml"
    assert main(["pipeline", str(path), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert f"pipeline '{name}'" in plan and "per model:" in plan and "generated tokens" in plan
    if name == "ganguli2023":
        assert "checkpoints at steps 0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000" in plan
        assert 'dialogue: human_assistant ("\\n\\nHuman: ...\\n\\nAssistant:") in every stage' in plan
        assert "lr warmup over 10 RLHF steps from 5e-07 to 5e-06 (peak), then constant; value lr 9e-06" in plan
        assert "Adam betas (0.9, 0.95); EMA of the policy weights, decay 0.992" in plan
        assert re.search(r"bbq +q +58,492 items", plan) and re.search(r"law_school +q_if_cot +43,582 items", plan)
    if name == "liu2024":
        assert re.search(r"winogender +liu_neg +60 items", plan) and "7 models" in plan
        assert [line.split()[0] for line in plan.splitlines()[1:3]] == ["evaluate", "report"]
        assert "reward model: probed" not in plan  # no reward stage
    if name == "quickstart":
        assert "checkpoints at steps 0, 1, 2, 4" in plan and "4 models x 9 (benchmark, condition)" in plan
        assert "<= 576 generated tokens" in plan  # 12 CoT items x 48: quickstart_cot.yaml, found in configs/prompts/
        # the reward model probed on the Q-type items: BBQ 2 x 40 x 3, Winogender 2 x 40 x 3, law school 2 x 80 x 2
        assert "reward model: probed first on the same items, 6 Q-type (benchmark, condition), 800 scored" in plan


def test_typo_in_a_stage_section_is_a_one_line_error(tmp_path, tiny_model_dir, capsys):
    cfg = tiny_config(tmp_path, tiny_model_dir, tmp_path / "out")
    cfg["evalution"] = cfg.pop("evaluation")
    path = write(tmp_path / "typo.yaml", cfg)
    assert main(["pipeline", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("evalution: unknown key") and str(path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_evaluate_run_dir_covers_every_checkpoint(light_run, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", str(light_run["out"]), "--benchmarks", "winogender", "--conditions", "q"]
    assert main([*args, "--limit", "4", "--bootstrap", "20", "--output", str(out)]) == 0
    rows = metric_rows(out / "metrics.csv")
    assert list(rows[0])[:3] == ["model", "params", "step"]
    assert sorted({int(r["step"]) for r in rows}) == STEPS and {r["model"] for r in rows} == {"clean"}
    assert {(r["benchmark"], r["condition"]) for r in rows} == {("winogender", "q")}
    assert [p.name for p in sorted(out.glob("step-*"))] == [f"step-{s:06d}" for s in STEPS]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path), "--limit", "4"]) == 2  # a model dir needs --output
    assert "--output is required" in capsys.readouterr().err


def test_save_last_every_and_default_packing_are_not_part_of_the_ppo_config_hash(tiny_model_dir, tmp_path):
    """How often last/ is rewritten changes no result, so a killed run may be rerun with another value (and the
    default may change without orphaning runs); any PPO setting that does change results changes the hash."""
    from selfcorrect.config.run import load_run_config
    from selfcorrect.pipeline.plan import resolved_configs
    from selfcorrect.provenance import config_hash

    def ppo_hash(**ppo) -> str:
        cfg = tiny_config(tmp_path, tiny_model_dir, tmp_path / "out")
        cfg["ppo"].update(ppo)
        return config_hash(resolved_configs(load_run_config(write(tmp_path / "c.yaml", cfg)))["ppo"])

    assert ppo_hash(save_last_every=1) == ppo_hash(save_last_every=7) == ppo_hash()
    assert ppo_hash(kl_coef=0.5) != ppo_hash()
    # packing (on by default) keeps the hashes of configs written before it existed; turning it off changes the hash
    assert ppo_hash(packing=True) == ppo_hash() != ppo_hash(packing=False)
