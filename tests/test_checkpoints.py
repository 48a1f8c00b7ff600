"""Kept checkpoints and the resume state, on the tiny random Llama of conftest.py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfcorrect.errors import UserError
from selfcorrect.provenance import config_hash, library_versions
from selfcorrect.rundir import checkpoint_dir
from selfcorrect.train.checkpoints import (
    load_last,
    restore_rng,
    save_checkpoint,
    save_last,
    validate_save_at_steps,
)
from selfcorrect.train.weights import restore_weights

WHERE = "config.yaml: ppo.save_at_steps"


def manifest(**extra: object) -> dict:
    return {"episodes": 64, "tokens": 1234, "mean_reward": 0.5, "kl": 0.01, "config_hash": "abc", **extra}


@pytest.fixture()
def tiny(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


def _train_one_step(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    input_ids = torch.tensor([[1, 5, 9, 13, 2]])
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return optimizer, scheduler


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


# ---------------------------------------------------------------------------------------------------- schedule


def test_validate_save_at_steps_accepts_an_ascending_list() -> None:
    assert validate_save_at_steps([0, 50, 100, 1000], 1000, WHERE) == [0, 50, 100, 1000]
    assert validate_save_at_steps([], 10, WHERE) == []


@pytest.mark.parametrize(
    ("steps", "fragment"),
    [
        ([0, 100, 50], "step 50 comes after 100"),
        ([0, 50, 50], "step 50 is listed twice"),
        ([-1, 50], "step -1 is negative"),
        ([0, 1001], "step 1001 is beyond the last step of the run (1000)"),
        ([0, 2.5], "entry 1 is 2.5"),
    ],
)
def test_validate_save_at_steps_errors_name_the_field_and_value(steps: list, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        validate_save_at_steps(steps, 1000, WHERE)
    assert str(info.value).startswith(WHERE + ": ")
    assert fragment in str(info.value)


def test_checkpoint_dir_hash_and_versions(tmp_path: Path) -> None:
    assert checkpoint_dir(tmp_path, 50) == tmp_path / "checkpoints" / "step-000050"
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    digest = config_hash({"a": 1})
    assert len(digest) == 16 and int(digest, 16) >= 0
    versions = library_versions()
    assert set(versions) >= {"torch", "transformers", "trl", "peft", "accelerate", "selfcorrect"}
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]


# ---------------------------------------------------------------------------------------------------- kept checkpoints


def test_save_checkpoint_writes_safetensors_and_manifest_and_reloads_identically(tmp_path: Path, tiny) -> None:
    model, tokenizer = tiny
    path = save_checkpoint(tmp_path, 50, model, tokenizer, manifest(extra_field="kept"))
    assert path == tmp_path / "checkpoints" / "step-000050"
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin"))
    assert (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()
    written = json.loads((path / "manifest.json").read_text())
    assert written["step"] == 50 and written["episodes"] == 64 and written["tokens"] == 1234
    assert written["mean_reward"] == 0.5 and written["kl"] == 0.01 and written["config_hash"] == "abc"
    assert written["extra_field"] == "kept" and written["weights"] == "full" and written["created_at"]
    assert set(written["library_versions"]) >= {"torch", "transformers", "trl", "peft", "accelerate", "selfcorrect"}
    assert [p.name for p in path.parent.iterdir()] == ["step-000050"]  # no temporary directory left

    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    original, restored = model.state_dict(), reloaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    assert AutoTokenizer.from_pretrained(path)("Hello there").input_ids == tokenizer("Hello there").input_ids


def test_existing_checkpoint_is_never_overwritten(tmp_path: Path, tiny) -> None:
    model, tokenizer = tiny
    path = save_checkpoint(tmp_path, 0, model, tokenizer, manifest(mean_reward=None, kl=None))
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert save_checkpoint(tmp_path, 0, model, tokenizer, manifest(mean_reward=9.0)) == path
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before
    assert json.loads((path / "manifest.json").read_text())["mean_reward"] is None
    with pytest.raises(UserError, match="another configuration"):
        save_checkpoint(tmp_path, 0, model, tokenizer, manifest(config_hash="different"))
    with pytest.raises(ValueError, match="config_hash"):
        save_checkpoint(tmp_path, 1, model, tokenizer, {"episodes": 0, "tokens": 0, "mean_reward": 0, "kl": 0})


def test_save_checkpoint_of_a_lora_model_writes_the_adapter_and_its_base(
    tmp_path: Path, tiny_model_dir: Path, tiny
) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4))
    path = save_checkpoint(tmp_path, 10, lora, tokenizer, manifest())
    assert (path / "adapter_model.safetensors").is_file() and (path / "adapter_config.json").is_file()
    assert not (path / "model.safetensors").exists()
    written = json.loads((path / "manifest.json").read_text())
    assert written["weights"] == "adapter"
    assert written["base_model"] == str(tiny_model_dir)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    # Resume state of a LoRA policy: only the adapter is written, and it is restored in place.
    lora_params = {name: p for name, p in lora.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for parameter in lora_params.values():
            parameter.normal_()
    saved = {name: p.detach().clone() for name, p in lora_params.items()}
    save_last(tmp_path, {"step": 10}, lora, None, None, rng=False)
    assert (tmp_path / "last" / "model" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        for parameter in lora_params.values():
            parameter.zero_()
    restore_weights(lora, load_last(tmp_path)["model_dirs"]["model"])
    for name, parameter in lora_params.items():
        assert torch.equal(parameter, saved[name]), name


# ---------------------------------------------------------------------------------------------------- resume state


def test_save_last_load_last_round_trip(tmp_path: Path, tiny, tiny_model_dir: Path) -> None:
    model, _ = tiny
    optimizer, scheduler = _train_one_step(model)
    state = {
        "step": 7,
        "episodes": 448,
        "tokens": 9000,
        "data_position": {"epoch": 1, "index": 32},
        "kl_controller": {"kind": "adaptive", "value": 0.1, "target": 6.0, "horizon": 10000.0},
    }
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_last(tmp_path, state, model, optimizer, scheduler)
    expected_draws = _draws()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    # A fresh process would start from the initial model and fresh optimizer/scheduler objects.
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh_optimizer, lambda step: 1.0 / (1 + step))
    _draws()  # the RNG streams move on before the restore

    loaded = load_last(tmp_path)
    assert loaded is not None and loaded["path"] == tmp_path / "last"
    assert loaded["state"] == state
    restore_weights(fresh, loaded["model_dirs"]["model"])
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["scheduler"])
    restore_rng(loaded["rng"])

    assert _draws() == expected_draws
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name
    saved_opt, restored_opt = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved_opt["param_groups"] == restored_opt["param_groups"]
    assert saved_opt["state"].keys() == restored_opt["state"].keys()
    for index, entry in saved_opt["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, restored_opt["state"][index][key]), (index, key)
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()

    # A second save replaces last/ and leaves no temporary or old directory behind.
    save_last(tmp_path, {**state, "step": 8}, model, optimizer, scheduler, rng=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    again = load_last(tmp_path)
    assert again is not None and again["state"]["step"] == 8 and again["rng"] is None


def test_load_last_without_state_is_none(tmp_path: Path) -> None:
    assert load_last(tmp_path) is None
    assert load_last(tmp_path / "missing") is None


def test_crash_between_renames_still_loads_and_next_save_recovers(tmp_path: Path, tiny) -> None:
    model, _ = tiny
    optimizer, scheduler = _train_one_step(model)
    save_last(tmp_path, {"step": 3}, model, optimizer, scheduler)
    # Simulate a kill after "rename last -> last.old" and before "rename last.tmp-<pid> -> last",
    # with the new temporary directory half written.
    os.rename(tmp_path / "last", tmp_path / "last.old")
    (tmp_path / "last.tmp-99999").mkdir()
    (tmp_path / "last.tmp-99999" / "optimizer.pt").write_bytes(b"torn")

    loaded = load_last(tmp_path)
    assert loaded is not None and loaded["path"] == tmp_path / "last.old" and loaded["state"] == {"step": 3}
    assert loaded["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]

    save_last(tmp_path, {"step": 4}, model, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_last(tmp_path)["state"] == {"step": 4}


def test_save_last_with_named_models_and_bad_state(tmp_path: Path, tiny) -> None:
    model, _ = tiny
    value_head = torch.nn.Linear(4, 1)
    save_last(tmp_path, {"step": 0}, {"policy": model, "value_head": value_head}, None, None, rng=False)
    loaded = load_last(tmp_path)
    assert loaded is not None and set(loaded["model_dirs"]) == {"policy", "value_head"}
    assert loaded["optimizer"] is None and loaded["scheduler"] is None
    other_head = torch.nn.Linear(4, 1)
    restore_weights(other_head, loaded["model_dirs"]["value_head"])
    assert torch.equal(other_head.weight, value_head.weight) and torch.equal(other_head.bias, value_head.bias)

    with pytest.raises(TypeError):
        save_last(tmp_path, {"step": 1, "bad": object()}, model, None, None)
    with pytest.raises(ValueError, match="step"):
        save_last(tmp_path, {"episodes": 1}, model, None, None)
    assert load_last(tmp_path)["state"] == {"step": 0}  # the failed saves left last/ alone
