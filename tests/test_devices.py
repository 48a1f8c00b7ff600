"""Right on CUDA by construction, checked where it runs: the rollout's tensors on the accelerator's device, where each
stage runs (the evaluation never shares a training GPU). The vLLM section's way to the engine: tests/test_vllm.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_ppo_trainer

from selfcorrect.config.run import load_run_config
from selfcorrect.errors import UserError
from selfcorrect.memory import Launch
from selfcorrect.pipeline.placement import evaluation_launcher, placement
from selfcorrect.reward_models.score import RewardModel


def test_every_rollout_tensor_and_model_is_on_the_accelerators_device(peaked_policy_dir, tmp_path):
    """Tensors that meet a collective (the eos rate, the score), a model output or a metric gather are made on
    ``accelerator.device`` (on CUDA, a CPU tensor in an NCCL gather raises); so is every model of the process."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = AutoModelForSequenceClassification.from_pretrained(peaked_policy_dir, num_labels=1)
    reward = RewardModel(classifier, AutoTokenizer.from_pretrained(peaked_policy_dir))
    trainer = make_ppo_trainer(peaked_policy_dir, tmp_path / "run", reward, rollout_batch_size=4, mini_batch_size=4)
    device = trainer.accelerator.device
    roll = trainer.rollout(trainer.step_prompts(0))
    trainer.score(roll)
    trainer.advantages(roll)
    tensors = {f.name: getattr(roll, f.name) for f in dataclasses.fields(roll)}
    tensors = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    assert {"input_ids", "has_eos", "score", "logprobs", "ref_logprobs", "values", "advantages"} <= tensors.keys()
    assert {name: t.device for name, t in tensors.items()} == dict.fromkeys(tensors, device)
    assert trainer.rollout_stats(roll)["eos_rate"] >= 0
    models = {"policy": trainer.model.policy, "value": trainer.model.value_model, "reference": trainer.ref_policy,
              "reward": reward.model}  # fmt: skip
    assert {name: next(m.parameters()).device for name, m in models.items()} == dict.fromkeys(models, device)


def _run_config(tmp_path: Path, **evaluation) -> object:
    cfg = {
        "name": "where",
        "output_dir": str(tmp_path / "run"),
        "reward": {"function": "m:f"},
        "ppo": {"prompts": {"path": "unused", "format": "hh"}, "steps": 1},
        "evaluation": {"benchmarks": ["winogender"], **evaluation},
    }
    path = tmp_path / "where.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_run_config(path)


def test_the_evaluation_never_shares_a_training_gpu(tmp_path):
    """On 8 GPUs: when: during with no device of its own waits until PPO ends; with cuda:7 it runs while PPO trains
    on the other seven, which are told so (cuda:7 hidden from them); eight PPO processes do not fit beside it."""
    waits = placement(_run_config(tmp_path, when="during"), Launch(8), gpus=8)
    assert not waits.during and waits.hidden is None
    assert "evaluate after PPO ends" in waits.lines[-2] and "never shares a training GPU" in waits.lines[-2]
    assert waits.evaluation == 8 and "8 processes under the launcher" in waits.lines[-1]
    beside = placement(_run_config(tmp_path, when="during", device="cuda:7"), Launch(7), gpus=8)
    assert beside.during and beside.hidden == 7
    assert beside.lines == ("where: ppo on cuda:0-7 (PPO without cuda:7) (7 process(es) each)",
                            "where: evaluate on cuda:7, while PPO trains on the other GPUs")  # fmt: skip
    with pytest.raises(UserError, match="PPO's 8 processes need 8 of the other 7 GPUs"):
        placement(_run_config(tmp_path, when="during", device="cuda:7"), Launch(8), gpus=8)
    on_cpu = placement(_run_config(tmp_path, when="during"), Launch(1), gpus=0)
    assert on_cpu.during and on_cpu.lines[-1] == "where: evaluate on cpu, while PPO trains (sharing the CPU's cores)"
    after = placement(_run_config(tmp_path, when="after"), Launch(8), gpus=8)
    assert not after.during and after.evaluation == 8
    assert after.lines[-1] == ("where: evaluate on cuda:0-7 after training: 8 processes under the launcher, each "
                               "checkpoint's items shared out over them")  # fmt: skip


def test_the_evaluation_after_training_runs_on_the_launchers_processes(tmp_path):
    """After training the evaluation takes every process the launcher starts (each its own GPU), or as many as
    evaluation.num_processes asks, told to the launcher; one asked for, or one device named, is the pipeline's own
    process. More than the launcher starts, a device with several processes, several beside PPO, or a part of a
    launcher over several nodes is a one-line error."""
    two_nodes = Launch(16, 2, "bf16", machines=2)
    spread = placement(_run_config(tmp_path, when="after"), two_nodes, gpus=8)
    assert spread.evaluation == 16 and spread.lines[0] == "where: ppo on 2 nodes x cuda:0-7 (16 process(es) each)"
    assert spread.lines[-1].startswith("where: evaluate on 2 nodes x cuda:0-7 after training: 16 processes")
    assert placement(_run_config(tmp_path, num_processes=1), two_nodes, gpus=8).evaluation == 1
    pinned = placement(_run_config(tmp_path, device="cuda:3"), Launch(8), gpus=8)
    assert pinned.evaluation == 1
    assert pinned.lines[-1] == "where: evaluate on cuda:3, after training (in the pipeline's process)"
    assert placement(_run_config(tmp_path, num_processes=4), Launch(8), gpus=8).evaluation == 4
    for asked, launch, message in [
        ({"num_processes": 4}, Launch(2), "evaluation.num_processes 4: the launcher starts 2 process"),
        ({"num_processes": 8}, two_nodes, "a launcher over 2 nodes evaluates on all its 16 processes"),
        ({"num_processes": 2, "device": "cuda:1"}, Launch(2), "cuda:1: with evaluation.num_processes 2 each"),
        ({"num_processes": 2, "when": "during"}, Launch(1), "an evaluation while PPO trains runs in one process"),
    ]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            placement(_run_config(tmp_path, **asked), launch, gpus=0 if "when" in asked else 8)
    cpu = "accelerate launch --config_file accelerate/cpu_2proc.yaml"
    assert evaluation_launcher(cpu, Launch(2), 2) == cpu
    assert evaluation_launcher(cpu + " --num_processes=8", Launch(8), 4) == cpu + " --num_processes 4"
    assert evaluation_launcher("accelerate launch --num_processes 8 --cpu", Launch(8), 2) == (
        "accelerate launch --cpu --num_processes 2"
    )


def test_the_dry_run_says_where_each_stage_runs(tmp_path, capsys, monkeypatch):
    from selfcorrect.cli import main

    (tmp_path / "m.py").write_text("def f(prompts, responses):\n    return [0.0] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _run_config(tmp_path, when="during")
    assert main(["pipeline", str(tmp_path / "where.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    gpus = torch.cuda.device_count()
    expected = placement(load_run_config(tmp_path / "where.yaml"), Launch(1), gpus).lines
    assert "\n".join(expected) in out
    if not gpus:
        assert "where: ppo on the CPU (1 process(es) each)" in out
