"""Tests for selfcorrect.train.sft: real TRL SFTTrainer runs on the tiny Llama and real HH records."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from selfcorrect.config import DatasetSpec, LoraSection, ModelSection, load_config
from selfcorrect.config.sft import SFTSection
from selfcorrect.data import sft_dataset
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError
from selfcorrect.models import load_model
from selfcorrect.train.sft import (
    build_sft_trainer,
    n_ptx_rows,
    run_sft,
    tokenize_demonstrations,
)

FAST = {"per_device_train_batch_size": 4, "gradient_checkpointing": False, "dataloader_num_workers": 0}


@pytest.fixture(scope="module")
def hh_path() -> str:
    path = Path(os.environ.get("SELFCORRECT_DATA_DIR", "")) / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.is_file():
        pytest.fail(f"{path} not found: set SELFCORRECT_DATA_DIR to the shared data directory")
    return str(path)


def section(hh_path: str, limit: int = 16, max_length: int = 128, **trainer) -> SFTSection:
    return SFTSection(
        data=DatasetSpec(path=hh_path, format="hh", limit=limit), max_length=max_length, trainer={**FAST, **trainer}
    )


def demo_loss(model: torch.nn.Module, tokenizer, data: DatasetSpec, max_length: int) -> float:
    """Mean loss on the final replies of the demonstrations (prompt tokens masked), as SFT trains it."""
    losses = []
    for row in tokenize_demonstrations(sft_dataset(data, seed=0), tokenizer):
        input_ids = torch.tensor([row["input_ids"][:max_length]])
        trained = torch.tensor([row["completion_mask"][:max_length]]).bool()
        if trained.any():
            with torch.no_grad():
                losses.append(model(input_ids=input_ids, labels=input_ids.masked_fill(~trained, -100)).loss.item())
    return sum(losses) / len(losses)


def test_full_finetuning_lowers_the_loss_and_writes_model_and_manifest(tiny_model_dir, hh_path, tmp_path):
    sft = section(hh_path, learning_rate=1e-3, num_train_epochs=2)
    out = run_sft(sft, ModelSection(name_or_path=str(tiny_model_dir)), None, tmp_path / "sft", seed=0)

    base, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    trained, _ = load_model(str(out), device="cpu")
    before, after = demo_loss(base, tokenizer, sft.data, 128), demo_loss(trained, tokenizer, sft.data, 128)
    assert after < before - 0.05, (before, after)

    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)  # weights only as safetensors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # the temporary directory is gone

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "sft" and manifest["finetuning"] == "full"
    assert manifest["base_model"] == str(tiny_model_dir.resolve())
    assert manifest["seed"] == 0 and manifest["n_demonstrations"] == 16 and manifest["n_ptx"] == 0
    assert 0 < manifest["n_train"] <= 16  # demonstrations whose prompt fills max_length are dropped by TRL
    assert manifest["steps"] == 2 * math.ceil(manifest["n_train"] / 4)
    assert math.isfinite(manifest["final_train_loss"]) and manifest["final_train_loss"] < 11
    assert {"torch", "transformers", "trl", "peft", "datasets"} <= set(manifest["library_versions"])
    assert manifest["training_args"]["lr_scheduler_type"] == "cosine_with_min_lr"
    assert manifest["config"]["sft"]["trainer"]["learning_rate"] == 1e-3


def test_lora_adapter_reloads_from_its_original_base_reference(tiny_model_dir, hh_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)  # a relative model reference must still reload from elsewhere
    relative_ref = f"./{tiny_model_dir.name}"
    sft = section(hh_path, limit=8, learning_rate=1e-2, num_train_epochs=1, gradient_checkpointing=True)
    lora = LoraSection(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    out = run_sft(sft, ModelSection(name_or_path=relative_ref), lora, tmp_path / "sft", seed=0)
    monkeypatch.chdir(tmp_path)

    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "manifest.json"} <= files
    assert "model.safetensors" not in files
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert json.loads((out / "manifest.json").read_text())["finetuning"] == "lora"

    adapted, _ = load_model(str(out), device="cpu", merge_lora=False)
    assert isinstance(adapted, PeftModel)
    base, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    input_ids = tokenizer("\n\nHuman: How do I pick a lock?\n\nAssistant:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        difference = (adapted(input_ids=input_ids).logits - base(input_ids=input_ids).logits).abs().max().item()
    assert difference > 1e-4


@pytest.mark.parametrize("dialogue", ["human_assistant", "chat_template"])
def test_ptx_rows_train_on_every_token_and_demonstration_prompts_are_masked(
    dialogue, tiny_model_dir, hh_path, tmp_path
):  # noqa: E501
    sft = SFTSection(
        data=DatasetSpec(path=hh_path, format="hh", limit=16),
        ptx_data=DatasetSpec(path=hh_path, format="hh"),
        ptx_fraction=0.5,
        max_length=4096,  # long enough that TRL drops no row, so the counts are exact
        trainer=FAST,
    )
    model = ModelSection(name_or_path=str(tiny_model_dir))
    spec = DialogueSpec(format=dialogue)
    trainer, counts = build_sft_trainer(sft, model, None, tmp_path, seed=0, dialogue=spec)
    assert counts == {"n_demonstrations": 16, "n_ptx": 16, "n_eval": 0, "n_train": 32}
    tokenizer = trainer.processing_class
    ptx_rows, demo_rows = [], []
    for row in trainer.train_dataset:
        labels, input_ids = row["labels"], row["input_ids"]
        (ptx_rows if -100 not in labels else demo_rows).append(row)
        assert [label for label in labels if label != -100] == [t for t, la in zip(input_ids, labels) if la != -100]
    assert len(ptx_rows) == 16 and len(demo_rows) == 16

    for row in ptx_rows:  # the raw HH transcript with EOS appended: plain LM loss on every token
        text = tokenizer.decode(row["input_ids"])
        assert text.startswith("\n\nHuman:") and text.endswith(tokenizer.eos_token)
        assert row["labels"] == row["input_ids"]
    for row in demo_rows:  # in the run's dialogue format; the loss only on the final reply and its end-of-turn
        n_masked = row["labels"].index(next(label for label in row["labels"] if label != -100))
        assert all(label == -100 for label in row["labels"][:n_masked])
        assert all(label != -100 for label in row["labels"][n_masked:])
        prompt = tokenizer.decode(row["input_ids"][:n_masked])
        reply = tokenizer.decode(row["input_ids"][n_masked:])
        assert row["input_ids"][-1] == tokenizer.eos_token_id
        if dialogue == "chat_template":
            assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
            assert "<|im_start|>user" in prompt
            assert reply.endswith("<|im_end|>") and "<|im_start|>" not in reply
        else:  # the HH text: the prompt ends with the opened turn, the reply follows after one space
            assert prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:")
            assert "<|im_start|>" not in prompt + reply
            assert reply.startswith(" ") and reply.endswith(tokenizer.eos_token)


def test_n_ptx_rows_makes_ptx_the_requested_share():
    assert n_ptx_rows(0.1, 900) == 100 and n_ptx_rows(0.5, 16) == 16 and n_ptx_rows(0.0, 16) == 0
    assert n_ptx_rows(0.2, 16) == 4  # 4 / (16 + 4) = 20%


def test_trainer_keys_are_checked_against_sft_config(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text("data: {path: d.jsonl, format: hh}\ntrainer: {learning_rte: 0.1}\n")
    with pytest.raises(UserError, match=f"^{config}: trainer: learning_rte: unknown SFTConfig field$"):
        load_config(config, SFTSection)
    config.write_text("data: {path: d.jsonl, format: hh}\ntrainer: {num_train_epochs: many}\n")
    with pytest.raises(UserError, match=f"^{config}: trainer: num_train_epochs: Input should be a valid number"):
        load_config(config, SFTSection)
    config.write_text("data: {path: d.jsonl, format: hh}\ntrainer: {learning_rate: 1e-5}\n")  # a string in YAML
    assert load_config(config, SFTSection).trainer == {"learning_rate": 1e-5}
    config.write_text("data: {path: d.jsonl, format: hh}\nptx_fraction: 0.1\n")
    with pytest.raises(UserError, match="ptx_fraction: ptx_fraction > 0 needs ptx_data"):
        load_config(config, SFTSection)


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_checkpointing_is_set_under_either_transformers_name(hh_path, tmp_path, name, value):
    """transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (5.19 knows only the old name):
    either name switches it in the SFTConfig built on the installed version, with no deprecation warning; unset, it
    is on, as TRL's default."""
    import warnings

    from selfcorrect.train import compat
    from selfcorrect.train.sft import sft_config

    data = DatasetSpec(path=hh_path, format="hh")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = sft_config(SFTSection(data=data, trainer={name: value}), tmp_path, seed=0)
    assert compat.checkpointing_args(config)[0] is value
    assert [str(w.message) for w in caught if "checkpointing" in str(w.message)] == []
    assert compat.checkpointing_args(sft_config(SFTSection(data=data), tmp_path, seed=0))[0] is True


def test_bad_trainer_value_is_a_user_error_before_loading_anything(tmp_path, hh_path):
    sft = section(hh_path, lr_scheduler_type="cosin")
    with pytest.raises(UserError, match="^sft.trainer: cosin is not a valid SchedulerType"):
        run_sft(sft, ModelSection(name_or_path=str(tmp_path / "no-model")), None, tmp_path / "sft", seed=0)
    assert list(tmp_path.iterdir()) == []


def test_nan_loss_is_an_error_and_leaves_no_output(tiny_model_dir, hh_path, tmp_path):
    sft = section(hh_path, limit=8, learning_rate=1e30, max_steps=3, per_device_train_batch_size=2)
    with pytest.raises(UserError, match=r"^sft: loss became nan at step \d+$"):
        run_sft(sft, ModelSection(name_or_path=str(tiny_model_dir)), None, tmp_path / "sft", seed=0)
    assert list(tmp_path.iterdir()) == []

    earlier = tmp_path / "earlier"  # an earlier SFT output would be replaced by a run that succeeds, not this one
    earlier.mkdir()
    (earlier / "manifest.json").write_text('{"stage": "sft"}')
    with pytest.raises(UserError, match="loss became nan"):
        run_sft(sft, ModelSection(name_or_path=str(tiny_model_dir)), None, earlier, seed=0)
    assert list(tmp_path.iterdir()) == [earlier] and [p.name for p in earlier.iterdir()] == ["manifest.json"]


def test_an_existing_directory_that_is_not_an_sft_output_is_not_touched(tmp_path, hh_path):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an SFT output"):
        run_sft(section(hh_path), ModelSection(name_or_path="unused"), None, out, seed=0)
    assert (out / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1
