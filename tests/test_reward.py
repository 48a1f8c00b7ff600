"""Reward models: the K-wise loss, TRL-compatible trainers on the tiny model, saving/normalising, scoring, errors."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from pydantic import ValidationError

from selfcorrect.config import DatasetSpec, LoraSection, ModelSection, load_config
from selfcorrect.config.reward import RewardSection
from selfcorrect.dialogue import DialogueSpec, example_ids
from selfcorrect.errors import UserError
from selfcorrect.reward_models.score import RewardModel, encode
from selfcorrect.rundir import REWARD_MANIFEST
from selfcorrect.train import reward as rm_train
from selfcorrect.train.reward import (
    KWiseRewardTrainer,
    build_reward_config,
    run_reward,
    to_pairwise,
    to_ranked,
)
from selfcorrect.train.reward_core import kwise_loss, pad_groups, ranking_metrics

TOPICS = ["cats", "rain", "bread", "music", "rivers", "chess", "tea", "maps", "bees", "clocks", "snow", "ships"]
SPEC = DatasetSpec(path="unused.jsonl", format="ranked")
FAST = {  # a few quick, high-LR steps: enough for the tiny model to learn the rule on 2 CPU cores
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "logging_steps": 1,
    "activation_checkpointing": False,
    "lr_scheduler_type": "constant",
    "disable_tqdm": True,
}


def _prompt(topic: str) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about {topic}."}]


def _response(topic: str, rank: int, k: int) -> str:
    """The rule: the more 'ok' (and the fewer 'great'), the better. The untrained tiny model ranks it backwards."""
    return f"{topic} " + " ".join(["ok"] * (k - 1 - rank) + ["great"] * rank)


def ranked_data(n: int, seed: int, k: int | None = None) -> Dataset:
    """n prompts with K (fixed, or 2..4 at random) responses, best first; responses as plain strings."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, size = rng.choice(TOPICS), k or rng.randint(2, 4)
        rows.append({"prompt": _prompt(topic), "responses": [_response(topic, r, size) for r in range(size)]})
    return Dataset.from_list(rows)


def pairwise_data(n: int, seed: int) -> Dataset:
    """TRL conversational preference data (message-list chosen/rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        rows.append(
            {
                "prompt": _prompt(topic),
                "chosen": [{"role": "assistant", "content": _response(topic, 0, 3)}],
                "rejected": [{"role": "assistant", "content": _response(topic, 2, 3)}],
            }
        )
    return Dataset.from_list(rows)


def demonstrations() -> list[list[dict]]:
    return [_prompt(t) + [{"role": "assistant", "content": f"{t} ok ok"}] for t in TOPICS[:5]]


@pytest.fixture(scope="module")
def classifier(tiny_model_dir: Path):
    """An untrained scalar-head classifier on the tiny model, with its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# ---- the loss and the metrics ------------------------------------------------------------------------------------


def test_kwise_loss_hand_computed():
    expected = (-F.logsigmoid(torch.tensor([1.0, 2.0, 1.0]))).mean()  # pairs (0,1), (0,2), (1,2) of [2, 1, 0]
    assert torch.allclose(kwise_loss(torch.tensor([[2.0, 1.0, 0.0]])), expected)
    assert torch.allclose(kwise_loss([torch.tensor([2.0, 1.0, 0.0])]), expected)

    # Varying K: padded slots hold garbage and must not leak into the value or the gradient; K = 1 has no pairs.
    second = -F.logsigmoid(torch.tensor(0.5 - 1.5))
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, float("nan")], [3.0, float("inf"), 7.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    loss = kwise_loss(rewards, mask)
    assert torch.allclose(loss, (expected + second) / 2)  # mean over prompts: each prompt weighs the same
    loss.backward()
    assert torch.isfinite(rewards.grad).all() and (rewards.grad[~mask] == 0).all()

    ragged = kwise_loss([torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0.5, 1.5])])
    assert torch.allclose(ragged, (expected + second) / 2)
    padded, pad_mask = pad_groups(torch.tensor([2.0, 1.0, 0.0, 0.5, 1.5]), [3, 2])
    assert pad_mask.tolist() == [[True, True, True], [True, True, False]]
    assert torch.allclose(kwise_loss(padded, pad_mask), ragged)

    # K = 2 is the pairwise loss.
    chosen, rejected = torch.randn(5), torch.randn(5)
    pairwise = -F.logsigmoid(chosen - rejected).mean()
    assert torch.allclose(kwise_loss(torch.stack([chosen, rejected], dim=1)), pairwise)


def test_ranking_metrics():
    perfect = ranking_metrics([torch.tensor([3.0, 2.0, 1.0, 0.0]), torch.tensor([1.0, 0.0])])
    assert perfect["pairwise_accuracy"] == 1.0 and perfect["kendall_tau"] == 1.0
    assert perfect["n_pairs"] == 7 and perfect["n_prompts"] == 2
    reverse = ranking_metrics([torch.tensor([0.0, 1.0, 2.0])])
    assert reverse["pairwise_accuracy"] == 0.0 and reverse["kendall_tau"] == -1.0
    # One swapped adjacent pair out of C(3,2) = 3: tau = (2 - 1) / 3.
    swapped = ranking_metrics([torch.tensor([2.0, 0.0, 1.0])])
    assert swapped["kendall_tau"] == pytest.approx(1 / 3) and swapped["pairwise_accuracy"] == pytest.approx(2 / 3)
    k2 = ranking_metrics(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0], [5.0, 4.0]]))
    assert k2["kendall_tau"] == pytest.approx(2 * k2["pairwise_accuracy"] - 1)


def test_data_views():
    ranked = ranked_data(6, seed=3)
    pairs = to_pairwise(ranked)
    assert len(pairs) == sum(math.comb(len(r), 2) for r in ranked["responses"])
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": ranked[0]["responses"][0]}]
    as_ranked = to_ranked(pairwise_data(3, seed=0))
    assert [len(r) for r in as_ranked["responses"]] == [2, 2, 2]
    with pytest.raises(UserError, match="expected columns"):
        to_ranked(Dataset.from_list([{"prompt": "x", "answer": "y"}]))


# ---- K = 2 through both trainers ----------------------------------------------------------------------------------


def test_kwise_trainer_matches_trl_pairwise_for_k2(classifier, tmp_path: Path):
    from trl import RewardTrainer

    model, tokenizer = classifier
    section = RewardSection(data=SPEC, max_length=128, trainer={**FAST, "use_cpu": True})
    data = pairwise_data(6, seed=1)
    args = build_reward_config(section, tmp_path / "trainer", seed=0, report_to="none")
    trl_trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trl_rows = list(trl_trainer.train_dataset)
    # The same token ids through the K-wise trainer (TRL tokenizes with the chat template; we use the run's format).
    same_ids = Dataset.from_list([{"response_ids": [r["chosen_ids"], r["rejected_ids"]]} for r in trl_rows])
    kw_trainer = KWiseRewardTrainer(model=model, args=args, train_dataset=same_ids, processing_class=tokenizer)
    model.eval()

    kw_rows = list(kw_trainer.train_dataset)
    trl_batch = trl_trainer.data_collator(trl_rows)
    kw_batch = kw_trainer.data_collator(kw_rows)
    assert kw_batch["group_sizes"].tolist() == [2] * 6

    with torch.no_grad():
        trl_loss = trl_trainer.compute_loss(model, trl_batch)
        kw_loss = kw_trainer.compute_loss(model, kw_batch)
        # and by hand, from the model's own scores
        chosen, rejected = model(**trl_batch).logits.squeeze(-1).chunk(2)
    assert torch.allclose(kw_loss, trl_loss, atol=1e-6, rtol=0)
    assert torch.allclose(trl_loss, -F.logsigmoid(chosen - rejected).mean(), atol=1e-6, rtol=0)
    assert kw_trainer._metrics["eval"]["accuracy"] == trl_trainer._metrics["eval"]["accuracy"]


# ---- scoring -------------------------------------------------------------------------------------------------------


def _hh_records(n: int) -> list[tuple[str, str]]:
    """(prompt, response) strings from the first HH harmless-base test records, if the data directory is set."""
    root = os.environ.get("SELFCORRECT_DATA_DIR")
    path = Path(root) / "hh-rlhf" / "harmless-base-test.jsonl.gz" if root else None
    if path is None or not path.is_file():
        return []
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            transcript = json.loads(line)["chosen"]
            cut = transcript.rindex("\n\nAssistant:") + len("\n\nAssistant:")
            out.append((transcript[:cut], transcript[cut:]))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("dialogue", ["human_assistant", "chat_template"])
def test_reward_data_is_tokenized_in_the_runs_dialogue_format(classifier, tmp_path: Path, dialogue: str):
    _, tokenizer = classifier
    spec = DialogueSpec(format=dialogue)
    section = RewardSection(data=SPEC, max_length=512, trainer={**FAST, "use_cpu": True})
    args = build_reward_config(section, tmp_path / "trainer", seed=0, report_to="none")
    data = ranked_data(3, seed=2)
    trainer = KWiseRewardTrainer(
        model=classifier[0], args=args, train_dataset=data, processing_class=tokenizer, dialogue=spec
    )
    for row, example in zip(trainer.train_dataset, data):
        for ids, response in zip(row["response_ids"], example["responses"]):
            expected, _ = example_ids(tokenizer, example["prompt"], response, spec)
            assert ids == expected and ids[-1] == tokenizer.eos_token_id
            text = tokenizer.decode(ids)
            assert text.startswith("\n\nHuman: " if dialogue == "human_assistant" else "<|im_start|>system")


def test_score_is_padding_and_batch_invariant(classifier):
    model, tokenizer = classifier
    reward = RewardModel(model, tokenizer, bias=0.5)
    prompts = [_prompt(t) for t in TOPICS[:4]] + [[{"role": "user", "content": "hi"}]]
    responses = ["ok", "a much longer answer about " * 5, "great", [{"role": "assistant", "content": "x"}], "yes"]
    for prompt, response in _hh_records(3):  # real HH transcripts, scored as plain text
        prompts.append(prompt)
        responses.append(response)
    batched = reward.score(prompts, responses, batch_size=16)
    one_by_one = reward.score(prompts, responses, batch_size=1)
    assert batched.shape == (len(prompts),) and batched.dtype == torch.float32
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    # Unpadded single forward passes, by hand: the score is the last token's, plus the bias.
    with torch.no_grad():
        for i in (0, 1, len(prompts) - 1):
            ids = torch.tensor([encode(tokenizer, prompts[i], responses[i], DialogueSpec())])
            assert batched[i].item() == pytest.approx(model(input_ids=ids).logits.item() + 0.5, abs=1e-5)


# ---- training runs -------------------------------------------------------------------------------------------------


def _logged_losses(manifest: dict) -> list[float]:
    return [entry["loss"] for entry in manifest["log_history"] if "loss" in entry]


def test_pairwise_lora_run_learns_saves_and_reloads(tiny_model_dir: Path, tmp_path: Path):
    section = RewardSection(
        data=SPEC, loss="pairwise", max_length=128, trainer={**FAST, "learning_rate": 5e-3, "num_train_epochs": 3}
    )
    out = run_reward(
        section,
        ModelSection(name_or_path=str(tiny_model_dir)),
        LoraSection(r=8, alpha=16, dropout=0.0),
        tmp_path / "rm",
        seed=0,
        train_ds=pairwise_data(16, seed=1),
        eval_ds=pairwise_data(8, seed=2),
        demonstrations=demonstrations(),
    )
    manifest = json.loads((out / REWARD_MANIFEST).read_text())
    losses = _logged_losses(manifest)
    assert manifest["stage"] == "reward" and manifest["loss_type"] == "pairwise" and manifest["n_train"] == 16
    assert len(losses) == 6 and sum(losses[-2:]) / 2 < losses[0] - 0.1, losses
    assert manifest["pairwise_accuracy"] > 0.5 and manifest["kendall_tau"] > 0
    assert manifest["bias_source"] == "demonstrations" and math.isfinite(manifest["bias"])
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["library_versions"]) and manifest["seed"] == 0

    # A plain (merged) sequence classifier, no adapter, nothing left over.
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["reward_bias"] == manifest["bias"]
    assert not (out / "adapter_config.json").exists() and not (out / "checkpoints").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]

    reward = RewardModel.load(str(out), device="cpu")
    assert reward.bias == manifest["bias"]
    demos = demonstrations()
    scores = reward.score([d[:-1] for d in demos], [d[-1]["content"] for d in demos])
    assert abs(scores.mean().item()) < 1e-4  # InstructGPT normalisation
    good, bad = reward.score([_prompt("tea")] * 2, [_response("tea", 0, 3), _response("tea", 2, 3)])
    assert good > bad


def test_kwise_full_run_learns_with_varying_k(tiny_model_dir: Path, tmp_path: Path):
    section = RewardSection(
        data=SPEC, loss="kwise", max_length=128, trainer={**FAST, "learning_rate": 1e-3, "num_train_epochs": 2}
    )
    train_ds, eval_ds = ranked_data(16, seed=1), ranked_data(8, seed=2)
    out = run_reward(
        section, ModelSection(name_or_path=str(tiny_model_dir)), None, tmp_path / "rm", 0, train_ds, eval_ds
    )
    manifest = json.loads((out / REWARD_MANIFEST).read_text())
    losses = _logged_losses(manifest)
    assert manifest["loss_type"] == "kwise" and manifest["n_train"] == 16 and manifest["global_step"] == 4
    assert manifest["n_train_pairs"] == sum(math.comb(len(r), 2) for r in train_ds["responses"])
    assert losses[-1] < losses[0] - 0.05, losses
    assert manifest["eval"]["n_prompts"] == 8 and manifest["pairwise_accuracy"] > 0.5
    assert manifest["kendall_tau"] > 0
    assert manifest["bias_source"] == "train_best_responses"  # no demonstrations given

    reward = RewardModel.load(out, device="cpu")
    best = [r[0] for r in train_ds["responses"]]
    assert abs(reward.score(train_ds["prompt"], best).mean().item()) < 1e-4


def test_nan_loss_is_a_user_error_and_writes_nothing(tiny_model_dir: Path, tmp_path: Path, monkeypatch):
    real = rm_train.kwise_loss
    monkeypatch.setattr(rm_train, "kwise_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    section = RewardSection(data=SPEC, loss="kwise", max_length=128, trainer={**FAST, "max_steps": 1})
    with pytest.raises(UserError, match="diverged"):
        run_reward(section, ModelSection(name_or_path=str(tiny_model_dir)), None, tmp_path / "rm", 0, ranked_data(4, 1))
    assert list(tmp_path.iterdir()) == []


# ---- loading and function rewards ------------------------------------------------------------------------------------


def test_load_rejects_non_reward_models(tiny_model_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match="not a reward model"):
        RewardModel.load(str(tiny_model_dir))
    from transformers import LlamaConfig

    LlamaConfig(num_labels=1, architectures=["LlamaForSequenceClassification"]).save_pretrained(tmp_path / "rm")
    with pytest.raises(UserError, match="no safetensors weights"):
        RewardModel.load(str(tmp_path / "rm"))
    with pytest.raises(UserError, match="not found"):
        RewardModel.load(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot import module"):
        RewardModel.load("no_such_module_xyz:reward")
    with pytest.raises(UserError, match="has no attribute"):
        RewardModel.load("math:no_such_function")
    with pytest.raises(UserError, match="not found"):
        RewardModel.load("not a spec")


def test_function_reward(tmp_path: Path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, responses):\n"
        "    assert all(p.endswith('\\n\\nAssistant:') for p in prompts)\n"
        "    return [float(len(r)) for r in responses]\n"
        "def broken(prompts, responses):\n"
        "    return [1.0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = RewardModel.load("my_rewards:length")
    scores = reward.score([_prompt("tea"), _prompt("snow")], ["abc", [{"role": "assistant", "content": "hello"}]])
    assert scores.tolist() == [3.0, 5.0]
    with pytest.raises(UserError, match="^reward my_rewards:broken: returned 1 value for 2 responses$"):
        RewardModel.load("my_rewards:broken").score([_prompt("a"), _prompt("b")], ["x", "y"])

    # reward.function: nothing is trained; the stage directory points at the function.
    section = RewardSection(function="my_rewards:length")
    out = run_reward(section, ModelSection(), None, tmp_path / "rm", 0, train_ds=None)
    assert json.loads((out / REWARD_MANIFEST).read_text())["function"] == "my_rewards:length"
    assert RewardModel.load(out).score(["\n\nHuman: hi\n\nAssistant:"], ["four"]).tolist() == [4.0]
    with pytest.raises(UserError, match="cannot import"):
        run_reward(RewardSection(function="nope_mod:f"), ModelSection(), None, tmp_path / "rm2", 0, None)
    assert not (tmp_path / "rm2").exists()


# ---- config ---------------------------------------------------------------------------------------------------------


def test_unknown_trainer_key_is_an_error(tmp_path: Path):
    config = tmp_path / "reward.yaml"
    config.write_text("data: {path: x.jsonl, format: pairwise}\ntrainer: {learning_rat: 0.001}\n")
    with pytest.raises(UserError, match=r"reward.yaml: trainer: .*learning_rat: unknown RewardConfig field"):
        load_config(config, RewardSection)
    with pytest.raises(ValidationError, match="set by the run"):
        RewardSection(data=SPEC, trainer={"output_dir": "x"})
    with pytest.raises(ValidationError, match="data: required"):
        RewardSection()
    # Sections built without validation are checked again when the trainer config is made.
    unchecked = RewardSection.model_construct(data=SPEC, trainer={"learning_rat": 1.0}, max_length=8)
    with pytest.raises(UserError, match=r"^reward\.trainer\.learning_rat: unknown RewardConfig field$"):
        build_reward_config(unchecked, tmp_path / "t", seed=0, report_to="none")
    with pytest.raises(UserError, match="reward.trainer: invalid RewardConfig"):
        build_reward_config(
            RewardSection(data=SPEC, trainer={"lr_scheduler_type": "no-such-schedule"}), tmp_path, 0, "none"
        )
