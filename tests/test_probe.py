"""`selfcorrect probe`: the benchmarks' answer candidates scored by a reward. A function reward whose preferences are
known by construction gives hand-computed metrics on each benchmark; a tiny reward-model directory gives the softmax
of its own scores of each finished exchange (computed here by a direct forward pass) in its recorded dialogue
format; bad input is a one-line error."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from selfcorrect.cli import main
from selfcorrect.config import data_dir
from selfcorrect.evaluate.benchmarks import bbq

REWARDS = '''
import math

def known(prompts, responses):
    """BBQ: option (a) preferred 3:1:1. Winogender: the female pronoun by e:1:1. Law school, under Q only: "yes"
    for a Black student by e:1, an even choice for a white one; under Q+IF (its instruction in the prompt) even."""
    out = []
    for prompt, response in zip(prompts, responses):
        if response.endswith("(a"):
            out.append(math.log(3.0))
        elif response.endswith((" she", " her", " hers")):
            out.append(1.0)
        elif response.endswith("yes") and " Black " in prompt and "in no way biased" not in prompt:
            out.append(1.0)
        else:
            out.append(0.0)
    return out
'''
SIGMOID_1 = 1 / (1 + math.exp(-1))


def metrics(out: Path) -> dict[tuple[str, str, str, str], dict]:
    rows = csv.DictReader(open(out / "metrics.csv"))
    return {(r["benchmark"], r["condition"], r["subset"], r["metric"]): r for r in rows}


@pytest.fixture
def known_reward(tmp_path, monkeypatch) -> str:
    (tmp_path / "known_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "known_rewards:known"


def test_a_function_reward_gives_hand_computed_metrics(known_reward, tmp_path, capsys):
    out = tmp_path / "probe"
    args = ["probe", known_reward, "--output", str(out), "--limit", "40", "--bootstrap", "0"]
    assert main(args) == 0
    rows = metrics(out)

    # Law school: p(yes | Black) = sigmoid(1), p(yes | white) = 1/2 under Q; 1/2 for both under Q+IF.
    parity = float(rows[("law_school", "q", "all", "parity_difference")]["value"])
    assert parity == pytest.approx(SIGMOID_1 - 0.5, abs=1e-9)
    assert float(rows[("law_school", "q_if", "all", "parity_difference")]["value"]) == pytest.approx(0.0, abs=1e-12)
    paired = float(rows[("law_school", "q_if_minus_q", "all", "parity_difference")]["value"])
    assert paired == pytest.approx(0.5 - SIGMOID_1, abs=1e-9)  # the RM rewards the self-corrected answer less bias

    # Winogender: p(she) = e / (e + 2) for every occupation; a constant has no correlation, and says so.
    assert float(rows[("winogender", "q", "all", "p_female_mean")]["value"]) == pytest.approx(math.e / (math.e + 2))
    assert rows[("winogender", "q", "all", "pearson_r")]["value"] == ""
    assert "the same for all" in rows[("winogender", "q", "all", "pearson_r")]["note"]

    # BBQ: the preferred answer is always (a); accuracy and bias score by the paper's definitions over the sample.
    by_id = {u["id"]: u for u in bbq.load(data_dir(None))}
    units = [by_id[i] for i in json.loads((out / "bbq" / "sample.json").read_text())["ids"]]
    for context in ("ambig", "disambig"):
        scored = [u for u in units if u["context_condition"] == context and u["target"] is not None]
        accuracy = np.mean([u["label"] == 0 for u in scored])
        non_unknown = [u for u in scored if u["unknown"] != 0]
        raw = 2 * sum(u["target"] == 0 for u in non_unknown) / len(non_unknown) - 1
        expected = (1 - accuracy) * raw if context == "ambig" else raw
        for name, value in ((f"accuracy_{context}", accuracy), (f"bias_score_{context}", expected)):
            assert float(rows[("bbq", "q", "all", name)]["value"]) == pytest.approx(value, abs=1e-9), name
    assert float(rows[("bbq", "q", "all", "unknown_rate")]["value"]) == pytest.approx(
        np.mean([u["unknown"] == 0 for u in units])
    )
    assert not any(key[3] == "candidate_mass" for key in rows)  # no meaning for a reward's preferences

    # Each item keeps its raw rewards beside their softmax.
    first = json.loads((out / "bbq" / "q.jsonl").read_text().splitlines()[0])
    assert first["rewards"] == pytest.approx([math.log(3.0), 0.0, 0.0])
    assert first["probs"] == pytest.approx([0.6, 0.2, 0.2])
    assert json.loads((out / "evaluation.json").read_text())["settings"]["scorer"] == "reward"

    # A rerun reuses every item; the policy evaluation of a model never continues a probe's directory.
    before = (out / "metrics.csv").read_bytes()
    assert main(args) == 0 and (out / "metrics.csv").read_bytes() == before
    capsys.readouterr()
    assert main(["evaluate", "embedded:smollm2-135m-instruct", "--output", str(out), "--limit", "40"]) == 2
    assert "other settings (" in capsys.readouterr().err


def tiny_reward_dir(tiny_model_dir: Path, out: Path, dialogue: dict) -> Path:
    """A scalar-head classifier on the tiny model, saved as `selfcorrect reward` saves one (with its manifest)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_().mul_(3.0)  # rewards that differ between candidates
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {"bias": 0.75, "dialogue": dialogue, "max_length": 512}
    (out / "reward_manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_reward_model_probe_is_the_softmax_of_its_scores_in_its_dialogue(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from selfcorrect.dialogue import DialogueSpec, example_ids
    from selfcorrect.evaluate import benchmarks
    from selfcorrect.evaluate.prompts import load_prompts

    spec = {"format": "chat_template", "system_prompt": "Be fair."}
    reward = tiny_reward_dir(tiny_model_dir, tmp_path / "reward", spec)
    out = tmp_path / "probe"
    assert main(["probe", str(reward), "--output", str(out), "--benchmarks", "winogender", "--limit", "6"]) == 0
    manifest = json.loads((out / "evaluation.json").read_text())
    assert manifest["dialogue"]["format"] == "chat_template" and manifest["dialogue"]["source"] == "recorded"

    model = AutoModelForSequenceClassification.from_pretrained(reward).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward)
    module = benchmarks.get("winogender")
    by_id = {u["id"]: u for u in module.load(data_dir(None))}
    for condition in ("q", "q_if"):
        lines = [json.loads(x) for x in (out / "winogender" / f"{condition}.jsonl").read_text().splitlines()]
        items = {it.item_id: it for it in module.items([by_id[r["id"]] for r in lines], load_prompts(), condition)}
        for record in lines:
            item = items[record["id"]]
            with torch.no_grad():
                rewards = [
                    model(input_ids=torch.tensor([example_ids(tokenizer, [{"role": "user", "content": item.human}],
                                                              item.assistant + c, DialogueSpec(**spec))[0]]))
                    .logits.item() + 0.75
                    for c in item.candidates
                ]  # fmt: skip
            assert record["rewards"] == pytest.approx(rewards, abs=1e-4)
            assert record["probs"] == pytest.approx(torch.softmax(torch.tensor(rewards), 0).tolist(), abs=1e-6)
            assert max(rewards) - min(rewards) > 1e-3  # the candidates are told apart


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda d: [str(d["policy"])], "not a reward model (no scalar head)"),
        (lambda d: [d["function"], "--conditions", "q,q_if_cot"], "--conditions q_if_cot: a CoT condition"),
        (lambda d: [str(d["reward"]), "--dialogue", "human_assistant"], "contradicts it (add --override-dialogue"),
        (lambda d: [d["function"], "--dialogue", "chat_template"], "a function reward reads HH-format text"),
        (lambda d: ["no_such_module:f"], "cannot import module 'no_such_module'"),
    ],
    ids=["policy-as-reward", "cot", "dialogue-contradicts-manifest", "function-chat-template", "missing-function"],
)
def test_bad_probe_input_is_a_one_line_error(make_args, needle, tiny_model_dir, known_reward, tmp_path, capsys):
    reward = tiny_reward_dir(tiny_model_dir, tmp_path / "reward", {"format": "chat_template", "system_prompt": None})
    given = {"policy": tiny_model_dir, "reward": reward, "function": known_reward}
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["probe", *make_args(given), "--output", str(out), "--benchmarks", "winogender", "--limit", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (out / "evaluation.json").exists()
