"""What can be checked before anything trains: the run dir is writable, every training stage's trainer arguments
build, local data and model paths exist, function rewards import, the engines and the launcher are found.
References to the Hugging Face Hub that cannot be checked while it is unreachable are returned, not raised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfcorrect.config.run import RunConfig
from selfcorrect.errors import UserError
from selfcorrect.pipeline.launch import launcher_command


def _model_refs(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """``(stage, key, reference)`` of every model the stages load."""
    refs = []
    if cfg.sft is not None or cfg.reward is not None or (cfg.ppo is not None and cfg.ppo.policy is None):
        refs.append(("sft" if cfg.sft is not None else "reward", "model.name_or_path", cfg.model.name_or_path))
    if cfg.ppo is not None and cfg.ppo.policy is not None:
        refs.append(("ppo", "ppo.policy", cfg.ppo.policy))
    if cfg.ppo is not None and cfg.ppo.reward_model is not None and ":" not in cfg.ppo.reward_model:
        refs.append(("ppo", "ppo.reward_model", cfg.ppo.reward_model))
    if cfg.evaluation is not None:
        refs += [("evaluate", "evaluation.models", ref) for ref in cfg.evaluation.models]
    return refs


def _datasets(cfg: RunConfig) -> list[tuple[str, str, Any]]:
    """``(stage, key, DatasetSpec)`` of every dataset the training stages read."""
    specs = []
    for stage, keys in (("sft", ("data", "ptx_data")), ("reward", ("data",)), ("ppo", ("prompts", "ptx_data"))):
        section = getattr(cfg, stage)
        for key in keys if section is not None else ():
            if getattr(section, key, None) is not None:
                specs.append((stage, f"{stage}.{key}", getattr(section, key)))
    return specs


def check_config(cfg: RunConfig, path: Path, launcher: str | None) -> dict[str, list[str]]:
    """Check what can be checked without training, raising a one-line UserError at the first problem.

    The run dir is writable; every training stage's trainer arguments build (as on a machine with the run's devices:
    on a CPU-only machine they are built for the CPU, so ``bf16: true`` is checked for the rest); local data and
    model paths exist; function rewards import; the launcher is found. References to the Hugging Face Hub cannot be
    checked while it is unreachable: they are returned per stage, ``{stage: [notes]}``, for the caller to decide.
    """
    import torch

    from selfcorrect import hub
    from selfcorrect.data import dataset_source
    from selfcorrect.io import check_writable_dir
    from selfcorrect.memory import Launch
    from selfcorrect.models import EMBEDDED_PREFIX, embedded_gguf_path

    check_writable_dir(cfg.root(), "output_dir")
    launcher_command(launcher)
    cpu = {} if torch.cuda.is_available() else {"use_cpu": True}
    launched = Launch.from_launcher(launcher)  # the precision plan of each stage, as the launcher will run it
    launch = {"deepspeed": launched.zero is not None, "mixed_precision": launched.mixed_precision}
    if cfg.sft is not None:
        from selfcorrect.train.sft import sft_config, sft_precision

        sft = cfg.sft.model_copy(update={"trainer": {**cfg.sft.trainer, **cpu}})
        precision = sft_precision(cfg.sft, cfg.model, cfg.lora, **launch)
        sft_config(sft, cfg.run_dir().sft, cfg.seed, "none", has_eval=cfg.sft.data.test_size > 0, precision=precision)
    if cfg.reward is not None and cfg.reward.function is not None:
        from selfcorrect.reward_models.score import load_function

        load_function(cfg.reward.function)
    elif cfg.reward is not None:
        from selfcorrect.train.reward import build_reward_config, reward_precision

        reward = cfg.reward.model_copy(update={"trainer": {**cfg.reward.trainer, **cpu}})
        precision = reward_precision(cfg.reward, cfg.model, **launch)
        build_reward_config(reward, cfg.run_dir().reward, cfg.seed, "none", precision)
    if cfg.ppo is not None:
        from selfcorrect.recipes.ppo import ppo_precision, training_arguments

        ppo_precision(cfg, **launch)
        training_arguments(cfg, path, extra=cpu, report="none")
        if cfg.ppo.reward_model is not None and ":" in cfg.ppo.reward_model:
            from selfcorrect.reward_models.score import load_function

            load_function(cfg.ppo.reward_model)
    from selfcorrect.engines import check_engine, check_vllm_section

    for name, section in (("ppo", cfg.ppo), ("evaluation", cfg.evaluation)):
        if section is not None:
            check_engine(section.engine)
            if section.engine == "vllm":
                check_vllm_section(section.vllm, f"{name}.vllm")
    if cfg.evaluation is not None and cfg.evaluation.device is not None:
        from selfcorrect.models import check_device

        check_device(cfg.evaluation.device, "evaluation.device")

    unchecked: dict[str, list[str]] = {}
    for stage, key, spec in _datasets(cfg):
        if dataset_source(spec, f"{path}: {key}.path") == "hub" and not hub.offline_mode() and hub.unreachable():
            unchecked.setdefault(stage, []).append(f"{key}.path {spec.path} (a Hub dataset; the Hub is unreachable)")
    for stage, key, ref in _model_refs(cfg):
        if ref.startswith(EMBEDDED_PREFIX):
            embedded_gguf_path(ref[len(EMBEDDED_PREFIX) :])
        elif Path(ref).expanduser().exists() or _looks_like_path(ref):
            if not Path(ref).expanduser().is_dir():
                raise UserError(f"{path}: {key}: {ref}: no such model directory")
        elif not hub.offline_mode() and hub.unreachable():
            unchecked.setdefault(stage, []).append(f"{key} {ref} (a Hub model; the Hub is unreachable)")
    return unchecked


def _looks_like_path(ref: str) -> bool:
    from selfcorrect.models import looks_like_local_path

    return looks_like_local_path(ref)
