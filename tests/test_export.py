"""`selfcorrect export`: a kept LoRA checkpoint (an adapter on the SFT adapter on the base) as plain full weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_ppo_trainer
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from selfcorrect import dialogue as dialogues
from selfcorrect.cli import main
from selfcorrect.models import load_model

IDS = torch.tensor([[1, 5, 9, 200, 17, 3000, 42]])


def adapter(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # random (not identity) LoRA weights, so every adapter of the chain matters
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


@pytest.fixture
def chained_checkpoint(tiny_model_dir, tmp_path) -> Path:
    """A PPO-style checkpoint: an adapter whose base is an SFT adapter directory on the tiny base model."""
    sft = tmp_path / "sft"
    adapter(LlamaForCausalLM.from_pretrained(tiny_model_dir), seed=1).save_pretrained(sft)
    merged_sft, tokenizer = load_model(str(sft), device="cpu")
    ppo = adapter(merged_sft, seed=2)
    ppo.peft_config["default"].base_model_name_or_path = str(sft)
    ckpt = tmp_path / "step-000004"
    ppo.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({"step": 4, "dialogue": {"format": "chat_template"}}))
    return ckpt


def test_export_merges_the_whole_adapter_chain(chained_checkpoint, tiny_model_dir, tmp_path):
    model, _ = load_model(str(chained_checkpoint), device="cpu")
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
        # What a user gets loading the checkpoint with plain PEFT on the base: the SFT adapter is silently missing.
        naive = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny_model_dir), chained_checkpoint)
        assert (naive(input_ids=IDS).logits - ours).abs().max() > 1e-3

    out = tmp_path / "export"
    assert main(["export", str(chained_checkpoint), str(out)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=IDS).logits, ours, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["weights"] == "full"
    assert manifest["exported_from"] == str(chained_checkpoint.resolve())
    assert dialogues.recorded(out).format == "chat_template"  # selfcorrect evaluate OUT keeps the trained format
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_export_into_an_existing_directory_is_refused(chained_checkpoint, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(chained_checkpoint), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_ppo_keeps_merged_weights_beside_each_kept_adapter(tiny_model_dir, tmp_path):
    policy = adapter(LlamaForCausalLM.from_pretrained(tiny_model_dir), seed=3)
    trainer = make_ppo_trainer(
        tiny_model_dir,
        tmp_path,
        lambda p, r: torch.zeros(len(r)),
        policy=policy,
        steps=1,
        save_at_steps=[0, 1],
        rollout_batch_size=2,
        mini_batch_size=2,
        max_new_tokens=2,
        save_merged=True,
    )
    trainer.train()
    for step in ("step-000000", "step-000001"):
        kept, _ = load_model(str(tmp_path / "checkpoints" / step), device="cpu")
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / step, use_safetensors=True)
        with torch.no_grad():
            assert torch.allclose(plain(input_ids=IDS).logits, kept(input_ids=IDS).logits, atol=1e-5), step
