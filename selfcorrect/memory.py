"""Peak memory per process of each training stage, estimated from the run config before anything is launched.

``selfcorrect pipeline CONFIG --dry-run`` prints it; ``--device-memory GB`` flags a stage that will not fit. The
estimate is arithmetic on the model's ``config.json`` (read from a local directory, the embedded model, or the
Hugging Face cache: nothing is loaded or downloaded) and on the launcher's accelerate config (processes, ZeRO stage):

- **weights**: every model the stage holds (PPO: policy, value model, reference policy unless LoRA, reward model),
  in the run's dtype; under ZeRO-3 the trained models and the reference are split across the processes;
- **gradients** and **optimizer** (Adam's two fp32 moments, plus fp32 master weights when training in 16 bits under
  DeepSpeed) of the trained parameters: all of them, or the LoRA adapters (and the value head); split across the
  processes from ZeRO-2 (gradients) and ZeRO-1 (optimizer states) on; the EMA of the policy is one fp32 copy;
- **activations** of the largest batch with a graph (Korthikanti et al. 2022, "Reducing activation recomputation":
  ``34 s b h`` bytes per layer in 16 bits; with gradient checkpointing only each layer's input is kept, plus one
  layer's worth) and its **logits**: SFT's at every position (full vocabulary: in the model's dtype, once more in
  fp32, and their gradient); PPO's one chunk of ``ppo.logits_chunk_size`` positions at a time
  (:mod:`selfcorrect.train.logprobs`). For PPO the larger of two phases: the rollout (generation's KV cache, or one
  chunk of logits) and the update (policy and value graphs of a minibatch, the pretraining texts packed beside its
  episodes under PPO-ptx, every sequence at its longest, and one chunk of logits with its gradient);
- **overhead**: the runtime itself (the measured resident size of a process that has imported torch, transformers
  and TRL, about 1 GB on a CPU; the CUDA context on a GPU).

It is an estimate, within about 30% of the measured peak on a CPU run (tests/test_memory.py); allocator
fragmentation and temporary copies come on top on a GPU.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfcorrect.rundir import TRAINING_STAGES
from selfcorrect.train import compat

GB = 1e9
OVERHEAD_BYTES = 1.0 * GB  # runtime: torch + transformers + TRL imported (CPU resident size; ~ a CUDA context)
VLLM_OVERHEAD_BYTES = 1.0 * GB  # a vLLM engine beyond its weights and KV cache: CUDA graphs, sampler, activations
VLLM_MARGIN = 1.1  # vLLM's own profiling of a step's activations and fragmentation, on top of weights and KV cache
VLLM_TRAINING_SHARE = 0.9  # the most of a GPU an engine beside a trainer is given (the rest: the trainer's state)
VLLM_SCORING_SHARE = 0.6  # the most of a GPU an engine beside the evaluation's scorer is given
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_BYTES = 8  # two fp32 moments per trained parameter
ACTIVATION_FACTOR = 34  # bytes per (token x hidden unit) per layer in 16 bits, without recomputation (Korthikanti)

# config.json keys of the same quantity in the common model families
_ALIASES = {
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",),
}


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs of a model: its size and shape."""

    n_params: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    linear_shapes: tuple[tuple[str, int, int], ...] = ()  # (module name, in, out) of the layers LoRA can adapt

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_config(cls, config: dict[str, Any], n_params: int | None = None) -> Architecture:
        """From a ``config.json``; the parameter count from the weights' headers when known, else from the shapes
        of a decoder (attention, gated MLP, embeddings, tied or not)."""

        def get(name: str, default: int | None = None) -> int:
            for key in _ALIASES[name]:
                if config.get(key) is not None:
                    return int(config[key])
            if default is None:
                raise KeyError(f"config.json has none of {', '.join(_ALIASES[name])}")
            return default

        h, layers, heads = get("hidden"), get("layers"), get("heads")
        kv, inter, vocab = get("kv_heads", heads), get("intermediate", 4 * h), get("vocab")
        d = h // heads
        linears = (
            ("q_proj", h, heads * d),
            ("k_proj", h, kv * d),
            ("v_proj", h, kv * d),
            ("o_proj", heads * d, h),
            ("gate_proj", h, inter),
            ("up_proj", h, inter),
            ("down_proj", inter, h),
        )
        if n_params is None:
            per_layer = sum(i * o for _, i, o in linears) + 2 * h
            tied = config.get("tie_word_embeddings", True)
            n_params = vocab * h * (1 if tied else 2) + layers * per_layer + h
        return cls(n_params, h, layers, heads, kv, inter, vocab, tuple(s for s in linears for _ in range(layers)))

    def lora_params(self, r: int, target_modules: list[str] | str = "all-linear") -> int:
        """Trainable parameters of LoRA adapters of rank ``r`` on the decoder's linear layers named in
        ``target_modules`` (``"all-linear"``: every one)."""
        every = isinstance(target_modules, str) and target_modules == "all-linear"
        names = [target_modules] if isinstance(target_modules, str) else target_modules
        return sum(r * (i + o) for name, i, o in self.linear_shapes if every or name in names)


def safetensors_params(model_dir: Path) -> int | None:
    """The number of parameters in a directory's safetensors files, from their headers only (None if none)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


def architecture_of(ref: str) -> Architecture | str:
    """The architecture of a model reference, or why it is unknown (nothing is downloaded)."""
    from selfcorrect.models import EMBEDDED_PREFIX, resolve_model_path

    directory = Path(resolve_model_path(ref)) if ref.startswith(EMBEDDED_PREFIX) else Path(ref).expanduser()
    config_path = directory / "config.json"
    if not directory.is_dir():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
        if not isinstance(cached, str):
            return f"{ref}: config.json not in the Hugging Face cache"
        config_path = Path(cached)
    if (directory / "adapter_config.json").is_file() and not config_path.is_file():
        base = json.loads((directory / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return architecture_of(base) if base else f"{ref}: adapter without a base model"
    if not config_path.is_file():
        return f"{ref}: no config.json"
    try:
        return Architecture.from_config(json.loads(config_path.read_text()), safetensors_params(config_path.parent))
    except (KeyError, ValueError) as exc:
        return f"{config_path}: {exc}"


@dataclass(frozen=True)
class Launch:
    """How a stage is launched: processes (over all machines, as accelerate counts them), DeepSpeed ZeRO stage (None:
    no DeepSpeed), accelerate's mixed precision (no, bf16, fp16) and machines (nodes)."""

    processes: int = 1
    zero: int | None = None
    mixed_precision: str = "no"
    machines: int = 1

    @classmethod
    def from_launcher(cls, launcher: str | None) -> Launch:
        """From ``[srun ...] accelerate launch --config_file F [--num_processes N] [--num_machines M]`` (options as
        ``--key value`` or ``--key=value``; a launcher that is no accelerate launch counts as one process)."""
        import shlex

        import yaml

        from selfcorrect.config import shipped_file

        words: list[str] = []
        for word in shlex.split(launcher or ""):
            words += word.split("=", 1) if word.startswith("--") else [word]
        options = dict(zip(words, words[1:], strict=False))
        config: dict[str, Any] = {}
        if "--config_file" in options:
            path = shipped_file(options["--config_file"], "accelerate") or Path(options["--config_file"])
            config = yaml.safe_load(Path(path).read_text()) or {}
        processes = int(options.get("--num_processes", config.get("num_processes", 1)))
        zero = None
        if config.get("distributed_type") == "DEEPSPEED":
            zero = int((config.get("deepspeed_config") or {}).get("zero_stage", 0))
        mixed = str(options.get("--mixed_precision", config.get("mixed_precision", "no")))
        machines = int(options.get("--num_machines", config.get("num_machines", 1)))
        return cls(processes, zero, mixed, machines)


@dataclass
class Estimate:
    """Bytes per process, by component; ``total`` is their sum."""

    stage: str
    parts: dict[str, float] = field(default_factory=dict)
    phase: str = ""  # PPO: where the peak is (rollout or update)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        """One line: total and parts, in GB, and which part is the largest."""
        parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in self.parts.items() if v >= 0.05 * GB)
        where = f"; peak in the {self.phase}" if self.phase else ""
        largest = max(self.parts, key=self.parts.__getitem__)
        return f"{self.total / GB:.1f} GB ({parts}{where}; most: {largest})"


def _activations(arch: Architecture, sequences: int, length: int, act_bytes: int, checkpointing: bool) -> float:
    """Bytes of the activations kept for backward by one model over ``sequences`` x ``length`` tokens."""
    tokens_x_hidden = sequences * length * arch.hidden
    full_layer = ACTIVATION_FACTOR / 2 * act_bytes * tokens_x_hidden
    if checkpointing:
        return arch.layers * act_bytes * tokens_x_hidden + full_layer
    return arch.layers * full_layer


def _logits(arch: Architecture, sequences: int, positions: int, act_bytes: int, with_grad: bool) -> float:
    """Bytes of the logits of ``positions`` per sequence: in the model's dtype, once more in fp32, and a gradient."""
    per = act_bytes + 4 + (act_bytes if with_grad else 0)
    return sequences * positions * arch.vocab * per


def _logits_chunk(arch: Architecture, positions: int, act_bytes: int, with_grad: bool) -> float:
    """Bytes of one chunk of PPO's LM-head logits (:mod:`selfcorrect.train.logprobs`) over ``positions`` positions: in
    the model's dtype, in fp32 and the logsumexp's fp32 temporary; with a graph, the backward's recompute of the same
    and the fp32 gradient of the logits, its scatter and its copy in the model's dtype."""
    per = act_bytes + 4 + 4 + (4 + 4 + act_bytes if with_grad else 0)
    return positions * arch.vocab * per


def _kv_cache(arch: Architecture, sequences: int, tokens: int, act_bytes: int) -> float:
    """Bytes of the keys and values of ``sequences`` x ``tokens`` tokens in every layer."""
    return 2 * arch.layers * sequences * tokens * arch.kv_heads * arch.head_dim * act_bytes


def vllm_bytes(arch: Architecture, act_bytes: int, sequences: int, tokens: int) -> float:
    """GPU bytes a vLLM engine needs to sample ``sequences`` of up to ``tokens`` tokens at once: its own copy of the
    weights and the KV cache of the batch, with vLLM's margin, plus its fixed overhead (CUDA graphs, sampler)."""
    weights_and_cache = arch.n_params * act_bytes + _kv_cache(arch, sequences, tokens, act_bytes)
    return VLLM_MARGIN * weights_and_cache + VLLM_OVERHEAD_BYTES


def vllm_options(
    section: Any,
    model: Any,
    *,
    dtype: str,
    sequences: int,
    tokens: int,
    training: bool,
    device_bytes: float | None,
) -> Any:
    """The :class:`selfcorrect.engines.VLLMOptions` of a ``vllm:`` section for an engine in ``dtype`` holding
    ``model``'s weights (a loaded transformers model) that samples ``sequences`` of up to ``tokens`` tokens, beside a
    trainer (``training``) or a scorer, on a GPU of ``device_bytes`` (None: the CPU). Keys the section leaves out:
    ``gpu_memory_utilization`` from :func:`vllm_bytes` over the device (at most 0.9 beside a trainer, 0.6 beside a
    scorer); ``max_num_seqs`` vLLM's own default; ``sleep`` on for training on a GPU."""
    from selfcorrect.engines import GPU_MEMORY_UTILIZATION, VLLMOptions

    utilization = section.gpu_memory_utilization
    if utilization is None:
        utilization = GPU_MEMORY_UTILIZATION
        if device_bytes:
            arch = Architecture.from_config(model.config.to_dict(), sum(p.numel() for p in model.parameters()))
            share = vllm_bytes(arch, DTYPE_BYTES[dtype], sequences, tokens) / device_bytes
            utilization = round(min(VLLM_TRAINING_SHARE if training else VLLM_SCORING_SHARE, share), 3)
    sleep = section.sleep if section.sleep is not None else (training and device_bytes is not None)
    return VLLMOptions(utilization, section.max_num_seqs, section.enable_prefix_caching, sleep, dtype)


def _training_state(n_trained: int, dtype_bytes: int, launch: Launch) -> dict[str, float]:
    """Gradients and optimizer states of ``n_trained`` parameters, split as the ZeRO stage splits them."""
    zero, n = launch.zero, launch.processes
    master = 4 if (dtype_bytes == 2 and zero is not None) else 0
    optimizer = n_trained * (ADAM_BYTES + master) / (n if zero is not None and zero >= 1 else 1)
    gradients = n_trained * dtype_bytes / (n if zero is not None and zero >= 2 else 1)
    return {"gradients": gradients, "optimizer": optimizer}


def estimate_ppo(
    cfg: Any, arch: Architecture, launch: Launch, dtype: str, reward_arch: Architecture | None, gpu: bool = True
) -> Estimate:
    """Peak bytes per process of the PPO stage (``cfg``: a RunConfig with a ``ppo`` section); ``gpu``: on GPUs (a
    vLLM engine there is sized from the plan and sleeps during the update; on the CPU it holds its weights and 2 GiB
    of KV cache throughout)."""
    ppo, b = cfg.ppo, DTYPE_BYTES[dtype]
    split = launch.processes if launch.zero == 3 else 1
    lora = cfg.lora
    value = reward_arch or arch
    # 16-bit weights without DeepSpeed: the policy, value model (and, full fine-tuning, the reference) are held in
    # fp32 under autocast (selfcorrect.train.precision); their gradients too.
    held = 4 if (b == 2 and launch.zero is None) else b
    if lora is None:
        weights = (2 * arch.n_params + value.n_params) * held / split  # policy, reference, value model
        if reward_arch is not None:  # under LoRA the value model with its adapters off scores instead
            weights += reward_arch.n_params * b
        trained = arch.n_params + value.n_params
        ema = arch.n_params * 4 if ppo.ema_decay else 0
    else:
        weights = (arch.n_params + value.n_params) * b / split  # frozen 16-bit bases; the adapters are small
        adapters = arch.lora_params(lora.r, lora.target_modules)
        trained = adapters + value.lora_params(lora.r, lora.target_modules) + value.hidden
        ema = adapters * 4 if ppo.ema_decay else 0
    parts = {"weights": weights, **_training_state(trained, held if lora is None else b, launch), "ema": ema}
    checkpointing = compat.checkpointing_on(ppo.trainer, default=False)  # TrainingArguments' default
    chunk = ppo.logits_chunk_size
    episode = ppo.max_prompt_length + ppo.max_new_tokens  # every sequence at its longest: the worst case
    rollout = ppo.rollout_batch_size // launch.processes  # sequences per process
    logits = _logits_chunk(arch, min(chunk, rollout * ppo.max_new_tokens), b, with_grad=False)
    rollout_phase = {"kv_cache": _kv_cache(arch, rollout, episode, b), "logits": logits}  # transformers' generate
    engine = 0.0  # a vLLM engine's bytes held through the update (not asleep)
    if ppo.engine == "vllm":
        if gpu:  # sized from the plan (vllm_options), asleep during the update unless told otherwise
            rollout_phase = {"vllm": vllm_bytes(arch, min(b, 2), rollout, episode), "logits": logits}
            engine = rollout_phase["vllm"] if ppo.vllm.sleep is False else 0.0
        else:  # vllm-cpu: its weights and a 2 GiB KV cache, throughout
            from selfcorrect.engines import CPU_KV_CACHE_BYTES

            engine = arch.n_params * b + CPU_KV_CACHE_BYTES
            rollout_phase = {"vllm": engine, "logits": logits}
    ptx = ppo.gamma_ptx > 0 and ppo.ptx_data is not None
    # Packed (ppo.packing), the policy's forward holds the minibatch's episodes and the pretraining texts end to end;
    # padded, every row is as wide as the longest of them.
    ptx_rows, ptx_length = (ppo.ptx_batch_size, ppo.ptx_max_length) if ptx else (0, 0)
    if ppo.packing:
        policy_tokens = ppo.mini_batch_size * episode + ptx_rows * ptx_length
    else:
        policy_tokens = (ppo.mini_batch_size + ptx_rows) * max(episode, ptx_length)
    read = ppo.mini_batch_size * ppo.max_new_tokens + ptx_rows * ptx_length  # positions through the LM head
    update_phase = {
        "activations": _activations(arch, 1, policy_tokens, b, checkpointing)
        + _activations(value, ppo.mini_batch_size, episode, b, checkpointing),
        "logits": _logits_chunk(arch, min(chunk, read), b, with_grad=True),
        **({"vllm": engine} if engine else {}),
    }
    # generation's KV cache (or the engine) is freed before the rollout's forward pass: the larger phase counts
    rollout_peak = max(rollout_phase.values())
    if rollout_peak > sum(update_phase.values()):
        phase = "rollout"
        parts.update({k: v for k, v in rollout_phase.items() if v == rollout_peak})
    else:
        phase = "update"
        parts.update(update_phase)
    parts["overhead"] = OVERHEAD_BYTES
    return Estimate("ppo", parts, phase)


def estimate_supervised(
    stage: str, trainer: dict[str, Any], arch: Architecture, lora: Any, launch: Launch, dtype: str, length: int
) -> Estimate:
    """Peak bytes per process of SFT (``stage`` "sft": LM logits at every position) or reward-model training
    ("reward": two sequences per pair, a scalar head)."""
    b = DTYPE_BYTES[dtype]
    split = launch.processes if launch.zero == 3 else 1
    trained = arch.n_params if lora is None else arch.lora_params(lora.r, lora.target_modules)
    parts = {"weights": arch.n_params * b / split, **_training_state(trained, b, launch)}
    sequences = int(trainer.get("per_device_train_batch_size", 8)) * (2 if stage == "reward" else 1)
    checkpointing = compat.checkpointing_on(trainer, default=True)  # TRL's SFTConfig and RewardConfig default
    parts["activations"] = _activations(arch, sequences, length, b, checkpointing)
    if stage == "sft":
        parts["logits"] = _logits(arch, sequences, length, b, with_grad=True)
    parts["overhead"] = OVERHEAD_BYTES
    return Estimate(stage, parts)


def estimate_run(cfg: Any, launch: Launch, dtype: str, gpu: bool = True) -> dict[str, Estimate | str]:
    """Each training stage's estimate for a RunConfig, or why it cannot be made (an unknown architecture)."""
    arch = architecture_of(cfg.model.name_or_path)
    stages = [s for s in TRAINING_STAGES if getattr(cfg, s) is not None]
    if isinstance(arch, str):
        return dict.fromkeys(stages, arch)
    out: dict[str, Estimate | str] = {}
    if cfg.sft is not None:
        out["sft"] = estimate_supervised("sft", cfg.sft.trainer, arch, cfg.lora, launch, dtype, cfg.sft.max_length)
    if cfg.reward is not None and cfg.reward.function is None:
        reward = cfg.reward
        out["reward"] = estimate_supervised("reward", reward.trainer, arch, cfg.lora, launch, dtype, reward.max_length)
    if cfg.ppo is not None:
        function_reward = (cfg.reward is not None and cfg.reward.function is not None) or (
            cfg.ppo.reward_model is not None and ":" in cfg.ppo.reward_model
        )
        out["ppo"] = estimate_ppo(cfg, arch, launch, dtype, None if function_reward else arch, gpu)
    return out
