"""PPO-ptx on a tiny random Llama: learning, ptx, checkpoint schedule, SIGKILL resume, bad configs."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import last_ppo_step, make_ppo_trainer, wait_until
from safetensors.torch import load_file
from transformers import AutoTokenizer

from selfcorrect.cli import main
from selfcorrect.config.run import load_run_config
from selfcorrect.recipes.ppo import build_trainer as build_ppo_trainer
from selfcorrect.train.ppo import PPOPtxTrainer

RULES = '''
def vowels(prompts, responses):
    """Share of vowels in the response text (a rule reward for tests)."""
    return [sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses]
'''
LORA = {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": "all-linear"}


def even_token_reward(tokenizer):
    """A rule reward with a known optimum: the share of a response's tokens with an even id (1 at best)."""

    def even_tokens(prompts, responses):
        ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
        return torch.tensor([sum(i % 2 == 0 for i in x) / max(1, len(x)) for x in ids])

    return even_tokens


def test_ppo_raises_a_rule_reward(peaked_policy_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(peaked_policy_dir)
    reward = even_token_reward(tok)
    history = make_ppo_trainer(peaked_policy_dir, tmp_path / "run", reward, steps=14, learning_rate=1e-3).train()
    rewards = [h["reward"] for h in history]
    assert len(history) == 14
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    for key in (
        "reward",
        "rlhf_reward",
        "kl",
        "kl_k3",
        "kl_coef",
        "policy/entropy",
        "policy/clipfrac",
        "policy/approx_kl",
        "value/clipfrac",
        "loss/policy",
        "loss/value",
        "loss/ptx",
        "response_length",
        "eos_rate",
        "episodes",
        "tokens",
        "time/rollout",
        "time/score",
        "time/update",
    ):
        assert key in history[-1], key
    assert history[-1]["episodes"] == 14 * 8 and history[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert all(h["kl_k3"] >= -1e-6 for h in history)


def test_ppo_with_lora_raises_a_rule_reward(peaked_policy_dir, tmp_path):
    """The same rule reward with LoRA adapters on the policy (r 8, all linear layers): within 14 RLHF steps the mean
    reward of the last 3 steps is 0.1 above that of the first 3 (of at most 1)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(peaked_policy_dir)
    policy = get_peft_model(LlamaForCausalLM.from_pretrained(peaked_policy_dir),
                            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))  # fmt: skip
    trainer = make_ppo_trainer(peaked_policy_dir, tmp_path / "run", even_token_reward(tok), policy=policy, steps=14,
                               learning_rate=1e-2)  # fmt: skip
    rewards = [h["reward"] for h in trainer.train()]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


def test_ptx_lowers_lm_loss_on_pretraining_data(peaked_policy_dir, tmp_path):
    def flat(prompts, responses):
        return torch.zeros(len(responses))

    def lm_loss(trainer: PPOPtxTrainer) -> float:
        policy = trainer.accelerator.unwrap_model(trainer.model).policy
        batch = trainer.tokenizer(trainer.ptx_texts, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        with torch.no_grad():
            return float(policy(**batch, labels=labels).loss)

    losses = {}
    for gamma in (0.0, 1.0):
        trainer = make_ppo_trainer(
            peaked_policy_dir,
            tmp_path / f"g{gamma}",
            flat,
            steps=4,
            gamma_ptx=gamma,
            ptx_batch_size=2,
            learning_rate=1e-3,
        )
        history = trainer.train()
        losses[gamma] = lm_loss(trainer)
        assert (history[-1]["loss/ptx"] > 0) == (gamma > 0)
    assert losses[1.0] < losses[0.0] - 0.5, losses


def write_config(tmp_path: Path, policy: Path, out: Path, lora: dict | None = None, **ppo) -> Path:
    """A PPO run config with the vowel-share rule reward (``rules_mod`` in ``tmp_path``); ``ppo`` overrides."""
    (tmp_path / "rules_mod.py").write_text(RULES)
    settings = {
        "prompts": {
            "path": str(Path(os.environ["SELFCORRECT_DATA_DIR"]) / "hh-rlhf/harmless-base-test.jsonl.gz"),
            "format": "hh",
            "limit": 40,  # about a third fit in max_prompt_length
        },
        "policy": str(policy),
        "reward_model": "rules_mod:vowels",
        "steps": 4,
        "save_at_steps": [0, 2, 4],
        "rollout_batch_size": 4,
        "mini_batch_size": 2,
        "max_new_tokens": 6,
        "max_prompt_length": 64,
        "learning_rate": 1e-3,
        "save_last_every": 1,  # the kill tests wait for last/ after a step
        **ppo,
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output_dir": str(out), "seed": 3, "lora": lora, "ppo": settings}))
    return path


def checkpoint_steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "ppo" / "checkpoints").iterdir())


def test_checkpoints_at_exactly_the_listed_steps(peaked_policy_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["ppo", str(write_config(tmp_path, peaked_policy_dir, out))]) == 0
    assert checkpoint_steps(out) == ["step-000000", "step-000002", "step-000004"]
    for step in (0, 2, 4):
        d = out / "ppo" / "checkpoints" / f"step-{step:06d}"
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["step"] == step and manifest["episodes"] == 4 * step
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
        assert set(manifest["library_versions"]) >= {"torch", "transformers", "trl"}
    assert json.loads((out / "ppo" / "last" / "state.json").read_text())["state"]["step"] == 4


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of the one safetensors file in ``directory`` (a full model or a LoRA adapter)."""
    (path,) = directory.glob("*.safetensors")
    return load_file(path)


@pytest.mark.parametrize(("lora", "ema"), [(None, None), (LORA, None), (None, 0.9)], ids=["full", "lora", "full-ema"])
def test_sigkill_and_rerun_gives_identical_checkpoints(peaked_policy_dir, tmp_path, monkeypatch, lora, ema):
    monkeypatch.syspath_prepend(str(tmp_path))
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    extra = {"lora": lora, "steps": 6, "save_at_steps": [0, 3, 6], "ema_decay": ema}
    cfg_killed = write_config(tmp_path, peaked_policy_dir, killed, **extra)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "selfcorrect", "ppo", str(cfg_killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    wait_until(proc, lambda: last_ppo_step(killed) >= 2, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["ppo", str(cfg_killed)]) == 0
    assert main(["ppo", str(write_config(tmp_path, peaked_policy_dir, clean, **extra))]) == 0
    assert checkpoint_steps(killed) == checkpoint_steps(clean) == ["step-000000", "step-000003", "step-000006"]
    kept = [Path("checkpoints") / step for step in ("step-000003", "step-000006")]
    for part in [*kept, Path("last") / "policy", Path("last") / "value"]:
        a, b = weights(killed / "ppo" / part), weights(clean / "ppo" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    if ema:  # the EMA, kept beside the raw weights in last/, resumes too
        a, b = (load_file(run / "ppo" / "last" / "tensors.safetensors") for run in (killed, clean))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kinds = json.loads((clean / "ppo" / "last" / "state.json").read_text())["models"]
    expected = "adapter" if lora else "full"
    assert kinds["policy"]["weights"] == kinds["value"]["weights"] == expected


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_trainable_parameters_and_optimizer_state(peaked_policy_dir, tmp_path, monkeypatch, lora):
    """The stage's trainer trains everything without ``lora``; with it, only the LoRA adapters of the policy and
    of the value model, plus the value model's scalar head: frozen weights get no gradient, no optimizer state,
    and stay as loaded."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write_config(tmp_path, peaked_policy_dir, tmp_path / "run", lora=lora, steps=1, save_at_steps=[0])
    trainer = build_ppo_trainer(load_run_config(path), path)
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps the torch optimizer
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(params[n]) for n in trainable}
    assert {id(p) for p in optimizer.state} == in_optimizer  # Adam state exactly for the trained parameters
    if lora is None:
        assert trainable == set(params) and not frozen_before
        return
    value_trainable = {n for n in trainable if n.startswith("value_model.")}
    head = {n for n in value_trainable if ".score.modules_to_save." in n}
    assert head and all("lora_" in n for n in value_trainable - head)
    assert all(n.startswith("policy.") and "lora_" in n for n in trainable - value_trainable)
    n_value = sum(p.numel() for n, p in params.items() if n.startswith("value_model."))
    assert sum(params[n].numel() for n in value_trainable) < 0.1 * n_value
    assert set(frozen_before) == set(params) - trainable
    for name, before in frozen_before.items():
        assert params[name].grad is None and torch.equal(params[name], before), name


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"save_at_steps": [2, 0]}, "ppo.save_at_steps"),
        ({"save_at_steps": [0, 9]}, "ppo.save_at_steps"),
        ({"gamma_ptx": 1.0}, "gamma_ptx > 0 needs ptx_data"),
        ({"kl_coeff": 0.1}, "ppo.kl_coeff: unknown key"),
        ({"steps": "many"}, "ppo.steps"),
        ({"trainer": {"warmup_steps": 80}}, "ppo.trainer: warmup_steps: use ppo.warmup_iterations"),
        ({"trainer": {"save_total_limit": 2}}, "ppo.trainer: save_total_limit: not used by the PPO trainer"),
        ({"trainer": {"adam_beta3": 0.9}}, "ppo.trainer: adam_beta3: unknown TrainingArguments field"),
        ({"warmup_iterations": 5}, "ppo.warmup_iterations: 5 warmup iterations is more than the run's 4"),
        ({"ema_decay": 1.0}, "ppo.ema_decay: Input should be less than 1"),
        ({"ema_decay": 0}, "ppo.ema_decay: Input should be greater than 0"),
        ({"value_learning_rate": 0}, "ppo.value_learning_rate: Input should be greater than 0"),
        ({"trainer": {"bf16": "maybe"}}, "ppo.trainer"),
        ({"logits_chunk_size": 0}, "ppo.logits_chunk_size: Input should be greater than 0"),
        ({"logits_chunk_size": 1.5}, "ppo.logits_chunk_size: Input should be a valid integer"),
        ({"logits_chunk_size": "512"}, "ppo.logits_chunk_size: Input should be a valid integer"),
    ],
)
def test_bad_ppo_config(peaked_policy_dir, tmp_path, capsys, monkeypatch, change, needle):
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    path = write_config(tmp_path, peaked_policy_dir, out, **change)
    assert main(["ppo", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "ppo" / "checkpoints").exists()


# ---- the same short run under `accelerate launch`: DDP and DeepSpeed ZeRO-2/3, 2 CPU processes each ------------

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
# A small logits chunk, so every pass runs the LM head over several chunks (each recomputed in the backward pass).
LAUNCHED = {"steps": 4, "save_at_steps": [0, 2, 4], "logits_chunk_size": 4}
LAUNCHED_STEPS = ["step-000000", "step-000002", "step-000004"]
requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed extra (pip install -e .[deepspeed])"
)

COUNT_GATHERS = '''
"""Run `python -m selfcorrect ARGS`, counting the all-gathers (ZeRO-3 weight fetches) made inside `generate`."""
import json, os, sys
import torch.distributed as dist
from transformers import GenerationMixin

counts = {"generate_calls": 0, "all_gathers": 0, "all_gathers_in_generate": 0}
inside = [False]
for name in ("all_gather_into_tensor", "_all_gather_base", "all_gather"):
    def counting(*args, _orig=getattr(dist, name), **kwargs):
        counts["all_gathers"] += 1
        counts["all_gathers_in_generate"] += inside[0]
        return _orig(*args, **kwargs)
    setattr(dist, name, counting)
generate = GenerationMixin.generate
def counting_generate(self, *args, **kwargs):
    counts["generate_calls"] += 1
    inside[0] = True
    try:
        return generate(self, *args, **kwargs)
    finally:
        inside[0] = False
GenerationMixin.generate = counting_generate
from selfcorrect.cli import main
code = main(sys.argv[1:])
with open(os.path.join(os.environ["COUNTS_DIR"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(counts, f)
sys.exit(code)
'''


def launch_command(accelerate_config: str, config: Path, module: str = "selfcorrect") -> list[str]:
    """`accelerate launch --config_file configs/accelerate/<accelerate_config> -m <module> ppo CONFIG`."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    return [*accelerate, "--config_file", str(ACCELERATE_CONFIGS / accelerate_config), "-m", module, "ppo", str(config)]


def launch_env(module_dir: Path, **extra: str) -> dict[str, str]:
    """This environment, with ``module_dir`` (the rule reward) on the path and only ``extra``'s accelerate flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    return {**env, "PYTHONPATH": f"{module_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def launch(accelerate_config: str, config: Path, module: str = "selfcorrect", **env: str) -> None:
    """Run the launch to the end (up to 10 minutes: DeepSpeed compiles a small op the first time) and check it."""
    proc = subprocess.run(
        launch_command(accelerate_config, config, module),
        env=launch_env(config.parent, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    (config.parent / f"{config.stem}.stderr").write_text(proc.stderr)  # the whole log, for a failed launch
    assert proc.returncode == 0, proc.stderr[-3000:]


def checkpoint_weights(out: Path, step: str) -> dict[str, torch.Tensor]:
    return weights(out / "ppo" / "checkpoints" / step)


def manifest(out: Path, step: str) -> dict:
    return json.loads((out / "ppo" / "checkpoints" / step / "manifest.json").read_text())


@pytest.fixture(scope="module")
def launch_dir(peaked_policy_dir, tmp_path_factory) -> Path:
    """A directory for the launched runs' configs and outputs (the rule reward module lives there too)."""
    return tmp_path_factory.mktemp("launched")


@pytest.fixture(scope="module")
def ddp_run(peaked_policy_dir, launch_dir) -> Path:
    """The short run under `accelerate launch` with 2 CPU processes, DDP over gloo (the reference)."""
    out = launch_dir / "ddp"
    launch("cpu_2proc.yaml", write_config(launch_dir, peaked_policy_dir, out, **LAUNCHED), ACCELERATE_USE_CPU="true")
    return out


@pytest.fixture(scope="module")
def zero2_run(peaked_policy_dir, launch_dir) -> Path:
    """The same run under DeepSpeed ZeRO-2 with 2 CPU processes."""
    out = launch_dir / "zero2"
    launch("deepspeed_zero2_cpu.yaml", write_config(launch_dir, peaked_policy_dir, out, **LAUNCHED))
    return out


def assert_same_run(out: Path, reference: Path, atol: float) -> None:
    """Same checkpoint schedule, same sampled episodes (rewards, KL) and weights equal up to ``atol``."""
    assert checkpoint_steps(out) == checkpoint_steps(reference) == LAUNCHED_STEPS
    for step in LAUNCHED_STEPS:
        got, want = manifest(out, step), manifest(reference, step)
        assert got["step"] == want["step"] and got["episodes"] == want["episodes"] == 4 * got["step"]
        assert got["num_processes"] == 2
        for key in ("mean_reward", "kl"):
            assert got[key] == pytest.approx(want[key], abs=1e-4), (step, key)
        a, b = checkpoint_weights(out, step), checkpoint_weights(reference, step)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), step
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= atol, step


def test_two_cpu_processes_under_accelerate_launch(ddp_run):
    """The short run under `accelerate launch` with 2 CPU processes (DDP over gloo) keeps the schedule."""
    assert checkpoint_steps(ddp_run) == LAUNCHED_STEPS
    last = manifest(ddp_run, "step-000004")
    assert last["num_processes"] == 2 and last["distributed"] == "multi_cpu"
    assert last["episodes"] == 16  # 4 prompts per RLHF step, 2 per process


@requires_deepspeed
def test_deepspeed_zero2_on_two_cpu_processes(zero2_run, ddp_run):
    """A real ZeRO-2 engine over 2 CPU processes: each holds half the optimizer state, and the run is the DDP run."""
    for step in LAUNCHED_STEPS:
        assert manifest(zero2_run, step)["distributed"] == "deepspeed-zero2"
    engine = zero2_run / "ppo" / "last-deepspeed"
    assert sorted(p.name for p in engine.iterdir() if p.is_dir()) == ["step-000004"]
    shards = sorted(p.name for p in (engine / "step-000004").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = json.loads((zero2_run / "ppo" / "last" / "state.json").read_text())["state"]
    assert state["step"] == 4 and state["deepspeed_tag"] == "step-000004" and state["num_processes"] == 2
    assert_same_run(zero2_run, ddp_run, atol=1e-4)  # DDP and ZeRO sum the gradients in another order


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_the_rerun_matches(
    peaked_policy_dir, launch_dir, ddp_run
):
    """SIGTERM to rank 1 only (of 2 DDP processes over gloo): the flag is summed over the processes, so both save
    ``last/`` at the same step and stop with exit code 75 (the launcher's own exit code is non-zero); the same
    command again finishes the run with the checkpoints of the uninterrupted one."""
    import psutil

    out = launch_dir / "ddp-stopped"
    config = write_config(launch_dir, peaked_policy_dir, out, **LAUNCHED)
    env = launch_env(launch_dir, ACCELERATE_USE_CPU="true")
    proc = subprocess.Popen(launch_command("cpu_2proc.yaml", config), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_until(proc, lambda: last_ppo_step(out) >= 1)
    ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children(recursive=True)}
    ranks["1"].send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stopped_at = last_ppo_step(out)
    assert 1 <= stopped_at < 4, "the run finished before the signal"
    assert "selfcorrect: stopped: SIGTERM received" in err and f"holds RLHF step {stopped_at} of 4" in err, err
    launch("cpu_2proc.yaml", config, ACCELERATE_USE_CPU="true")
    for step in LAUNCHED_STEPS[1:]:
        a, b = checkpoint_weights(out, step), checkpoint_weights(ddp_run, step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


@requires_deepspeed
def test_deepspeed_zero2_kill_and_rerun_gives_identical_checkpoints(peaked_policy_dir, launch_dir, zero2_run):
    """All processes of a ZeRO-2 run killed after step 1; the same command again resumes from the DeepSpeed
    checkpoint (each process's optimizer shard) and writes bit-identical checkpoints."""
    import psutil

    out = launch_dir / "zero2-killed"
    config = write_config(launch_dir, peaked_policy_dir, out, **LAUNCHED)
    proc = subprocess.Popen(
        launch_command("deepspeed_zero2_cpu.yaml", config),
        env=launch_env(launch_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(proc, lambda: last_ppo_step(out) >= 1)
    workers = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts them in sessions of their own
    for process in [*workers, psutil.Process(proc.pid)]:
        process.kill()
    proc.wait()
    psutil.wait_procs(workers, timeout=30)
    assert last_ppo_step(out) < 4, "the run finished before it was killed"
    launch("deepspeed_zero2_cpu.yaml", config)
    assert checkpoint_steps(out) == LAUNCHED_STEPS
    for step in LAUNCHED_STEPS[1:]:
        a, b = checkpoint_weights(out, step), checkpoint_weights(zero2_run, step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step


@requires_deepspeed
def test_deepspeed_state_does_not_resume_without_deepspeed(zero2_run, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(zero2_run.parent))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert main(["ppo", str(zero2_run.parent / "zero2.yaml")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the models' loading bars
    assert error.startswith("selfcorrect: error:") and "made with DeepSpeed, resumed without" in error, error


def test_deepspeed_with_accelerate_use_cpu_is_refused(peaked_policy_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    out = tmp_path / "run"
    assert main(["ppo", str(write_config(tmp_path, peaked_policy_dir, out))]) == 2
    err = capsys.readouterr().err
    assert "ACCELERATE_USE_CPU=true makes accelerate drop DeepSpeed" in err and len(err.strip().splitlines()) == 1
    assert not (out / "ppo").exists()


@requires_deepspeed
def test_deepspeed_zero3_on_two_cpu_processes(peaked_policy_dir, launch_dir, ddp_run):
    """ZeRO-3 splits the weights too: generation gathers them once per rollout (no weight fetch inside
    `generate`, i.e. none per token) and kept checkpoints hold the whole gathered weights of the DDP run."""
    out = launch_dir / "zero3"
    counts = launch_dir / "zero3-counts"
    counts.mkdir()
    (launch_dir / "count_gathers.py").write_text(COUNT_GATHERS)
    config = write_config(launch_dir, peaked_policy_dir, out, **LAUNCHED)
    launch("deepspeed_zero3_cpu.yaml", config, module="count_gathers", COUNTS_DIR=str(counts))
    for step in LAUNCHED_STEPS:
        assert manifest(out, step)["distributed"] == "deepspeed-zero3"
    assert_same_run(out, ddp_run, atol=1e-4)
    for rank in (0, 1):
        seen = json.loads((counts / f"rank{rank}.json").read_text())
        assert seen["generate_calls"] == 4 and seen["all_gathers"] > 0, seen
        assert seen["all_gathers_in_generate"] == 0, seen


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))
)
def test_accelerate_configs_are_valid(name):
    """Every shipped accelerate config loads with accelerate's own config reader."""
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(Path(__file__).resolve().parents[1] / "configs" / "accelerate" / name)
    assert cfg.num_processes >= 1
