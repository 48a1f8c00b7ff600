"""The SFT stage: supervised fine-tuning on demonstrations with TRL's SFTTrainer, optionally with ptx texts mixed in.

InstructGPT's RLHF-init SFT model (PROTOCOL 3.3) was trained for 2 epochs on demonstrations with 10% pretraining
data mixed in, cosine-decayed to 10% of the peak learning rate, with Adam betas (0.9, 0.95). Those are the
defaults here; every SFTConfig field can be overridden from the ``trainer:`` mapping of :class:`SFTSection`.

Loss masking (which tokens are trained)
---------------------------------------
* A demonstration trains on its **final assistant reply and its end-of-turn (EOS) token only**: the prompt
  (system prompt, user turns and any earlier assistant turns, in the run's dialogue format) is masked. This is
  TRL's prompt-completion ``completion_only_loss``.
* A ptx text (``ptx_fraction`` > 0) trains the **LM loss on all of its tokens**, as plain text with the EOS token
  appended (no dialogue format).

TRL 1.16 cannot mix conversational and plain-text rows in one dataset, and ``assistant_only_loss`` needs a chat
template with ``{% generation %}`` markers, which SmolLM2's (and most) templates lack. So both kinds of rows are
tokenized here into the one form TRL takes for both: ``input_ids`` plus a ``completion_mask`` (0 = no loss). A
demonstration is :func:`selfcorrect.dialogue.example_ids` (prompt ids in the run's dialogue format, ``human_assistant``
or ``chat_template``, then the reply's ids, then EOS: the ids a PPO rollout of the same exchange produces); a ptx
text is ``tokenizer(text)`` plus EOS with a mask of ones. SFTTrainer then builds the labels from the mask
(``completion_only_loss=True``, set by default), truncates to ``max_length`` (dropping rows left with no trained
token), pads and trains.

Output
------
``output_dir`` receives the final model (or the LoRA adapter, whose ``base_model_name_or_path`` is the original
model reference, so :func:`selfcorrect.models.load_model` reloads it; a local base's relative path and fingerprint
are in the manifest, :func:`selfcorrect.models.base_record`), the tokenizer, ``trainer/`` (the
Trainer's working directory) and ``manifest.json``. Everything is written into ``.NAME.partial`` beside it and
renamed into place at the end (:func:`selfcorrect.io.staged_dir`): a failed run (including a loss that becomes nan)
leaves no ``output_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase, set_seed
from trl import SFTConfig, SFTTrainer

from selfcorrect.config import LoraSection, ModelSection
from selfcorrect.config.sft import SFTSection
from selfcorrect.data import datasets_by_content, ptx_dataset, sft_dataset, train_test_split
from selfcorrect.dialogue import DialogueSpec, example_ids
from selfcorrect.errors import UserError, first_line
from selfcorrect.io import atomic_write_text, staged_dir
from selfcorrect.models import EMBEDDED_PREFIX, base_record, load_model
from selfcorrect.provenance import config_hash, stamp, to_json
from selfcorrect.rundir import MANIFEST
from selfcorrect.train import compat
from selfcorrect.train.guards import NonFiniteLossGuard
from selfcorrect.train.precision import Precision, for_stage, upcast_trainable

logger = logging.getLogger(__name__)

STAGE = "sft"
# ---- datasets -------------------------------------------------------------------------------------------------


def tokenize_demonstrations(
    ds: Dataset, tokenizer: PreTrainedTokenizerBase, dialogue: DialogueSpec | None = None
) -> Dataset:
    """``messages`` rows -> ``input_ids`` + ``completion_mask`` (1 on the final reply and its end-of-turn token).

    The ids are :func:`selfcorrect.dialogue.example_ids`: the conversation before the reply in the run's dialogue
    format (default ``human_assistant``) up to the opened assistant turn, then the reply, then EOS -- the same ids a
    PPO rollout produces.
    """
    dialogue = dialogue or DialogueSpec()

    def tokenize(example: dict[str, Any]) -> dict[str, list[int]]:
        messages = example["messages"]
        input_ids, n_prompt = example_ids(tokenizer, messages[:-1], messages[-1]["content"], dialogue)
        return {"input_ids": input_ids, "completion_mask": [0] * n_prompt + [1] * (len(input_ids) - n_prompt)}

    return ds.map(tokenize, remove_columns=ds.column_names, desc="Tokenizing demonstrations")


def tokenize_ptx(ds: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """``text`` rows -> ``input_ids`` (the text, then EOS) + ``completion_mask`` of ones (LM loss on all tokens)."""

    def tokenize(example: dict[str, Any]) -> dict[str, list[int]]:
        input_ids = list(tokenizer(example["text"])["input_ids"])
        if not input_ids or input_ids[-1] != tokenizer.eos_token_id:
            input_ids.append(tokenizer.eos_token_id)
        return {"input_ids": input_ids, "completion_mask": [1] * len(input_ids)}

    return ds.map(tokenize, remove_columns=ds.column_names, desc="Tokenizing ptx texts")


def n_ptx_rows(ptx_fraction: float, n_demonstrations: int) -> int:
    """How many ptx rows make them ``ptx_fraction`` of the training set: ``round(f / (1 - f) * n_demos)``."""
    return round(ptx_fraction / (1 - ptx_fraction) * n_demonstrations)


# ---- trainer ----------------------------------------------------------------------------------------------------


def sft_precision(section: SFTSection, model: ModelSection, lora: LoraSection | None, **launch: Any) -> Precision:
    """How SFT trains (:mod:`selfcorrect.train.precision`): the model loads in float32 unless ``model.dtype`` says
    otherwise (then, without DeepSpeed, its trained parameters are fp32 under autocast). ``launch``: for a launch
    other than this process's."""
    return for_stage(model.dtype or "float32", section.trainer, "sft.trainer", **launch)


def sft_config(
    section: SFTSection,
    output_dir: Path,
    seed: int,
    report_to: str | list[str] = "none",
    has_eval: bool = False,
    precision: Precision | None = None,
) -> SFTConfig:
    """The SFTConfig: InstructGPT-minded defaults, then ``section.trainer`` on top (its entries win), then the
    autocast flag of ``precision``."""
    defaults: dict[str, Any] = {
        "output_dir": str(Path(output_dir) / "trainer"),
        "seed": seed,
        "max_length": section.max_length,
        "completion_only_loss": True,  # demonstrations: loss on the reply only (ptx rows have no masked tokens)
        "num_train_epochs": 2,  # RLHF-init SFT (PROTOCOL 3.3)
        "adam_beta2": 0.95,  # InstructGPT: Adam betas (0.9, 0.95)
        "save_strategy": "no",
        "eval_strategy": "epoch" if has_eval else "no",
        "logging_steps": 1,
        "logging_nan_inf_filter": False,  # log nan losses as they are, so a diverged run is detected
        "report_to": report_to,
    }
    if "lr_scheduler_type" not in section.trainer:  # cosine decay to 10% of the peak, no warmup
        defaults["lr_scheduler_type"] = "cosine_with_min_lr"
        defaults["lr_scheduler_kwargs"] = {"min_lr_rate": 0.1}
    if "bf16" not in section.trainer and "fp16" not in section.trainer:  # TRL turns bf16 on even on a CPU
        defaults["bf16"] = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        extra = precision.trainer_args if precision is not None else {}
        return SFTConfig(**{**defaults, **compat.trl_config_values(section.trainer), **extra})
    except (TypeError, ValueError) as exc:
        raise UserError(f"sft.trainer: {first_line(exc)}") from None


def _portable_ref(ref: str) -> str:
    """The reference to record as a base model: local directories made absolute, anything else unchanged."""
    if not ref.startswith(EMBEDDED_PREFIX) and Path(ref).expanduser().is_dir():
        return str(Path(ref).expanduser().resolve())
    return ref


def build_sft_trainer(
    section: SFTSection,
    model: ModelSection,
    lora: LoraSection | None,
    output_dir: Path,
    seed: int,
    report_to: str | list[str] = "none",
    dialogue: DialogueSpec | None = None,
) -> tuple[Any, dict[str, int]]:
    """Load the model and the data and set up the SFTTrainer (nothing is trained or saved).

    Returns the trainer (TRL's SFTTrainer) and the counts ``n_demonstrations``, ``n_ptx``, ``n_eval`` and
    ``n_train`` (the rows the trainer kept: rows whose prompt fills ``max_length`` are dropped by TRL).
    """
    precision = sft_precision(section, model, lora)
    args = sft_config(section, output_dir, seed, report_to, has_eval=section.data.test_size > 0, precision=precision)
    demos, eval_demos = train_test_split(sft_dataset(section.data, seed), section.data.test_size, seed)
    n_ptx = n_ptx_rows(section.ptx_fraction, len(demos)) if section.ptx_data is not None else 0
    ptx = None
    if n_ptx:
        assert section.ptx_data is not None  # n_ptx is 0 without it
        ptx = ptx_dataset(section.ptx_data, seed)
        if len(ptx) < n_ptx:
            raise UserError(
                f"{section.ptx_data.path}: {len(ptx)} ptx texts, but ptx_fraction {section.ptx_fraction} with "
                f"{len(demos)} demonstrations needs {n_ptx}"
            )
        ptx = ptx.select(range(n_ptx))

    # Full fine-tuning keeps float32 master weights (mixed precision on a GPU); LoRA may use a half-precision base
    # (PEFT keeps the adapters in float32).
    set_seed(args.seed)
    policy, tokenizer = load_model(
        model.name_or_path, dtype=precision.weights, device="cpu", trust_remote_code=model.trust_remote_code
    )
    if precision.master_fp32 and lora is None:
        upcast_trainable(policy)
    dialogue = dialogue or DialogueSpec()
    train = tokenize_demonstrations(demos, tokenizer, dialogue)
    if ptx is not None:
        train = concatenate_datasets([train, tokenize_ptx(ptx, tokenizer)])
    peft_config = lora.peft_config("CAUSAL_LM") if lora is not None else None
    trainer: Any = SFTTrainer(  # Any: TRL types its model and datasets as optional
        model=policy,
        args=args,
        train_dataset=train,
        eval_dataset=tokenize_demonstrations(eval_demos, tokenizer, dialogue) if eval_demos is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    n_dropped = len(train) - len(trainer.train_dataset)
    if n_dropped == len(train):
        raise UserError(f"sft: no training example keeps a reply within max_length={section.max_length} tokens")
    if n_dropped:
        logger.warning(
            "sft: %d of %d examples dropped: prompt longer than max_length=%d tokens",
            n_dropped,
            len(train),
            section.max_length,
        )
    if peft_config is not None:  # so that load_model(output_dir) finds the base model again
        trainer.model.peft_config["default"].base_model_name_or_path = _portable_ref(model.name_or_path)
    counts = {
        "n_demonstrations": len(demos),
        "n_ptx": n_ptx,
        "n_eval": len(eval_demos) if eval_demos is not None else 0,
        "n_train": len(trainer.train_dataset),
    }
    return trainer, counts


def _check_replaceable(output_dir: Path) -> None:
    """An existing output_dir may only be an earlier SFT output (or empty): nothing else is overwritten."""
    if not output_dir.exists():
        return
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        return
    try:
        stage = json.loads((output_dir / MANIFEST).read_text()).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    if stage != STAGE:
        raise UserError(f"{output_dir}: exists and is not an SFT output (no manifest.json of stage 'sft'); not touched")


def _last_logged(log_history: list[dict[str, Any]], key: str) -> float | None:
    values = [entry[key] for entry in log_history if key in entry]
    return values[-1] if values else None


def run_sft(
    section: SFTSection,
    model: ModelSection,
    lora: LoraSection | None,
    output_dir: Path,
    seed: int,
    report_to: str | list[str] = "none",
    dialogue: DialogueSpec | None = None,
) -> Path:
    """Train the SFT model and save it (or its LoRA adapter) with the tokenizer and a manifest to ``output_dir``.

    An existing ``output_dir`` is replaced only if it is an earlier SFT output. Raises UserError on bad input and
    if the loss becomes nan or inf (then no ``output_dir`` is left behind). Returns ``output_dir``.
    """
    from accelerate import PartialState

    output_dir = Path(output_dir)
    _check_replaceable(output_dir)
    work_dir = output_dir.parent / f".{output_dir.name}.partial"  # one path every process knows
    state = PartialState()
    # The main process makes work_dir, renames it into place at the end or removes it on failure; all write into it.
    staging = staged_dir(output_dir, staging=work_dir) if state.is_main_process else contextlib.nullcontext()
    with staging:
        state.wait_for_everyone()
        dialogue = dialogue or DialogueSpec()
        trainer, counts = build_sft_trainer(section, model, lora, work_dir, seed, report_to, dialogue)
        nan_guard = NonFiniteLossGuard()
        trainer.add_callback(nan_guard)
        result = trainer.train()
        if nan_guard.bad is not None or not math.isfinite(result.training_loss):
            step = nan_guard.bad[0] if nan_guard.bad else trainer.state.global_step
            raise UserError(f"sft: loss became nan at step {step}")
        if not all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad):
            raise UserError(f"sft: the weights became nan or inf by step {trainer.state.global_step}")
        trainer.save_model(str(work_dir))
        if trainer.is_world_process_zero():
            (work_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the args are in the manifest
            config = {
                "sft": section.model_dump(mode="json"),
                "model": model.model_dump(mode="json"),
                "lora": lora.model_dump(mode="json") if lora is not None else None,
                "seed": seed,
                "dialogue": dialogue.record(),
            }
            manifest = stamp(
                {
                    "stage": STAGE,
                    "base_model": _portable_ref(model.name_or_path),
                    **(base_record(model.name_or_path, output_dir) if lora is not None else {}),
                    "finetuning": "lora" if lora is not None else "full",
                    "dialogue": dialogue.record(),
                    **counts,
                    "steps": trainer.state.global_step,
                    "final_train_loss": _last_logged(trainer.state.log_history, "loss"),
                    "mean_train_loss": result.training_loss,
                    "eval_loss": _last_logged(trainer.state.log_history, "eval_loss"),
                    "seed": seed,
                    "config": config,
                    "config_hash": config_hash(datasets_by_content(config)),  # local data by content
                    "training_args": json.loads(trainer.args.to_json_string()),
                }
            )
            atomic_write_text(work_dir / MANIFEST, to_json(manifest))
    state.wait_for_everyone()
    return output_dir
