"""Sequence packing (selfcorrect.train.packing): how sequences are laid out, and PPO's packed passes against its padded
ones on the same rollout (log-probs, reference log-probs, values, entropy, the ptx loss and the gradients)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_ppo_trainer
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma2ForSequenceClassification,
    LlamaForCausalLM,
)

from selfcorrect.train import packing
from selfcorrect.train import ppo_core as core


def test_sequences_are_laid_end_to_end_in_bins_of_about_equal_length():
    sequences = [[1] * 9, [2] * 4, [3] * 5, [4] * 2]
    # bins of up to the longest (9 tokens): 20 tokens need 3 bins; longest first, first fit: [9], [5, 4], [2]
    packed = packing.pack(sequences, pad_id=0, bin_tokens=0)
    assert packed.input_ids.tolist() == [[1] * 9, [3] * 5 + [2] * 4, [4] * 2 + [0] * 7]
    assert packed.position_ids.tolist() == [list(range(9)), [*range(5), *range(4)], [0, 1, *range(7)]]
    assert packed.starts.tolist() == [0, 14, 9, 18]
    flat = packed.input_ids.flatten()
    for i, s in enumerate(sequences):
        assert flat[packed.at(i, torch.arange(len(s)))].tolist() == s
    # bins of up to 12 tokens: 20 tokens need 2 bins; first fit at capacity 10 needs 3 ([9], [5, 4], [2]), so the
    # capacity grows until it needs 2: [9, 2], [5, 4]
    packed = packing.pack(sequences, pad_id=0, bin_tokens=12)
    assert packed.input_ids.tolist() == [[1] * 9 + [4] * 2, [3] * 5 + [2] * 4 + [0] * 2]
    assert packing.pack(sequences, pad_id=0).input_ids.tolist() == [[1] * 9 + [3] * 5 + [2] * 4 + [4] * 2]


def varied_prompts() -> list[list[dict]]:
    """Prompts from 1 to 12 clauses long, so the rollout's rows differ in length and pack several to a bin."""
    return [
        [{"role": "user", "content": "Tell me about " + ", then ".join(["the number 7"] * (1 + i % 12))}]
        for i in range(24)
    ]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_packed_passes_equal_the_padded_passes(peaked_policy_dir, tmp_path, kind):
    policy = LlamaForCausalLM.from_pretrained(peaked_policy_dir)
    if kind == "lora":
        policy = get_peft_model(policy, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    trainer = make_ppo_trainer(
        peaked_policy_dir,
        tmp_path / "run",
        lambda p, r: torch.rand(len(r)),
        prompts=varied_prompts(),
        policy=policy,
        gamma_ptx=0.5,
        temperature=0.7,
    )
    assert trainer._packing_works()
    torch.manual_seed(3)
    roll = trainer.rollout(trainer.step_prompts(0))  # padded passes (packing is off until train() checks it)
    rows = torch.arange(8)
    reads, _ = trainer._pack(roll, rows)
    assert reads.policy.input_ids.numel() < 0.8 * roll.input_ids.numel()  # it packs: fewer tokens than padded rows
    mask = roll.response_mask.bool()
    ptx = trainer._ptx_sequences(trainer.ptx_batch(0, 0))
    outputs = {}
    for packed in (False, True):
        trainer.packing = packed
        logprobs, values = trainer._forward_response(roll, trainer.model, rows)
        ref = trainer._ref_logprobs(roll)
        trainer.model.zero_grad()
        new_logprobs, new_values, entropy, ptx_batch = trainer._update_forward(roll, rows[:4], ptx)
        lm = core.ptx_loss(*ptx_batch)
        m = mask[:4]
        (new_logprobs[m].sum() + new_values[m].sum() + lm).backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        outputs[packed] = {
            "logprobs": logprobs[mask],
            "values": values[mask],
            "ref_logprobs": ref[mask],
            "update_logprobs": new_logprobs[m].detach(),
            "update_values": new_values[m].detach(),
            "entropy": entropy[m],
            "ptx_loss": lm.detach(),
            **grads,
        }
    padded, packed = outputs[False], outputs[True]
    assert padded.keys() == packed.keys() and len(padded) > 10  # the gradients of the trained weights are compared
    for name in padded:  # float noise only: within 1e-5 of each tensor's largest entry (summed embedding gradients)
        gap = (packed[name] - padded[name]).abs().max()
        assert gap <= 1e-5 * (1 + padded[name].abs().max()), (name, float(gap))


def tiny_gemma2(softcapping: float | None, vocab_size: int = 300) -> Gemma2Config:
    """A tiny Gemma 2 config; Gemma 2 soft-caps its logits after the LM head (``final_logit_softcapping``)."""
    return Gemma2Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=0, num_labels=1, final_logit_softcapping=softcapping,
    )  # fmt: skip


def test_the_packing_check_turns_packing_off_for_a_model_whose_logits_are_post_processed():
    """The packed path applies the LM head and nothing after it, so a soft-capping Gemma 2 fails the check; the same
    model without soft-capping passes it."""
    torch.manual_seed(0)
    sequences = [list(range(10, 22)), list(range(30, 37)), list(range(40, 45))]
    capped, plain = tiny_gemma2(5.0), tiny_gemma2(None)
    why = packing.packing_matches(Gemma2ForCausalLM(capped), Gemma2ForSequenceClassification(capped), sequences, 0)
    assert why.startswith("packed logits differ from the padded forward's by")
    assert packing.packing_matches(Gemma2ForCausalLM(plain), Gemma2ForSequenceClassification(plain), sequences, 0) == ""


def test_training_checks_packing_first_and_records_it(peaked_policy_dir, tmp_path):
    """train() runs the check before the first rollout: a Llama policy trains on packed sequences, a soft-capping
    Gemma 2 policy (same tokenizer) is warned about and trains on padded rows; each kept manifest says which."""
    common = dict(steps=1, save_at_steps=[1], rollout_batch_size=4, mini_batch_size=4, max_new_tokens=4)
    make_ppo_trainer(peaked_policy_dir, tmp_path / "llama", lambda p, r: torch.rand(len(r)), **common).train()
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(tiny_gemma2(5.0, vocab_size=len(AutoTokenizer.from_pretrained(peaked_policy_dir))))
    trainer = make_ppo_trainer(
        peaked_policy_dir, tmp_path / "gemma", lambda p, r: torch.rand(len(r)), policy=gemma, **common
    )
    with pytest.warns(UserWarning, match="ppo.packing: off for this run, padded batches instead: packed logits differ"):
        trainer.train()
    for run, packed in (("llama", True), ("gemma", False)):
        manifest = json.loads((tmp_path / run / "checkpoints" / "step-000001" / "manifest.json").read_text())
        assert manifest["packing"] is packed
