"""Mixed precision (selfcorrect.train.precision): no optimizer updates 16-bit weights without an fp32 master copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from selfcorrect.config.run import load_run_config
from selfcorrect.errors import UserError
from selfcorrect.recipes.ppo import build_trainer
from selfcorrect.train.precision import Precision, plan


def test_the_plan_of_each_launch():
    assert plan("float32", {}, "ppo.trainer", deepspeed=False) == Precision("float32")
    plain = plan("bfloat16", {}, "ppo.trainer", deepspeed=False, mixed_precision="no")
    assert plain.master_fp32 and plain.trainer_args == {"bf16": True}
    assert plan("float16", {"fp16": True}, "sft.trainer", deepspeed=False).trainer_args == {"fp16": True}
    zero = plan("bfloat16", {}, "ppo.trainer", deepspeed=True, mixed_precision="bf16")
    assert not zero.master_fp32 and zero.trainer_args == {"bf16": True}
    assert plan("bfloat16", {"bf16": True}, "ppo.trainer", deepspeed=True, mixed_precision="no").trainer_args
    refused = [
        (dict(dtype="bfloat16", trainer={"bf16": False}, deepspeed=False), "ppo.trainer.bf16: false with model.dtype"),
        (dict(dtype="bfloat16", trainer={}, deepspeed=True), "without bf16 mixed precision keeps no fp32 master"),
        (dict(dtype="bfloat16", trainer={"fp16": True}, deepspeed=False), "ppo.trainer.fp16: true with model.dtype"),
    ]
    for kwargs, needle in refused:
        with pytest.raises(UserError, match=needle) as error:
            plan(kwargs["dtype"], kwargs["trainer"], "ppo.trainer", deepspeed=kwargs["deepspeed"], mixed_precision="no")
        assert "\n" not in str(error.value)


def _config(tmp_path: Path, policy: Path, dtype: str, **ppo) -> Path:
    reward = "def length(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"
    (tmp_path / "prec_reward.py").write_text(reward)
    settings = {
        "prompts": {"path": str(Path(os.environ["SELFCORRECT_DATA_DIR"]) / "hh-rlhf/harmless-base-test.jsonl.gz"),
                    "format": "hh", "limit": 40},
        "policy": str(policy), "reward_model": "prec_reward:length", "steps": 1, "save_at_steps": [],
        "rollout_batch_size": 4, "mini_batch_size": 4, "max_new_tokens": 6, "max_prompt_length": 64,
        "learning_rate": 5e-6, **ppo,
    }  # fmt: skip
    path = tmp_path / f"{dtype}.yaml"
    config = {"name": dtype, "output_dir": str(tmp_path / dtype), "seed": 0, "model": {"dtype": dtype}, "ppo": settings}
    path.write_text(yaml.safe_dump(config))
    return path


def _one_step(config: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], object]:
    """The policy's trained weights before and after one RLHF step (one optimizer step) of the config's run."""
    trainer = build_trainer(load_run_config(config), config)
    policy = trainer.model.policy
    before = {n: p.detach().float().clone() for n, p in policy.named_parameters()}
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    after = {n: p.detach().float().clone() for n, p in policy.named_parameters()}
    return before, after, trainer


def test_a_bf16_run_without_deepspeed_updates_fp32_master_weights_as_the_fp32_run_does(peaked_policy_dir, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    """One optimizer step at lr 5e-6 (Adam's first step moves every weight with a gradient by about the learning
    rate): with model.dtype bfloat16 the policy is held in fp32 under bf16 autocast, so it moves as the float32 run
    does; bf16 weights themselves would keep almost none of it (a step of 5e-6 is below bf16's resolution)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    reference_before, reference_after, _ = _one_step(_config(tmp_path, peaked_policy_dir, "float32"))
    before, after, trainer = _one_step(_config(tmp_path, peaked_policy_dir, "bfloat16"))
    assert trainer.args.bf16 and all(p.dtype == torch.float32 for p in trainer.model.policy.parameters())
    assert trainer.manifest_extra["precision"] == "fp32 master weights, bf16 autocast (bfloat16 frozen weights)"

    def moved(a: dict, b: dict) -> tuple[float, float]:
        deltas = torch.cat([(b[n] - a[n]).abs().flatten() for n in a])
        return float((deltas > 0).float().mean()), float(deltas[deltas > 0].median())

    share, size = moved(before, after)
    reference_share, reference_size = moved(reference_before, reference_after)
    assert reference_share > 0.5 and share > 0.9 * reference_share
    assert 0.5 * reference_size < size < 2 * reference_size
    rounded = {n: after[n].bfloat16().float() for n in after}  # what bf16 weights could have kept of the step
    assert moved(before, rounded)[0] < 0.1 * share


def test_a_bf16_config_that_turns_autocast_off_is_refused_at_the_dry_run(peaked_policy_dir, tmp_path, capsys):
    from selfcorrect.cli import main

    config = _config(tmp_path, peaked_policy_dir, "bfloat16", trainer={"bf16": False})
    assert main(["pipeline", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ppo.trainer.bf16: false with model.dtype bfloat16" in err[0], err
