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
    assert trainer.passes.check_forward(trainer.model.policy, trainer.model.value_model, trainer.prompt_ids)
    torch.manual_seed(3)
    roll = trainer.rollout(trainer.step_prompts(0))
    rows = torch.arange(8)
    trainer.passes.packed = True
    reads = trainer.passes.reads(roll, rows)
    assert reads.policy.input_ids.numel() < 0.8 * roll.input_ids.numel()  # it packs: fewer tokens than padded rows
    mask = roll.response_mask.bool()
    ptx = trainer.passes.ptx_sequences(trainer.ptx_batch(0, 0))
    outputs = {}
    for packed in (False, True):
        trainer.passes.packed = packed
        logprobs, values = trainer.passes.policy_and_values(trainer.model, roll, rows)
        ref = trainer._ref_logprobs(roll)
        trainer.model.zero_grad()
        new_logprobs, new_values, entropy, lm = trainer.passes.minibatch(trainer.model, roll, rows[:4], ptx)
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


def test_the_lm_head_reproduces_logits_that_models_post_process():
    """PPO's log-probs come from the LM head on the last hidden states (selfcorrect.train.logprobs.output_head), with
    the post-processing a model's forward applies: a soft-capping Gemma 2 passes the check and packs."""
    torch.manual_seed(0)
    sequences = [list(range(10, 22)), list(range(30, 37)), list(range(40, 45))]
    capped = tiny_gemma2(0.2)  # a cap the random logits reach
    policy, value = Gemma2ForCausalLM(capped).eval(), Gemma2ForSequenceClassification(capped).eval()
    assert packing.head_matches(policy, sequences, 0) == ""
    assert packing.packing_matches(policy, value, sequences, 0) == ""
    ids = torch.tensor([sequences[0]])  # the soft-capping matters: the bare LM head gives other logits
    bare = policy.get_output_embeddings()(policy.model(input_ids=ids).last_hidden_state)
    assert not torch.allclose(policy(input_ids=ids).logits, bare, atol=1e-2)


class DoubledLogits(LlamaForCausalLM):
    """A Llama whose forward post-processes its logits in a way PPO's LM head does not know."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_training_checks_the_head_and_packing_first_and_records_it(peaked_policy_dir, tmp_path):
    """train() runs the checks before the first rollout: a Llama policy trains on packed sequences; an OPT policy
    (learned positions from the attention mask: packing fails its check) is warned about and trains on padded rows;
    each kept manifest says which. A policy whose forward post-processes its logits unknown to PPO is refused."""
    from transformers import OPTConfig, OPTForCausalLM

    from selfcorrect.errors import UserError

    common = dict(steps=1, save_at_steps=[1], rollout_batch_size=4, mini_batch_size=4, max_new_tokens=4)
    make_ppo_trainer(peaked_policy_dir, tmp_path / "llama", lambda p, r: torch.rand(len(r)), **common).train()
    tok = AutoTokenizer.from_pretrained(peaked_policy_dir)
    torch.manual_seed(0)
    opt = OPTForCausalLM(
        OPTConfig(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
            word_embed_proj_dim=32, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
    )  # fmt: skip
    reward = lambda p, r: torch.rand(len(r))  # noqa: E731
    trainer = make_ppo_trainer(peaked_policy_dir, tmp_path / "opt", reward, policy=opt, **common)
    with pytest.warns(UserWarning, match="ppo.packing: off for this run, padded batches instead: packed hidden states"):
        trainer.train()
    for run, packed in (("llama", True), ("opt", False)):
        manifest = json.loads((tmp_path / run / "checkpoints" / "step-000001" / "manifest.json").read_text())
        assert manifest["packing"] is packed
        assert manifest["ptx_loss_kernel"] == "chunked torch"  # Liger-Kernel's fused kernel runs on CUDA only
    doubled = DoubledLogits.from_pretrained(peaked_policy_dir)
    trainer = make_ppo_trainer(
        peaked_policy_dir, tmp_path / "doubled", lambda p, r: torch.rand(len(r)), policy=doubled, **common
    )
    with pytest.raises(UserError, match="the policy's logits differ from its LM head's on its last hidden states"):
        trainer.train()
    assert not (tmp_path / "doubled" / "checkpoints" / "step-000001").exists()
