"""W&B offline runs of SFT, reward model and PPO: the test reads the run files back."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from selfcorrect.cli import main
from selfcorrect.tracking import read_offline_run

WANDB_KEYS = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_DIR", "WANDB_API_KEY")


def test_wandb_offline_runs_hold_the_logged_metrics(tiny_model_dir, tmp_path, monkeypatch):
    for key in WANDB_KEYS:  # isolate: report_to sets these for the stage it runs
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_SILENT", "true")
    hh = str(Path(os.environ["SELFCORRECT_DATA_DIR"]) / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    out = tmp_path / "run"
    cfg = {
        "name": "wandbtest",
        "output_dir": str(out),
        "model": {"name_or_path": str(tiny_model_dir)},
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
            "steps": 2,
            "save_at_steps": [0, 2],
            "rollout_batch_size": 4,
            "mini_batch_size": 2,
            "max_new_tokens": 4,
            "max_prompt_length": 64,
        },
        "tracking": {"backend": "wandb", "project": "selfcorrect-test", "mode": "offline"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for stage in ("sft", "reward", "ppo"):
        assert main([stage, str(path)]) == 0

    runs = {r["name"]: r for r in (read_offline_run(d) for d in sorted((out / "wandb").glob("offline-run-*")))}
    assert set(runs) == {"wandbtest-sft", "wandbtest-reward", "wandbtest-ppo"}
    assert {r["group"] for r in runs.values()} == {"wandbtest"}
    logged = {name: set().union(*(row.keys() for row in r["history"])) for name, r in runs.items()}
    assert "train/loss" in logged["wandbtest-sft"]
    assert "train/loss" in logged["wandbtest-reward"] and "train/accuracy" in logged["wandbtest-reward"]
    ppo_keys = {
        "train/reward",
        "train/rlhf_reward",
        "train/kl",
        "train/kl_k3",
        "train/kl_coef",
        "train/policy/entropy",
        "train/policy/clipfrac",
        "train/policy/approx_kl",
        "train/value/clipfrac",
        "train/loss/policy",
        "train/loss/value",
        "train/loss/ptx",
        "train/response_length",
        "train/eos_rate",
        "train/episodes",
        "train/tokens",
    }
    assert ppo_keys <= logged["wandbtest-ppo"], ppo_keys - logged["wandbtest-ppo"]
    steps = [row["train/episodes"] for row in runs["wandbtest-ppo"]["history"] if "train/episodes" in row]
    assert steps == [4, 8]
