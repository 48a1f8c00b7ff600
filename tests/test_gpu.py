"""What only a CUDA device can show (``pytest -m gpu``; benchmarks/gpu_check.sh runs them on a lent GPU).

Skipped without CUDA: the CPU suite checks the same behaviour where it can run (tests/test_logprobs.py,
tests/test_devices.py, tests/test_precision.py, tests/test_vllm.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_ppo_trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (pytest -m gpu on a GPU machine)"),
]


def test_chunked_logprobs_on_cuda_equal_the_full_logits_and_hold_a_chunk_of_memory():
    """On CUDA (bf16 weights): the chunked log-probs and gradients equal the full computation, and the peak memory of
    forward and backward grows by about a chunk of logits, not the whole batch's."""
    from selfcorrect.train import ppo_core as core
    from selfcorrect.train.logprobs import token_logprobs

    torch.manual_seed(0)
    vocab, width, positions, chunk = 49152, 576, 4096, 256
    head = torch.nn.Linear(width, vocab, bias=False).cuda().bfloat16()
    hidden = torch.randn(positions, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,), device="cuda")
    full = core.logprobs_from_logits(head(hidden), targets)
    (full_grad,) = torch.autograd.grad(full.sum(), hidden)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    chunked, _ = token_logprobs(head, hidden, targets, chunk_size=chunk)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), hidden)
    peak = torch.cuda.max_memory_allocated() - start
    assert torch.allclose(chunked, full, atol=1e-3)
    assert torch.allclose(chunked_grad.float(), full_grad.float(), atol=2e-2)
    assert peak < 0.25 * positions * vocab * 4  # less than a quarter of one fp32 copy of the whole batch's logits


def test_a_rollout_on_cuda_keeps_every_tensor_on_the_gpu(peaked_policy_dir, tmp_path):
    reward = lambda p, r: torch.rand(len(r))  # noqa: E731
    trainer = make_ppo_trainer(peaked_policy_dir, tmp_path / "run", reward, rollout_batch_size=4, mini_batch_size=4)
    assert trainer.accelerator.device.type == "cuda"
    roll = trainer.rollout(trainer.step_prompts(0))
    trainer.score(roll)
    trainer.advantages(roll)
    devices = {f.name: getattr(roll, f.name).device for f in dataclasses.fields(roll)
               if isinstance(getattr(roll, f.name), torch.Tensor)}  # fmt: skip
    assert set(devices.values()) == {trainer.accelerator.device}, devices
    assert 0 <= trainer.rollout_stats(roll)["eos_rate"] <= 1


def test_a_sleeping_vllm_engine_frees_the_gpu_and_samples_the_reloaded_weights(peaked_policy_dir):
    """vLLM's sleep mode on CUDA: asleep, the engine gives its memory back; loading the next weights wakes it, and it
    samples from them."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from selfcorrect import engines
    from selfcorrect.models import load_model

    if engines.cpu_build():
        pytest.skip("the installed vLLM is its CPU build")
    model, tokenizer = load_model(str(peaked_policy_dir), dtype="bfloat16", device="cuda")
    options = engines.VLLMOptions(gpu_memory_utilization=0.3, sleep=True)
    engine = engines.VLLMEngine(model, tokenizer, options)
    try:
        prompt = [tokenizer("Once upon a time")["input_ids"]]
        first = engine.sample(prompt, [1], max_new_tokens=8, temperature=1.0, top_p=1.0, stop=[])
        free_awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        assert engine.asleep and torch.cuda.mem_get_info()[0] > free_awake + 0.05 * torch.cuda.mem_get_info()[1]
        engine.load(model)
        again = engine.sample(prompt, [1], max_new_tokens=8, temperature=1.0, top_p=1.0, stop=[])
        assert not engine.asleep and again[0].token_ids == first[0].token_ids
    finally:
        engine.close()


def test_the_fused_ptx_loss_equals_the_chunked_one(peaked_policy_dir):
    """Liger-Kernel's fused linear cross-entropy (the gpu extra) gives the pretraining loss and its gradients of the
    chunked torch path."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install 'selfcorrect[gpu]')")
    from selfcorrect.models import load_model
    from selfcorrect.train import ppo_core as core
    from selfcorrect.train.logprobs import fused_ptx_loss, output_head, token_logprobs

    model, _ = load_model(str(peaked_policy_dir), dtype="float32", device="cuda")
    head = output_head(model)
    torch.manual_seed(0)
    hidden = torch.randn(300, model.config.hidden_size, device="cuda", requires_grad=True)
    targets = torch.randint(0, model.config.vocab_size, (300,), device="cuda")
    chunked = core.ptx_loss_from_logprobs(token_logprobs(head, hidden, targets, chunk_size=64)[0])
    fused = fused_ptx_loss(head, hidden, targets)
    assert torch.allclose(fused, chunked, atol=1e-4)
    (chunked_grad,) = torch.autograd.grad(chunked, hidden)
    (fused_grad,) = torch.autograd.grad(fused_ptx_loss(head, hidden, targets), hidden)
    assert torch.allclose(fused_grad, chunked_grad, atol=1e-5)
