"""Reward-model training on TRL's ``RewardTrainer`` (PROTOCOL §3.1, LANDSCAPE §6 item 5).

Two losses:

* ``pairwise``: TRL's loss, ``-logsigmoid(r_chosen - r_rejected)`` averaged over comparisons. Ranked data is expanded
  into its C(K,2) comparisons, each an independent example (the "shuffled comparisons" set-up that InstructGPT
  found to overfit; kept as a baseline). Trained as K = 2 groups of the K-wise trainer below, which for K = 2 is
  exactly TRL's ``RewardTrainer`` loss, so both losses tokenize identically.
* ``kwise``: InstructGPT's loss. The K ranked responses of one prompt are ONE batch element (K forward passes in
  the same batch); the loss of a prompt is the mean of ``-logsigmoid(r_i - r_j)`` over its C(K,2) pairs (i ranked
  above j), i.e. each comparison is weighted 1/C(K,2); the batch loss is the mean over prompts. For K = 2 this is
  exactly TRL's pairwise loss. ``per_device_train_batch_size`` then counts prompts, not comparisons.

The loss and the ranking metrics are pure functions in :mod:`selfcorrect.train.reward_core`; this module holds the
data preparation, the collator, the trainer and the stage (``run_reward``).

Data (``datasets.Dataset``, TRL conversational or standard format):

* pairwise: ``prompt``, ``chosen``, ``rejected``;
* ranked: ``prompt`` and ``responses`` (best first, K >= 2, K may vary per prompt).

Responses may be assistant message lists or strings. Each (prompt, response) is tokenized with
:func:`selfcorrect.dialogue.example_ids` in the run's dialogue format (prompt up to the opened assistant turn, the
response, EOS), as SFT and PPO do. Sequences longer than ``max_length`` tokens are dropped (TRL's rule); a ranked
prompt keeps its remaining responses if at least two are left.

After training, ``run_reward`` evaluates on held-out data (``pairwise_accuracy``, ``kendall_tau``), sets the
InstructGPT bias ``b = -mean(score(demonstration))`` so that the SFT demonstrations score 0 on average, and saves a
plain sequence classifier (LoRA merged) + tokenizer + ``reward_manifest.json`` atomically.
"""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from transformers.data.data_collator import DataCollatorMixin
from trl import RewardConfig, RewardTrainer
from trl.trainer.utils import pad

from selfcorrect.config import LoraSection, ModelSection
from selfcorrect.config.reward import RewardSection, trainer_key_problem
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError, first_line
from selfcorrect.io import atomic_write_text, staged_dir
from selfcorrect.provenance import stamp, to_json
from selfcorrect.reward_models.score import (
    RewardModel,
    encode,
    load_function,
    response_messages,
)
from selfcorrect.rundir import REWARD_MANIFEST, trainer_dir
from selfcorrect.train import compat
from selfcorrect.train.guards import NonFiniteLossGuard
from selfcorrect.train.precision import Precision, for_stage, upcast_trainable
from selfcorrect.train.reward_core import kwise_loss, pad_groups, ranked_pairs, ranking_metrics

logger = logging.getLogger(__name__)

# ---- data -----------------------------------------------------------------------------------------------------------


def data_kind(dataset: Dataset) -> Literal["pairwise", "ranked"]:
    """``ranked`` for ``prompt``/``responses`` data, ``pairwise`` for ``prompt``/``chosen``/``rejected`` data."""
    columns = set(dataset.column_names)
    if {"prompt", "responses"} <= columns:
        return "ranked"
    if {"chosen", "rejected"} <= columns:
        return "pairwise"
    raise UserError(f"reward data: expected columns prompt/chosen/rejected or prompt/responses, got {sorted(columns)}")


def _normalise_response(prompt: Any, response: Any, where: str) -> Any:
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise UserError(f"{where}: a text prompt needs text responses")
        return response
    return response_messages(response)


def to_ranked(dataset: Dataset) -> Dataset:
    """Ranked view (``prompt``, ``responses`` best first) of pairwise or ranked data; prompts with K < 2 dropped."""
    kind = data_kind(dataset)
    rows = []
    for n, example in enumerate(dataset):
        prompt = example.get("prompt", "")
        prompt = prompt if prompt is not None else ""
        responses = example["responses"] if kind == "ranked" else [example["chosen"], example["rejected"]]
        responses = [_normalise_response(prompt, r, f"reward data: record {n}") for r in responses]
        if len(responses) >= 2:
            rows.append({"prompt": prompt, "responses": responses})
    if not rows:
        raise UserError("reward data: no prompt with at least two responses")
    return Dataset.from_list(rows)


def to_pairwise(dataset: Dataset) -> Dataset:
    """Pairwise view (``prompt``, ``chosen``, ``rejected``); ranked data gives all C(K,2) pairs of each prompt."""
    ranked = to_ranked(dataset)
    rows = [
        {"prompt": ex["prompt"], "chosen": ex["responses"][i], "rejected": ex["responses"][j]}
        for ex in ranked
        for i, j in itertools.combinations(range(len(ex["responses"])), 2)
    ]
    return Dataset.from_list(rows)


def tokenize_ranked(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int | None, dialogue: DialogueSpec
) -> Dataset:
    """Add ``response_ids`` (one token list per response); drop over-long responses, then prompts with K < 2."""

    def tokenize(example: dict) -> dict:
        ids = [encode(tokenizer, example["prompt"], r, dialogue) for r in example["responses"]]
        if max_length is not None:
            ids = [x for x in ids if len(x) <= max_length]
        return {"response_ids": ids}

    dataset = dataset.map(tokenize)
    return dataset.filter(lambda example: len(example["response_ids"]) >= 2)


@dataclass
class DataCollatorForRanking(DataCollatorMixin):
    """Collate ranked examples: all K responses of every prompt in one right-padded batch.

    Input: examples with ``response_ids`` (K_p token lists, best first). Output: ``input_ids`` and
    ``attention_mask`` of shape ``(sum_p K_p, L)`` (prompt after prompt, responses in rank order) and
    ``group_sizes`` ``(P,)``.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences = [torch.tensor(ids) for example in examples for ids in example["response_ids"]]
        sizes = torch.tensor([len(example["response_ids"]) for example in examples], dtype=torch.long)
        masks = [torch.ones_like(ids) for ids in sequences]
        return {
            "input_ids": pad(sequences, self.pad_token_id, "right", self.pad_to_multiple_of),
            "attention_mask": pad(masks, 0, "right", self.pad_to_multiple_of),
            "group_sizes": sizes,
        }


class KWiseRewardTrainer(RewardTrainer):
    """TRL ``RewardTrainer`` with InstructGPT's K-wise loss (see :func:`kwise_loss`).

    Takes ranked datasets (``prompt``, ``responses`` best first) or already tokenized ones (``response_ids``).
    One batch element is one prompt: its K responses are scored in the same forward pass.
    """

    _tag_names = ["trl", "reward-trainer", "kwise"]

    def __init__(
        self,
        *args: Any,
        data_collator: Any = None,
        processing_class: Any = None,
        dialogue: DialogueSpec | None = None,
        **kwargs: Any,
    ):
        self.dialogue = dialogue or DialogueSpec()  # how untokenized data is tokenized (see _prepare_dataset)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("KWiseRewardTrainer needs a processing_class (tokenizer)")
            if processing_class.pad_token is None:
                processing_class.pad_token = processing_class.eos_token
            reward_args = kwargs.get("args") or (args[1] if len(args) > 1 else None)
            data_collator = DataCollatorForRanking(
                pad_token_id=processing_class.pad_token_id,
                pad_to_multiple_of=getattr(reward_args, "pad_to_multiple_of", None),
            )
        kwargs.update(data_collator=data_collator, processing_class=processing_class)
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: D102 (TRL hook)
        if "response_ids" in dataset.column_names:
            return dataset
        return tokenize_ranked(to_ranked(dataset), processing_class, args.max_length, self.dialogue)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["response_ids"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        sizes = inputs.pop("group_sizes")
        inputs["use_cache"] = False
        outputs = model(**inputs)
        rewards, mask = pad_groups(outputs.logits.squeeze(-1), sizes.tolist())
        loss = kwise_loss(rewards, mask, center_coefficient=self.args.center_rewards_coefficient)

        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            all_rewards = self.accelerator.gather(outputs.logits)
            self._metrics[mode]["min_reward"].append(all_rewards.min().item())
            self._metrics[mode]["mean_reward"].append(all_rewards.mean().item())
            self._metrics[mode]["max_reward"].append(all_rewards.max().item())
            _, diff, pair_mask = ranked_pairs(rewards.detach(), mask)
            accuracy = (diff[pair_mask] > 0).float().mean()
            self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
            margin = diff[pair_mask].mean()
            self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
        return (loss, outputs) if return_outputs else loss


# ---- the stage -----------------------------------------------------------------------------------------------------


def _default_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def reward_precision(section: RewardSection, model: ModelSection, **launch: Any) -> Precision:
    """How the reward model trains (:mod:`selfcorrect.train.precision`): it loads in float32 unless ``model.dtype``
    says otherwise. ``launch``: for a launch other than this process's."""
    return for_stage(model.dtype or "float32", section.trainer, "reward.trainer", **launch)


def build_reward_config(
    section: RewardSection,
    output_dir: Path,
    seed: int,
    report_to: str | list[str],
    precision: Precision | None = None,
):
    """A ``trl.RewardConfig``: our defaults, then ``reward.trainer`` on top.

    Defaults: InstructGPT's 1 epoch with cosine decay to 10% of the peak learning rate and Adam betas (0.9, 0.95), no
    intermediate checkpoints, bf16 only on a GPU that supports it (TRL would turn it on everywhere), the run's seed for
    model init and data order, activation (gradient) checkpointing on as in TRL, pinned memory only with CUDA.
    ``logging_nan_inf_filter`` is forced off so that a diverged loss is seen and stops the run.
    """
    for key in section.trainer:
        problem = trainer_key_problem(key)
        if problem:
            raise UserError(f"reward.trainer.{key}: {problem}")
    values: dict[str, Any] = {
        "num_train_epochs": 1,
        "adam_beta2": 0.95,  # InstructGPT: Adam betas (0.9, 0.95) for all models
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "save_strategy": "no",
        "logging_steps": 1,
        "bf16": _default_bf16(),
        "dataloader_pin_memory": torch.cuda.is_available(),
        **compat.trl_config_values(section.trainer),  # the user's values; checkpointing under either name
        "output_dir": str(output_dir),
        "seed": seed,
        "report_to": report_to,
        "max_length": section.max_length,
        "logging_nan_inf_filter": False,
        **(precision.trainer_args if precision is not None else {}),  # the autocast of fp32 master weights
    }
    try:
        return RewardConfig(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"reward.trainer: invalid RewardConfig: {first_line(exc)}") from None


def _load_classifier(model: ModelSection, seed: int):
    """The scalar-head sequence classifier (``num_labels=1``) and tokenizer of a model reference."""
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from selfcorrect.models import DTYPE_NAMES, load_model, load_tokenizer, resolve_model_path

    resolved = resolve_model_path(model.name_or_path)
    path = Path(resolved)
    dtype = DTYPE_NAMES.get(model.dtype or "float32")
    if dtype is None:
        raise UserError(f"model.dtype: unknown dtype '{model.dtype}' (known: {', '.join(DTYPE_NAMES)})")
    tokenizer = load_tokenizer(resolved, trust_remote_code=model.trust_remote_code)
    staging = None
    if path.is_dir() and (path / "adapter_config.json").is_file():
        # A LoRA SFT adapter: merge it into its base and start the classifier from the merged weights.
        merged, _ = load_model(resolved, dtype=dtype, device="cpu", trust_remote_code=model.trust_remote_code)
        staging = Path(tempfile.mkdtemp(prefix="selfcorrect-rm-base-"))
        merged.save_pretrained(staging)
        del merged
        resolved = str(staging)
    elif path.is_dir() and not (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()):
        raise UserError(f"{path}: no safetensors weights (model.safetensors) found")
    set_seed(seed)  # the score head is initialised randomly
    try:
        with suppress_seqcls_warning():
            classifier = AutoModelForSequenceClassification.from_pretrained(
                resolved,
                num_labels=1,
                dtype=dtype,
                use_safetensors=True,
                trust_remote_code=model.trust_remote_code,
            )
    except OSError as exc:
        raise UserError(f"cannot load model '{model.name_or_path}': {str(exc).splitlines()[0]}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    classifier.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    classifier.config.pad_token_id = tokenizer.pad_token_id
    return classifier, tokenizer


def _split_demonstration(conversation: list[dict], index: int) -> tuple[list[dict], list[dict]]:
    if not conversation or conversation[-1].get("role") != "assistant":
        raise UserError(f"reward demonstrations: conversation {index} does not end with an assistant message")
    return list(conversation[:-1]), [conversation[-1]]


def _score_groups(reward_model: RewardModel, ranked_ids: Dataset, batch_size: int) -> list[torch.Tensor]:
    flat = [ids for example in ranked_ids for ids in example["response_ids"]]
    sizes = [len(example["response_ids"]) for example in ranked_ids]
    scores = reward_model.score_ids(flat, batch_size=batch_size)
    return list(torch.split(scores, sizes))


def run_reward(
    section: RewardSection,
    model: ModelSection,
    lora: LoraSection | None,
    output_dir: Path,
    seed: int,
    train_ds: Dataset | None,
    eval_ds: Dataset | None = None,
    demonstrations: list[list[dict]] | None = None,
    report_to: str | list[str] = "none",
    dialogue: DialogueSpec | None = None,
) -> Path:
    """Train a reward model and save it (with ``reward_manifest.json``) to ``output_dir``; return ``output_dir``.

    * ``train_ds`` / ``eval_ds``: pairwise or ranked datasets (see the module docstring). Any kind works with
      either loss: pairwise data under ``kwise`` is K = 2; ranked data under ``pairwise`` is expanded to pairs.
    * ``demonstrations``: SFT conversations ending with the assistant reply; with ``section.normalize`` the bias
      ``b = -mean(raw score)`` over them is stored (manifest ``bias`` and ``config.reward_bias``). Without
      demonstrations the best response of every training prompt stands in (``bias_source`` says which).
    * ``dialogue``: the run's dialogue format (default ``human_assistant``), recorded in the manifest.
    * With ``section.function`` nothing is trained: the directory holds only a manifest naming the function,
      which :meth:`RewardModel.load` resolves.

    Written atomically (:func:`selfcorrect.io.staged_dir`): a temporary directory beside ``output_dir`` is renamed
    into place when complete. A NaN or infinite loss is a UserError and leaves nothing behind.
    """
    output_dir = Path(output_dir)
    dialogue = dialogue or DialogueSpec()
    with staged_dir(output_dir) as staging:
        if section.function is not None:
            load_function(section.function)  # fail now, not during PPO
            manifest = {
                "stage": "reward",
                "function": section.function,
                "bias": 0.0,
                "seed": seed,
                "dialogue": dialogue.record(),
            }
        else:
            manifest = _train(
                section, model, lora, staging, seed, train_ds, eval_ds, demonstrations, report_to, dialogue
            )
        atomic_write_text(staging / REWARD_MANIFEST, to_json(stamp(manifest)))
    return output_dir


def _train(
    section: RewardSection,
    model_section: ModelSection,
    lora: LoraSection | None,
    staging: Path,
    seed: int,
    train_ds: Dataset | None,
    eval_ds: Dataset | None,
    demonstrations: list[list[dict]] | None,
    report_to: str | list[str],
    dialogue: DialogueSpec,
) -> dict[str, Any]:
    if train_ds is None or len(train_ds) == 0:
        raise UserError("reward.data: no training records")
    checkpoints = trainer_dir(staging)
    precision = reward_precision(section, model_section)
    args = build_reward_config(section, checkpoints, seed, report_to, precision)
    classifier, tokenizer = _load_classifier(model_section, seed)
    if precision.master_fp32 and lora is None:
        upcast_trainable(classifier)

    # pairwise: every comparison its own K = 2 group (the kwise loss of one pair is TRL's pairwise loss)
    view = to_ranked if section.loss == "kwise" else lambda ds: to_ranked(to_pairwise(ds))
    ranked_train = tokenize_ranked(view(train_ds), tokenizer, section.max_length, dialogue)
    if len(ranked_train) == 0:
        raise UserError(f"reward.data: no training prompt has two responses within max_length={section.max_length}")
    ranked_eval = None
    if eval_ds is not None and len(eval_ds) > 0:
        ranked_eval = tokenize_ranked(to_ranked(eval_ds), tokenizer, section.max_length, dialogue)

    guard = NonFiniteLossGuard()
    common = {
        "model": classifier,
        "args": args,
        "processing_class": tokenizer,
        "callbacks": [guard],
        "peft_config": lora.peft_config("SEQ_CLS") if lora is not None else None,
    }
    trainer = KWiseRewardTrainer(train_dataset=ranked_train, eval_dataset=ranked_eval, dialogue=dialogue, **common)
    n_train = len(trainer.train_dataset)  # type: ignore[arg-type]  # a map-style Dataset: ours
    result = trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if guard.bad is not None or not math.isfinite(result.training_loss):
        step, value = guard.bad or (trainer.state.global_step, result.training_loss)
        raise UserError(
            f"reward training diverged: loss {value} at step {step} (try a lower reward.trainer."
            "learning_rate); nothing was saved"
        )

    trained: Any = trainer.model
    if hasattr(trained, "merge_and_unload"):  # LoRA: save a plain sequence classifier
        trained = trained.merge_and_unload()
    trained.eval()
    batch_size = args.per_device_eval_batch_size
    reward_model = RewardModel(trained, tokenizer, max_length=section.max_length, dialogue=dialogue)

    metrics: dict[str, Any] = {}
    if ranked_eval is not None and len(ranked_eval) > 0:
        metrics = ranking_metrics(_score_groups(reward_model, ranked_eval, batch_size))

    bias, bias_source, n_demos, n_demos_dropped = 0.0, "none", 0, 0
    if section.normalize:
        if demonstrations:
            split = [_split_demonstration(c, i) for i, c in enumerate(demonstrations)]
            ids = [encode(tokenizer, p, r, dialogue) for p, r in split]
            kept = [x for x in ids if len(x) <= section.max_length]  # as in training: over-long ones are dropped
            if not kept:
                raise UserError(f"reward: no SFT demonstration fits reward.max_length={section.max_length}")
            raw = reward_model.score_ids(kept, batch_size=batch_size)
            bias_source, n_demos, n_demos_dropped = "demonstrations", len(kept), len(ids) - len(kept)
        else:
            logger.warning("reward: no demonstrations given; the bias centres the best training responses instead")
            raw = torch.cat([g[:1] for g in _score_groups(reward_model, ranked_train, batch_size)])
            bias_source, n_demos = "train_best_responses", len(raw)
        bias = -float(raw.double().mean())
        if not math.isfinite(bias):
            raise UserError("reward training diverged: the demonstration scores are not finite; nothing was saved")

    trained.config.reward_bias = bias
    trained.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()

    n_pairs = sum(math.comb(len(example["response_ids"]), 2) for example in ranked_train)
    eval_section = {key: metrics.get(key) for key in ("pairwise_accuracy", "kendall_tau", "n_prompts", "n_pairs")}
    eval_section["loss"] = metrics.get(f"{section.loss}_loss")
    return {
        "stage": "reward",
        "bias": bias,
        "bias_source": bias_source,
        "n_demonstrations": n_demos,
        "n_demonstrations_over_max_length": n_demos_dropped,
        "dialogue": dialogue.record(),
        "normalize": section.normalize,
        "loss_type": section.loss,
        "loss": result.training_loss,
        "final_loss": losses[-1] if losses else result.training_loss,
        "first_loss": losses[0] if losses else None,
        "pairwise_accuracy": metrics.get("pairwise_accuracy"),
        "kendall_tau": metrics.get("kendall_tau"),
        "eval": eval_section if metrics else None,
        "n_train": n_train,
        "n_train_prompts": len(ranked_train),
        "n_train_pairs": n_pairs,
        "max_length": section.max_length,
        "global_step": trainer.state.global_step,
        "model": model_section.model_dump(),
        "lora": lora.model_dump() if lora is not None else None,
        "trainer": section.trainer,
        "seed": seed,
        "log_history": trainer.state.log_history,
    }


__all__ = [
    "DataCollatorForRanking",
    "KWiseRewardTrainer",
    "RewardSection",
    "build_reward_config",
    "data_kind",
    "run_reward",
    "to_pairwise",
    "to_ranked",
    "tokenize_ranked",
]
