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


def tiny_llama(tokenizer, **overrides) -> LlamaForCausalLM:
    """A seeded tiny random Llama (2 layers, hidden size 64) sized for ``tokenizer``."""
    config = LlamaConfig(
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
    return LlamaForCausalLM(config)


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
def embedded_model_dir(selfcorrect_cache_dir: Path) -> Path:
    """The real embedded SmolLM2-135M-Instruct, converted at most once per session (about 30 s)."""
    return prepare_embedded()


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
