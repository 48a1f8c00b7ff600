"""Shared fixtures: a throw-away model cache, a tiny random Llama, and the real embedded model."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from selfcorrect.models import embedded_gguf_path, prepare_embedded


@pytest.fixture(scope="session", autouse=True)
def selfcorrect_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point SELFCORRECT_CACHE_DIR at a test cache for the whole session, never at the user's cache.

    The cache is $SELFCORRECT_TEST_CACHE_DIR if set (so CI can keep the embedded model's conversion
    between runs), else a fresh temporary directory.
    """
    configured = os.environ.get("SELFCORRECT_TEST_CACHE_DIR")
    path = Path(configured) if configured else tmp_path_factory.mktemp("selfcorrect-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SELFCORRECT_CACHE_DIR", str(path))
        yield path


def tiny_llama(tokenizer, *, family: tuple[type, type] = (LlamaConfig, LlamaForCausalLM), **overrides):
    """A seeded tiny random Llama (2 layers, hidden size 64) sized for ``tokenizer``; ``family``: another
    (config class, model class) of the same shape, e.g. Mistral's."""
    config_class, model_class = family
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    torch.manual_seed(0)
    return model_class(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (2 layers, hidden size 64) with the real SmolLM2 tokenizer, saved as safetensors.

    The tokenizer is read straight from the embedded GGUF file (a few seconds; no model conversion).
    """
    gguf_path = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = tiny_llama(tokenizer, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    tokenizer.save_pretrained(out)
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def peaked_policy_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny random Llama whose next-token distribution is peaked (scaled, untied LM head), so a few dozen
    sampled episodes cover its likely tokens and PPO can move probability mass between them."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_llama(tok, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    out = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedded_model_dir(selfcorrect_cache_dir: Path) -> Path:
    """The real embedded SmolLM2-135M-Instruct, converted at most once per session (about 30 s)."""
    return prepare_embedded()


def make_ppo_trainer(
    policy_dir: Path,
    run_dir: Path,
    reward_fn,
    prompts: list[list[dict]] | None = None,
    dialogue=None,
    policy=None,
    value=None,
    value_from_reward: bool = False,
    **overrides,
):
    """A PPOPtxTrainer on a tiny model directory: the policy (or ``policy``), a value model with a new head (or
    ``value``), a function reward, 24 short prompts (or ``prompts``) and two ptx texts; ``overrides`` go to the
    PPOSection."""
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from selfcorrect.config import DatasetSpec
    from selfcorrect.config.ppo import PPOSection
    from selfcorrect.train.ppo import PPOPtxTrainer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    tok.padding_side = "left"
    policy = policy if policy is not None else LlamaForCausalLM.from_pretrained(policy_dir)
    if value is None:
        torch.manual_seed(0)  # the value model's new scalar head: the same in every trainer
        value = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
        value.config.pad_token_id = tok.pad_token_id
    settings = dict(
        prompts=DatasetSpec(path="unused", format="prompt"),
        steps=8,
        save_at_steps=[0],
        ptx_data=DatasetSpec(path="unused", format="text"),
        rollout_batch_size=8,
        mini_batch_size=4,
        max_new_tokens=8,
        learning_rate=2e-3,
        kl_coef=0.01,
    )
    ppo = PPOSection(**{**settings, **overrides})
    args = TrainingArguments(
        output_dir=str(run_dir / "trainer"), report_to="none", seed=0, disable_tqdm=True, **ppo.trainer
    )
    if prompts is None:
        prompts = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(24)]
    ptx = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine."]
    return PPOPtxTrainer(
        ppo,
        args,
        policy,
        value,
        tok,
        reward_fn,
        prompts,
        ptx_texts=ptx,
        run_dir=run_dir,
        config_hash="test",
        dialogue=dialogue,
        value_from_reward=value_from_reward,
    )


def last_ppo_step(run_dir: Path) -> int:
    """The RLHF step that ``run_dir/ppo/last/`` holds (-1 while there is none, or while it is being replaced)."""
    try:
        return json.loads((run_dir / "ppo" / "last" / "state.json").read_text())["state"]["step"]
    except (OSError, ValueError, KeyError):
        return -1


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 600) -> None:
    """Poll ``ready()`` while ``proc`` runs; fail if ``proc`` ends or ``timeout`` passes first (nothing to kill)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            return
        time.sleep(0.05)
    raise AssertionError(f"the process ended (exit {proc.poll()}) or timed out before it could be killed")
