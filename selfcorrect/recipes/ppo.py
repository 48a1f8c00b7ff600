"""The PPO-ptx recipe: the run config turned into a :class:`~selfcorrect.train.ppo.PPOPtxTrainer` and run.

``PPORecipe(cfg, path).setup()`` builds, in order: the trainer arguments (first: a bad launch or trainer key fails
before anything loads), the data (prompts, ptx texts), the reward (a trained model on this process's device, or a
function), the models (the policy from the SFT stage; the value model from the reward model; LoRA adapters on both
with ``lora``), and the trainer, whose ``create_optimizer`` / ``create_scheduler`` are InstructGPT's (param groups
for policy and value, warmup then constant). ``train()`` runs the RLHF steps, resuming from ``last/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfcorrect.config.run import RunConfig, report_to
from selfcorrect.errors import UserError, first_line
from selfcorrect.rundir import trainer_dir


def training_arguments(cfg: RunConfig, path: Path, extra: dict | None = None, report: str | None = None):
    """The PPO stage's ``TrainingArguments``: our defaults, the launch's device settings, then ``ppo.trainer`` (and
    ``extra``: what a check on another machine adds, e.g. ``use_cpu``)."""
    from transformers import TrainingArguments

    from selfcorrect.train import compat
    from selfcorrect.train.distributed import trainer_device_kwargs

    ppo = cfg.section("ppo", path)
    precision = ppo_precision(cfg)
    trainer_kwargs = {
        "lr_scheduler_type": "constant",  # unused: PPOPtxTrainer.create_scheduler is InstructGPT's warmup + constant
        "adam_beta2": 0.95,  # InstructGPT: Adam betas (0.9, 0.95)
        "logging_steps": 1,
        "save_strategy": "no",
        "per_device_train_batch_size": ppo.mini_batch_size,  # DeepSpeed's micro batch: episodes per optimizer step
        **trainer_device_kwargs(),
        **compat.installed_names(ppo.trainer),
        **precision.trainer_args,  # the 16-bit autocast of fp32 master weights, or DeepSpeed's mixed precision
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


def _process_device() -> str:
    """This process's device as accelerate assigns it (``cuda:<local rank>`` under a multi-GPU launch), by name."""
    from accelerate import PartialState

    device = PartialState().device
    return "cpu" if device.type == "cpu" else str(device)


def ppo_precision(cfg: RunConfig, **launch: Any):
    """How PPO trains the run's model (:func:`selfcorrect.train.precision.for_stage`); ``launch``: its keyword
    arguments for a launch other than this process's (the dry run)."""
    from selfcorrect.train.precision import for_stage

    assert cfg.ppo is not None  # every caller has checked the ppo section
    return for_stage(cfg.model.dtype, cfg.ppo.trainer, "ppo.trainer", **launch)


class PPORecipe:
    """PPO-ptx from the SFT policy against the reward model; checkpoints at ``ppo.save_at_steps``.

    With ``lora`` the policy and the value model each get LoRA adapters (the value model's scalar head is trained
    in full), so only adapters and that head are trained; without it both are trained in full.
    """

    def __init__(self, cfg: RunConfig, path: Path):
        self.cfg, self.path = cfg, path
        self.ppo = cfg.section("ppo", path)
        self.policy_ref = self.ppo.policy or cfg.policy_start()
        self.reward_ref = self.ppo.reward_model or str(cfg.run_dir().reward)
        self.precision = ppo_precision(cfg)

    def setup(self):
        """Build everything the trainer needs and return the trainer (nothing is trained yet)."""
        from selfcorrect.engines import check_engine
        from selfcorrect.train.ppo import PPOPtxTrainer

        args = training_arguments(self.cfg, self.path)  # before loading anything
        check_engine(self.ppo.engine)
        prompts, ptx = self._setup_data()
        reward = self._setup_reward()
        policy, value_model, tokenizer = self._setup_model(reward)
        return PPOPtxTrainer(  # its create_optimizer / create_scheduler: param groups, warmup then constant
            self.ppo,
            args,
            policy,
            value_model,
            tokenizer,
            reward,
            prompts,
            ptx_texts=ptx,
            run_dir=self.cfg.run_dir().ppo,
            config_hash=self._config_hash(),
            manifest_extra={
                "policy_init": self.policy_ref,
                "reward_model": self.reward_ref,
                "run": self.cfg.name,
                "precision": self.precision.describe(),
            },
            dialogue=self.cfg.dialogue,
            ref_policy=self._setup_ref_policy(),
            value_from_reward=reward.model is not None,  # _setup_model: the value model is a copy of the reward model
            reward_name=self._reward_name(reward),
        )

    def _setup_data(self) -> tuple[list[list[dict]], list[str] | None]:
        from selfcorrect import data

        prompts = list(data.prompt_dataset(self.ppo.prompts, self.cfg.seed)["prompt"])
        ptx = list(data.ptx_dataset(self.ppo.ptx_data, self.cfg.seed)["text"]) if self.ppo.ptx_data else None
        return prompts, ptx

    def _setup_reward(self):
        from selfcorrect.reward_models.score import RewardModel

        if ":" not in self.reward_ref and not Path(self.reward_ref).is_dir():
            raise UserError(f"{self.path}: ppo.reward_model: {self.reward_ref} not found (run `selfcorrect reward`)")
        return RewardModel.load(self.reward_ref)  # on this process's own device

    def _reward_name(self, reward) -> str:
        """How a failing reward is named: as the config gives it (``module:function`` or the reward model's directory),
        with the function a reward directory names (``reward.function``)."""
        from selfcorrect.reward_models.score import read_manifest

        path = Path(self.reward_ref).expanduser()
        if reward.function is None or not path.is_dir():
            return self.reward_ref
        function = (read_manifest(path) or {}).get("function")
        return f"{self.reward_ref} ({function})" if function else self.reward_ref

    def _setup_model(self, reward) -> tuple[Any, Any, Any]:
        """The policy (train mode), the value model (from the reward model, or the policy's base with a new head for
        a function reward), with LoRA adapters when asked, and the left-padding tokenizer. Both load on this process's
        device in the run's dtype; their trained parameters are then held in fp32 where the precision plan says so
        (:mod:`selfcorrect.train.precision`)."""
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForSequenceClassification

        from selfcorrect.models import load_model, resolve_model_path
        from selfcorrect.train.precision import upcast_trainable

        cfg, precision = self.cfg, self.precision
        policy, tokenizer = load_model(
            self.policy_ref,
            dtype=precision.weights,
            device=_process_device(),
            trust_remote_code=cfg.model.trust_remote_code,
        )
        policy.train()
        if cfg.lora is not None:
            torch.manual_seed(cfg.seed)  # random adapter init: the same in every run (a rerun, a resume) and process
            policy = get_peft_model(policy, cfg.lora.peft_config("CAUSAL_LM"))
            # The adapter sits on the SFT policy (merged), so that is its base when a checkpoint is reloaded.
            base = Path(self.policy_ref).expanduser()
            config = policy.peft_config["default"]
            config.base_model_name_or_path = str(base.resolve()) if base.exists() else self.policy_ref
        torch.manual_seed(cfg.seed)  # a new value head (function rewards) and the value adapters: likewise
        value_source = self.reward_ref if reward.function is None else resolve_model_path(self.policy_ref)
        value_model = AutoModelForSequenceClassification.from_pretrained(
            value_source, num_labels=1, use_safetensors=True, dtype=precision.weights
        )
        value_model.config.pad_token_id = tokenizer.pad_token_id
        if cfg.lora is not None:  # adapters + the scalar head are trained; the base stays frozen (no grads, no Adam)
            value_model = get_peft_model(value_model, cfg.lora.peft_config("SEQ_CLS"))
        if precision.master_fp32:
            upcast_trainable(policy)
            upcast_trainable(value_model)
        tokenizer.padding_side = "left"
        return policy, value_model, tokenizer

    def _setup_ref_policy(self):
        """The frozen reference policy (the KL anchor), loaded on its own; None under LoRA (the adapters switched off).

        Loaded, not copied from the policy: under DeepSpeed ZeRO-3 transformers loads a model already split across
        the processes, and a copy of split weights is empty.
        """
        if self.cfg.lora is not None:
            return None

        from selfcorrect.models import load_model

        cfg, precision = self.cfg, self.precision
        ref, _ = load_model(
            self.policy_ref,
            dtype=precision.weights,
            device=_process_device(),
            trust_remote_code=cfg.model.trust_remote_code,
        )
        # With fp32 master weights the policy starts in fp32: so does its reference, so their KL starts at exactly 0.
        return ref.float() if precision.master_fp32 else ref

    def _config_hash(self) -> str:
        """What ``last/`` must match for a resume (the checkpoints' ``config_hash``).

        Local data are hashed by content (:func:`selfcorrect.data.datasets_by_content`), and a policy or reward model
        that is a local directory (the run's ``sft/`` and ``reward/``) by its fingerprint: a run directory or data
        directory that moved resumes, a retrained SFT policy or reward model does not.
        """
        from selfcorrect.data import datasets_by_content
        from selfcorrect.provenance import config_hash

        cfg = self.cfg
        hashed = {
            "model": cfg.model.model_dump(),
            "lora": cfg.lora and cfg.lora.model_dump(),
            "ppo": datasets_by_content(self.ppo.model_dump(exclude=self.ppo.unhashed()), "ppo"),
            "seed": cfg.seed,
            "policy": _model_identity(self.policy_ref),
            "reward": _model_identity(self.reward_ref),
            "dialogue": cfg.dialogue.record(),
        }
        if cfg.lora is not None:  # runs from before the value model had adapters cannot resume from its last/
            hashed["value_model"] = "lora"
        if ":" not in self.reward_ref:  # nor runs from before its values had the reward model's bias added
            hashed["value_offset"] = "reward_bias"
        if self.precision.weights != "float32":  # 16-bit runs changed precision (fp32 master weights): not resumable
            hashed["precision"] = self.precision.describe()
        return config_hash(hashed)


def _model_identity(ref: str) -> str | dict[str, str]:
    """A model reference as the resume hash records it: a local directory by its fingerprint (wherever it is now),
    anything else (a Hub id, ``embedded:``, a function reward ``module:function``) as written."""
    from selfcorrect.models import EMBEDDED_PREFIX, fingerprint

    if ref.startswith(EMBEDDED_PREFIX) or not Path(ref).expanduser().is_dir():
        return ref
    return {"fingerprint": fingerprint(ref)}


def build_trainer(cfg: RunConfig, path: Path):
    """The PPO-ptx trainer of a run config (:meth:`PPORecipe.setup`)."""
    return PPORecipe(cfg, path).setup()


def run(cfg: RunConfig, path: Path) -> Path:
    """Train PPO-ptx (resuming from ``last/``); returns the stage's directory."""
    build_trainer(cfg, path).train()
    return cfg.run_dir().ppo
