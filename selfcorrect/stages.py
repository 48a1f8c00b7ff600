"""One run config, three training stages: ``selfcorrect sft | reward | ppo CONFIG``.

A run config (YAML) names the model, optional LoRA, the dialogue format and one section per stage; every stage
writes into the run directory (``output_dir``, default ``runs/<name>``; its layout is :mod:`selfcorrect.rundir`'s).
Each stage reads only what earlier stages wrote, so any stage can be rerun alone.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from selfcorrect import tracking
from selfcorrect.config import LoraSection, ModelSection, StrictModel, TrackingSection, load_config, shipped_file
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError, first_line
from selfcorrect.evaluate.runner import EvaluationSection
from selfcorrect.reward_models.train import RewardSection
from selfcorrect.rundir import RunDir, trainer_dir
from selfcorrect.train.ppo import PPOPtxTrainer, PPOSection
from selfcorrect.train.sft import SFTSection


class RunConfig(StrictModel):
    """A run: model, LoRA, and the sections of the stages it uses."""

    name: str
    output_dir: str | None = None
    seed: int = Field(0, ge=0)
    model: ModelSection = ModelSection()
    dialogue: DialogueSpec = DialogueSpec()  # one format for SFT, reward model, PPO and evaluation (dialogue.py)
    lora: LoraSection | None = None
    sft: SFTSection | None = None
    reward: RewardSection | None = None
    ppo: PPOSection | None = None
    evaluation: EvaluationSection | None = None
    tracking: TrackingSection = TrackingSection()
    # `selfcorrect pipeline` starts each training stage as `<launcher> -m selfcorrect <stage> CONFIG`;
    # default: this Python. E.g. "accelerate launch --config_file accelerate/deepspeed_zero2.yaml" (a shipped file)
    launcher: str | None = None

    def root(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name)

    def run_dir(self) -> RunDir:
        """The paths of this run's directory."""
        return RunDir(self.root())


def load_run_config(path: str | Path) -> RunConfig:
    """Load and validate a run config: a path, or a shipped pipeline's name (one-line errors naming the file and
    field)."""
    return load_config(shipped_file(path, "pipelines") or path, RunConfig)


def _section(cfg: RunConfig, name: str, path: Path):
    section = getattr(cfg, name)
    if section is None:
        raise UserError(f"{path}: {name}: the config has no '{name}' section")
    return section


def report_to(cfg: RunConfig, stage: str) -> str:
    """The trainers' ``report_to`` for one stage (W&B runs grouped by the run name)."""
    return tracking.report_to(cfg.tracking, cfg.name, stage, cfg.root())


def run_sft_stage(cfg: RunConfig, path: Path) -> Path:
    """SFT on the demonstrations (TRL SFTTrainer)."""
    from selfcorrect.train.sft import run_sft

    section = _section(cfg, "sft", path)
    out = cfg.run_dir().sft
    return run_sft(section, cfg.model, cfg.lora, out, cfg.seed, report_to=report_to(cfg, "sft"), dialogue=cfg.dialogue)


def _policy_ref(cfg: RunConfig) -> str:
    sft_dir = cfg.run_dir().sft
    return str(sft_dir) if (sft_dir / "manifest.json").exists() else cfg.model.name_or_path


def run_reward_stage(cfg: RunConfig, path: Path) -> Path:
    """Train the reward model (pairwise or K-wise) or record a function reward."""
    from selfcorrect import data
    from selfcorrect.reward_models.train import run_reward

    section = _section(cfg, "reward", path)
    train_ds = eval_ds = None
    if section.function is None:
        build = data.ranked_dataset if section.loss == "kwise" else data.preference_dataset
        train_ds, eval_ds = data.train_test_split(build(section.data, cfg.seed), section.data.test_size, cfg.seed)
    demonstrations = None
    if cfg.sft is not None:
        demonstrations = list(data.sft_dataset(cfg.sft.data, cfg.seed)["messages"])
    start = ModelSection(**{**cfg.model.model_dump(), "name_or_path": _policy_ref(cfg)})
    return run_reward(
        section,
        start,
        cfg.lora,
        cfg.run_dir().reward,
        cfg.seed,
        train_ds,
        eval_ds,
        demonstrations=demonstrations,
        report_to=report_to(cfg, "reward"),
        dialogue=cfg.dialogue,
    )


def ppo_training_arguments(cfg: RunConfig, path: Path, extra: dict | None = None, report: str | None = None):
    """The PPO stage's ``TrainingArguments``: our defaults, the launch's device settings, then ``ppo.trainer`` (and
    ``extra``: what a check on another machine adds, e.g. ``use_cpu``)."""
    from transformers import TrainingArguments

    from selfcorrect.train.distributed import trainer_device_kwargs

    ppo = _section(cfg, "ppo", path)
    trainer_kwargs = {
        "lr_scheduler_type": "constant",  # unused: PPOPtxTrainer.create_scheduler is InstructGPT's warmup + constant
        "adam_beta2": 0.95,  # InstructGPT: Adam betas (0.9, 0.95)
        "logging_steps": 1,
        "save_strategy": "no",
        "per_device_train_batch_size": ppo.mini_batch_size,  # DeepSpeed's micro batch: episodes per optimizer step
        **trainer_device_kwargs(),
        **ppo.trainer,
        **(extra or {}),
    }
    try:
        return TrainingArguments(
            output_dir=str(trainer_dir(cfg.run_dir().ppo)),
            learning_rate=ppo.learning_rate,
            seed=cfg.seed,
            report_to=report or report_to(cfg, "ppo"),
            **trainer_kwargs,
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{path}: ppo.trainer: {first_line(exc)}") from None


def build_ppo_trainer(cfg: RunConfig, path: Path) -> PPOPtxTrainer:
    """The PPO-ptx trainer of a run config: policy (from SFT), value model (from the reward model), reward, data.

    With ``lora`` the policy and the value model each get LoRA adapters (the value model's scalar head is trained
    in full), so only adapters and that head are trained; without it both are trained in full.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from selfcorrect import data
    from selfcorrect.models import load_model, resolve_model_path
    from selfcorrect.provenance import config_hash
    from selfcorrect.reward_models.score import RewardModel
    from selfcorrect.train.checkpoints import validate_save_at_steps

    ppo = _section(cfg, "ppo", path)
    validate_save_at_steps(ppo.save_at_steps, ppo.steps, where=f"{path}: ppo.save_at_steps")
    run_dir = cfg.run_dir().ppo
    args = ppo_training_arguments(cfg, path)  # before loading anything: a bad launch or trainer key fails fast
    prompts = list(data.prompt_dataset(ppo.prompts, cfg.seed)["prompt"])
    ptx = list(data.ptx_dataset(ppo.ptx_data, cfg.seed)["text"]) if ppo.ptx_data else None
    policy_ref = ppo.policy or _policy_ref(cfg)
    reward_ref = ppo.reward_model or str(cfg.run_dir().reward)
    if ":" not in reward_ref and not Path(reward_ref).is_dir():
        raise UserError(f"{path}: ppo.reward_model: {reward_ref} not found (run `selfcorrect reward` first)")
    reward = RewardModel.load(reward_ref)  # on this process's own device

    policy, tokenizer = load_model(policy_ref, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    policy.train()
    if cfg.lora is not None:
        torch.manual_seed(cfg.seed)  # random adapter init: the same in every run (a rerun, a resume) and process
        policy = get_peft_model(policy, cfg.lora.peft_config("CAUSAL_LM"))
        # The adapter sits on the SFT policy (merged), so that is its base when a checkpoint is reloaded.
        base = Path(policy_ref).expanduser()
        policy.peft_config["default"].base_model_name_or_path = str(base.resolve()) if base.exists() else policy_ref
    torch.manual_seed(cfg.seed)  # a new value head (function rewards) and the value adapters: likewise
    value_source = reward_ref if reward.function is None else resolve_model_path(policy_ref)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        value_source, num_labels=1, use_safetensors=True, dtype=policy.dtype
    )
    value_model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora is not None:  # adapters + the scalar head are trained; the base stays frozen (no grads, no Adam)
        value_model = get_peft_model(value_model, cfg.lora.peft_config("SEQ_CLS"))
    tokenizer.padding_side = "left"

    hashed = {
        "model": cfg.model.model_dump(),
        "lora": cfg.lora and cfg.lora.model_dump(),
        "ppo": ppo.model_dump(),
        "seed": cfg.seed,
        "policy": policy_ref,
        "reward": reward_ref,
        "dialogue": cfg.dialogue.record(),
    }
    if cfg.lora is not None:  # runs from before the value model had adapters cannot resume from its last/
        hashed["value_model"] = "lora"
    return PPOPtxTrainer(
        ppo,
        args,
        policy,
        value_model,
        tokenizer,
        reward,
        prompts,
        ptx_texts=ptx,
        run_dir=run_dir,
        config_hash=config_hash(hashed),
        manifest_extra={"policy_init": policy_ref, "reward_model": reward_ref, "run": cfg.name},
        dialogue=cfg.dialogue,
    )


def run_ppo_stage(cfg: RunConfig, path: Path) -> Path:
    """PPO-ptx from the SFT policy against the reward model; checkpoints at ppo.save_at_steps."""
    build_ppo_trainer(cfg, path).train()
    return cfg.run_dir().ppo
