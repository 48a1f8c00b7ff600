"""Typed configs loaded from YAML, with one-line errors that name the file and the field.

Every config model forbids unknown keys, so a typo (``max_new_token``) is an error, not a silent default.

This module holds the loader and the sections the stages share (model, LoRA, datasets, vLLM, tracking); each stage's
own section is a module of this package (:mod:`~selfcorrect.config.sft`, :mod:`~selfcorrect.config.reward`,
:mod:`~selfcorrect.config.ppo`, :mod:`~selfcorrect.config.evaluation`) and the run config that holds them all is
:mod:`selfcorrect.config.run`. None of them imports a deep-learning library: the one check that needs one, a section's
``trainer:`` mapping against its TRL or transformers class, imports it where it runs, and a schema-only load
(:func:`load_config` with ``schema_only=True``) leaves it out.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from selfcorrect.errors import UserError

ModelT = TypeVar("ModelT", bound=BaseModel)
SCHEMA_ONLY = "schema_only"  # the validation context's key for a load that leaves trainer: mappings unchecked


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; a missing file or a syntax error becomes a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None


def validation_message(path: str | Path, exc: ValidationError) -> str:
    """One line naming the file and each offending field, e.g. ``f.yaml: bbq.conditions.q.human: ...``."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "value_error":  # a validator's own message, without pydantic's "Value error, " prefix
            msg = str(err["ctx"]["error"])
        if err["type"] in ("literal_error", "enum"):
            msg += f", got {err['input']!r}"
        parts.append(f"{field}: {msg}")
    return f"{path}: " + "; ".join(parts)


def check_save_at_steps(steps: list[int], total_steps: int) -> list[int]:
    """A ``save_at_steps`` list as a new list of ints; a ValueError naming the offending value otherwise.

    Every entry must be an integer with ``0 <= step <= total_steps``; the list must be strictly ascending (so sorted
    and without duplicates).
    """
    checked: list[int] = []
    for index, step in enumerate(steps):
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"entry {index} is {step!r}, expected a whole number of steps")
        if step < 0:
            raise ValueError(f"step {step} is negative (steps count from 0)")
        if step > total_steps:
            raise ValueError(f"step {step} is beyond the last step of the run ({total_steps})")
        if step in checked:
            raise ValueError(f"step {step} is listed twice")
        if checked and step < checked[-1]:
            raise ValueError(f"step {step} comes after {checked[-1]}; list the steps in ascending order")
        checked.append(step)
    return checked


POSITIVE_TRAINER_FIELDS = ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size")


def check_typed_fields(values: dict[str, Any], hints: dict[str, Any], what: str) -> dict[str, Any]:
    """Each entry of a ``trainer:`` mapping checked against the type hints of a trainer config class.

    Returns the values converted (YAML strings such as ``"1e-5"`` become numbers); an unknown key or a value of the
    wrong type is a ValueError ``key: problem`` (``what`` names the class, e.g. ``SFTConfig``).
    """
    from pydantic import TypeAdapter

    checked = {}
    for key, value in values.items():
        if key not in hints:
            raise ValueError(f"{key}: unknown {what} field")
        adapter = TypeAdapter(hints[key], config=ConfigDict(arbitrary_types_allowed=True))
        try:
            checked[key] = adapter.validate_python(value)
        except ValidationError as exc:
            raise ValueError(f"{key}: {exc.errors()[0]['msg']}") from None
        if key in POSITIVE_TRAINER_FIELDS and isinstance(checked[key], int | float) and checked[key] <= 0:
            raise ValueError(f"{key}: must be greater than 0, got {checked[key]}")
    return checked


def checks_trainer_fields(info: ValidationInfo) -> bool:
    """Whether a section's validator checks its ``trainer:`` mapping against the TRL or transformers class it is
    given to (which imports that library): always, except in a schema-only load (:func:`load_config`)."""
    return not (info.context or {}).get(SCHEMA_ONLY, False)


def load_config(path: str | Path, model: type[ModelT], *, schema_only: bool = False) -> ModelT:
    """Load a YAML file into a typed config model, raising UserError on any problem.

    ``schema_only``: leave every ``trainer:`` mapping as written, unchecked (:func:`checks_trainer_fields`), so that
    the load imports no deep-learning library; the values are then not fit to train with.
    """
    data = read_yaml(path)
    if data is None:
        raise UserError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data, context={SCHEMA_ONLY: True} if schema_only else None)
    except ValidationError as exc:
        raise UserError(validation_message(path, exc)) from None


CONFIG_KINDS = ("pipelines", "prompts", "accelerate")  # the subdirectories of the shipped configs


def configs_dir() -> Path:
    """Where the shipped configs live: ``$SELFCORRECT_CONFIG_DIR``, else the package's own ``configs/`` (package
    data, so a regular ``pip install`` has them too)."""
    if os.environ.get("SELFCORRECT_CONFIG_DIR"):
        return Path(os.environ["SELFCORRECT_CONFIG_DIR"])
    return Path(str(resources.files("selfcorrect") / "configs"))


def shipped_file(name: str | Path, kind: str | None = None) -> Path | None:
    """A file named in a config or on the command line: the path itself if it exists, else the shipped file of that
    name under :func:`configs_dir` (``configs/accelerate/x.yaml``, ``accelerate/x.yaml``, or with ``kind`` just
    ``x.yaml`` or ``x``); None when neither exists."""
    path = Path(os.path.expanduser(str(name)))
    if path.is_file():
        return path.resolve()
    if path.is_absolute() or not path.parts:
        return None
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    candidates = [configs_dir().joinpath(*parts)]
    if kind is not None and len(parts) == 1:
        candidates += [configs_dir() / kind / parts[0], configs_dir() / kind / f"{parts[0]}.yaml"]
    return next((c for c in candidates if c.is_file()), None)


def shipped_configs() -> dict[str, list[str]]:
    """The shipped config files by kind: ``{"pipelines": ["ganguli2023.yaml", ...], ...}``."""
    return {kind: sorted(p.name for p in (configs_dir() / kind).glob("*.yaml")) for kind in CONFIG_KINDS}


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The benchmark data directory: the explicit argument, else ``$SELFCORRECT_DATA_DIR``, else None."""
    value = explicit or os.environ.get("SELFCORRECT_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"data directory not found: {path}")
    return path


def cache_dir() -> Path:
    """Where converted models and downloaded data are cached: ``$SELFCORRECT_CACHE_DIR`` or ~/.cache/selfcorrect."""
    return Path(os.environ.get("SELFCORRECT_CACHE_DIR") or Path.home() / ".cache" / "selfcorrect").expanduser()


# ---- sections shared by the training stages (SFT, reward model, PPO) -------------------------------


class ModelSection(StrictModel):
    """The policy's starting point: any model reference `selfcorrect.models.load_model` accepts."""

    name_or_path: str = "embedded:smollm2-135m-instruct"
    dtype: str | None = None  # float32 | bfloat16 | float16; default bf16 on CUDA, float32 on CPU
    trust_remote_code: bool = False


class LoraSection(StrictModel):
    """LoRA (PEFT) adapters; leave the section out (``lora: null``) for full fine-tuning."""

    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"

    def peft_config(self, task_type: Literal["CAUSAL_LM", "SEQ_CLS"]) -> Any:
        """This section as a ``peft.LoraConfig``: ``CAUSAL_LM`` for a policy, ``SEQ_CLS`` for a reward or value model.

        For ``SEQ_CLS`` the scalar head ``score`` is trained and saved in full (``modules_to_save``), next to the
        adapters; every other weight of the model stays frozen.
        """
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type=task_type,
            modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
        )


class DatasetSpec(StrictModel):
    """A dataset: a hub id or a local jsonl/json/csv/parquet/txt file (``.gz`` allowed for jsonl).

    ``format`` says how records become training examples:
    - ``hh``: Anthropic HH records ``{"chosen": transcript, "rejected": transcript}`` with transcripts
      in the ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` format;
    - ``messages``: records with a ``messages`` list of ``{"role", "content"}``;
    - ``pairwise``: ``{"prompt", "chosen", "rejected"}`` (strings or message lists);
    - ``ranked``: ``{"prompt", "responses": [best, ..., worst]}`` (K-wise reward data);
    - ``prompt``: ``{"prompt": str}`` records (PPO prompts);
    - ``text``: ``{"text": str}`` records or a plain .txt file with one document per line (ptx data).
    """

    path: str  # environment variables are expanded: $SELFCORRECT_DATA_DIR/hh-rlhf/harmless-base-test.jsonl.gz
    format: Literal["hh", "messages", "pairwise", "ranked", "prompt", "text"]
    split: str = "train"  # hub datasets: the split to read
    name: str | None = None  # hub datasets: the configuration name (e.g. data_dir of Anthropic/hh-rlhf)
    limit: int | None = Field(None, gt=0)  # keep the first N records (after the seeded shuffle)
    test_size: float = Field(0.0, ge=0, lt=1)  # held-out share, split with the run's seed

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        expanded = os.path.expanduser(os.path.expandvars(value))
        if "$" in expanded:
            raise ValueError(f"'{value}' names an environment variable that is not set")
        # a local file becomes absolute, so the same data reached another way hashes the same
        return str(Path(expanded).resolve()) if Path(expanded).exists() else expanded


class VLLMSection(StrictModel):
    """The vLLM engine's settings where a stage samples with ``engine: vllm`` (``ppo.vllm``, ``evaluation.vllm``).

    Each key left out is computed where the engine starts (:func:`selfcorrect.memory.vllm_options`): the share of the
    GPU from the memory plan (the engine's weights and the KV cache of the batch it samples) and, for PPO on CUDA,
    sleep mode between rollouts.
    """

    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)  # share of the GPU the engine may take
    max_num_seqs: int | None = Field(None, gt=0)  # sequences sampled at once (default: vLLM's)
    enable_prefix_caching: bool = False  # keep shared prompt prefixes in the KV cache (CoT prompts share theirs)
    sleep: bool | None = None  # free weights and KV cache while the trainer updates (CUDA only; default: PPO on CUDA)

    def is_default(self) -> bool:
        """Whether every key is left at its default (then the section is left out of config hashes)."""
        return self == VLLMSection()


class TrackingSection(StrictModel):
    """Experiment tracking: W&B (offline unless an API key is configured), tensorboard, or none."""

    backend: Literal["wandb", "tensorboard", "none"] = "none"
    project: str = "selfcorrect"
    mode: Literal["online", "offline", "auto"] = "auto"  # auto: online if WANDB_API_KEY is set
    log_predictions: bool = True  # evaluation: per-item predictions as W&B Tables
