"""Log-probs from hidden states a chunk at a time (selfcorrect.train.logprobs): equal to the full-logits computation,
gradients included, for any chunk size; and no PPO pass makes a tensor of more than a chunk's logits."""

from __future__ import annotations

import pytest
import torch
from conftest import make_ppo_trainer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from selfcorrect.train import ppo_core as core
from selfcorrect.train.logprobs import token_logprobs

K, D, V = 23, 16, 50  # positions, hidden size, vocabulary


def head_and_inputs(bias: bool = False) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = nn.Linear(D, V, bias=bias)
    with torch.no_grad():
        head.weight.mul_(8)  # peaked distributions, far from uniform
    return head, torch.randn(K, D, requires_grad=True), torch.randint(0, V, (K,))


@pytest.mark.parametrize("chunk_size", [1, 5, 7, K, 4096])  # 5 and 7 do not divide 23
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits(chunk_size, temperature):
    head, hidden, targets = head_and_inputs(bias=True)
    weights = torch.randn(K)  # an arbitrary downstream loss, so every position's gradient differs

    def run(chunked: bool):
        head.zero_grad()
        hidden.grad = None
        if chunked:
            logprobs, entropy = token_logprobs(
                head, hidden, targets, temperature=temperature, chunk_size=chunk_size, entropy=True
            )
        else:
            logits = head(hidden) / temperature
            logprobs = core.logprobs_from_logits(logits, targets)
            entropy = core.entropy_from_logits(logits.detach())
        (logprobs * weights).sum().backward()
        return logprobs.detach(), entropy, hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()

    for full, chunked in zip(run(False), run(True), strict=True):
        assert torch.allclose(chunked, full, atol=1e-5, rtol=1e-5), float((chunked - full).abs().max())


def test_the_ptx_loss_from_chunked_logprobs_equals_the_padded_cross_entropy():
    """Two pretraining texts of 6 and 4 tokens, padded to 6: ptx_loss on the padded logits against the negative mean
    of the chunked log-probs of the 5 + 3 next tokens, and their gradients."""
    head, _, _ = head_and_inputs()
    torch.manual_seed(1)
    hidden = torch.randn(2, 6, D, requires_grad=True)
    labels = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    full = core.ptx_loss(head(hidden), labels, mask)
    (full_grad,) = torch.autograd.grad(full, hidden)
    reads = [(0, t) for t in range(5)] + [(1, t) for t in range(3)]
    picked = torch.stack([hidden[b, t] for b, t in reads])
    targets = torch.tensor([int(labels[b, t + 1]) for b, t in reads])
    logprobs, _ = token_logprobs(head, picked, targets, chunk_size=3)
    chunked = core.ptx_loss_from_logprobs(logprobs)
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    assert torch.allclose(chunked, full, atol=1e-6)
    assert torch.allclose(chunked_grad, full_grad, atol=1e-6)
    with pytest.raises(ValueError, match="no target tokens"):
        core.ptx_loss_from_logprobs(torch.zeros(0))


class LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any tensor an operator makes whose last dimension is the vocabulary (logits, their
    softmax, their gradient), in the forward and the backward pass alike; views (the LM head's transposed weight)
    make no new tensor and are not counted."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_chunked_logprobs_never_make_more_than_a_chunk_of_logits():
    head, hidden, targets = head_and_inputs()
    with LargestVocabTensor(V) as seen:
        logprobs, _ = token_logprobs(head, hidden, targets, chunk_size=4, entropy=True)
        logprobs.sum().backward()
    assert seen.rows == 4
    with LargestVocabTensor(V) as seen:  # the full computation, for contrast
        core.logprobs_from_logits(head(hidden), targets).sum().backward()
    assert seen.rows == K


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_a_ppo_step_with_ptx_never_makes_more_than_a_chunk_of_logits(peaked_policy_dir, tmp_path, packing):
    """A whole RLHF step on the tiny model (rollout with the reference pass, score, an update with pretraining rows
    in the same forward, backward): the largest vocabulary-sized tensor is one chunk of positions (or the rollout's
    8 rows while sampling, fewer than a chunk)."""
    chunk = 16
    trainer = make_ppo_trainer(
        peaked_policy_dir, tmp_path / "run", lambda p, r: torch.rand(len(r)), gamma_ptx=1.0, ptx_batch_size=2,
        logits_chunk_size=chunk,
    )  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=8)
    trainer.passes.packed = packing
    vocab = trainer.model.policy.config.vocab_size
    with LargestVocabTensor(vocab) as seen:
        roll = trainer.rollout(trainer.step_prompts(0), deferred=trainer.first_minibatch(0))
        trainer.score(roll)
        first = trainer.deferred_forward(roll, 0)
        trainer.advantages(roll)
        record = trainer.update(roll, 0, first)
    positions = int(roll.response_mask.sum()) + sum(len(s) - 1 for s in trainer.passes.ptx_sequences(trainer.ptx_texts))
    assert positions > 2 * chunk  # the full logits would have had this many rows
    assert 0 < seen.rows <= chunk
    assert record["loss/ptx"] > 0
