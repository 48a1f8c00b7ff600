"""One dialogue format per run: the same serialization in SFT, reward model, PPO and evaluation, and evaluation in
the format a checkpoint was trained in."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_ppo_trainer

from selfcorrect import dialogue as dialogues
from selfcorrect.cli import main
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.evaluate import benchmarks
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.reward_models.score import encode

SPECS = {
    "human_assistant": DialogueSpec(),
    "chat_template": DialogueSpec(format="chat_template"),
    "chat_template+system": DialogueSpec(format="chat_template", system_prompt="You are a careful assistant."),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_ppo_prompt_sft_example_and_eval_item_share_one_serialization(name, tiny_model_dir, tmp_path):
    """For the same dialogue, the text a PPO rollout prompt and the matching BBQ item hand to the tokenizer agree up
    to the opened assistant turn, as do their token ids and the prompt part of an SFT / reward-model example."""
    spec = SPECS[name]
    prompts = load_prompts()
    data = benchmarks.get("bbq").load(Path(os.environ["SELFCORRECT_DATA_DIR"]))
    unit = next(u for u in data if u["id"] == "Age:0")
    (item,) = benchmarks.get("bbq").items([unit], prompts, "q_if")
    conversation = [{"role": "user", "content": item.human}]

    trainer = make_ppo_trainer(
        tiny_model_dir, tmp_path, lambda p, r: [0.0] * len(r), [conversation], spec, max_prompt_length=512
    )
    tok = trainer.tokenizer
    ppo_text = dialogues.prompt_text(conversation, spec, tok)
    eval_text = render(item.scored_turns(), spec, tok)
    assert eval_text == ppo_text + dialogues.separator(spec) + "The answer is ("
    if name == "human_assistant":
        assert ppo_text == f"\n\nHuman: {item.human}\n\nAssistant:"
    else:
        assert ppo_text.endswith("<|im_start|>assistant\n")
        assert (spec.system_prompt or "You are a helpful AI assistant named SmolLM") in ppo_text

    ppo_ids = trainer.prompt_ids[0].tolist()
    eval_ids = dialogues.encode(tok, eval_text, spec)
    assert eval_ids[: len(ppo_ids)] == ppo_ids
    sft_ids, n_prompt = dialogues.example_ids(tok, conversation, "(c) Can't be determined.", spec)
    assert sft_ids[:n_prompt] == ppo_ids and sft_ids[-1] == tok.eos_token_id
    assert encode(tok, conversation, "(c) Can't be determined.", spec) == sft_ids  # the reward model's ids


def test_system_prompt_is_for_chat_templates_only():
    with pytest.raises(ValueError, match="system_prompt applies to format chat_template only"):
        DialogueSpec(system_prompt="hi")
    assert DialogueSpec.model_validate("chat_template") == DialogueSpec(format="chat_template")


def test_unknown_dialogue_in_a_run_config_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "output_dir": str(tmp_path / "out"), "dialogue": "chatml"}))
    assert main(["pipeline", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "dialogue" in err and "chatml" in err
    path.write_text(yaml.safe_dump({"name": "x", "evaluation": {"dialogue": "chat_template"}}))
    assert main(["pipeline", str(path), "--dry-run"]) == 2
    assert "set the run-level 'dialogue' key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model with a manifest that records training in chat_template (as a PPO checkpoint's)."""
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, out)
    (out / "manifest.json").write_text(json.dumps({"step": 3, "dialogue": {"format": "chat_template"}}))
    return out


def evaluate(model: Path, out: Path, *extra: str) -> int:
    args = ["--benchmarks", "winogender", "--conditions", "q", "--limit", "3", "--bootstrap", "10"]
    return main(["evaluate", str(model), "--output", str(out), *args, *extra])


def test_evaluate_uses_the_recorded_format_and_refuses_a_silent_contradiction(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate(checkpoint, out) == 0
    manifest = json.loads((out / "evaluation.json").read_text())
    assert manifest["settings"]["dialogue"] == {"format": "chat_template", "system_prompt": None}
    assert manifest["dialogue"]["source"] == "recorded"
    capsys.readouterr()

    other = tmp_path / "other"
    assert evaluate(checkpoint, other, "--dialogue", "human_assistant") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained in dialogue chat_template" in err and "--override-dialogue" in err
    assert not other.exists()

    assert evaluate(checkpoint, other, "--dialogue", "human_assistant", "--override-dialogue") == 0
    manifest = json.loads((other / "evaluation.json").read_text())
    assert manifest["settings"]["dialogue"]["format"] == "human_assistant"
    assert manifest["dialogue"] == {
        "format": "human_assistant",
        "system_prompt": None,
        "source": "override",
        "recorded": {"format": "chat_template", "system_prompt": None},
    }
    assert "evaluating in human_assistant" in capsys.readouterr().err


def test_a_plain_model_is_scored_in_the_given_format(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    assert evaluate(tiny_model_dir, out, "--dialogue", "chat_template", "--system-prompt", "Be fair.") == 0
    manifest = json.loads((out / "evaluation.json").read_text())
    assert manifest["dialogue"] == {"format": "chat_template", "system_prompt": "Be fair.", "source": "given"}
    assert evaluate(tiny_model_dir, tmp_path / "default") == 0
    manifest = json.loads((tmp_path / "default" / "evaluation.json").read_text())
    assert manifest["dialogue"]["format"] == "human_assistant" and manifest["dialogue"]["source"] == "default"
