"""What an evaluation computes: the ``evaluation:`` section of a run config (:class:`EvaluationSection`) and the
runner's settings for one output directory (:class:`EvalSettings`), which only :meth:`EvaluationSection.settings`
builds -- for the pipeline's evaluate stage from the run config, for ``selfcorrect evaluate`` and ``probe`` from their
options, whose defaults are this section's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from selfcorrect.config import StrictModel, VLLMSection, data_dir, shipped_file
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.evaluate.benchmarks import BENCHMARK_NAMES

DEFAULT_CONDITIONS = ("q", "q_if", "q_if_cot")
PROBE_CONDITIONS = ("q", "q_if")  # the Q-type ones: a reward model probe has no reasoning to sample


@dataclass
class EvalSettings:
    """Everything that decides what ``selfcorrect evaluate`` computes (built by :meth:`EvaluationSection.settings`)."""

    model: str
    output: Path
    benchmarks: list[str]
    conditions: list[str]
    limit: int | None
    cot_limit: int | None
    data_dir: Path | None
    dialogue: DialogueSpec | None  # None: the format the model was trained in (manifest), else human_assistant
    override_dialogue: bool  # evaluate in ``dialogue`` even where the model was trained in another format
    batch_size: int
    gen_batch_size: int
    seed: int
    n_boot: int
    prompt_files: list[Path]
    dtype: str | None
    device: str | None
    trust_remote_code: bool
    overwrite: bool
    engine: str  # what samples the CoT reasoning: hf (transformers) or vllm (selfcorrect.engines)
    vllm: VLLMSection  # the vLLM engine's settings
    # what reads the candidates: a policy's next-token probabilities, or a reward model's preferences
    # (``model`` is then a reward: selfcorrect.evaluate.reward_probe)
    scorer: Literal["policy", "reward"]
    skip_unfit: bool  # a probe leaves out (with a note) the conditions whose exchanges its reward cannot read


class EvaluationSection(StrictModel):
    """The ``evaluation`` section of a run config: what the pipeline evaluates, and when."""

    when: Literal["during", "after"] = "after"  # during: evaluate checkpoints while PPO saves later ones
    checkpoints: bool = True  # evaluate the PPO checkpoints (ppo.save_at_steps)
    probe_reward: bool = True  # probe the run's reward model on the same items (selfcorrect probe), first
    models: list[str] = []  # extra models evaluated as they are (no RLHF), e.g. a model-size sweep
    benchmarks: list[str] = list(BENCHMARK_NAMES)
    conditions: list[str] = list(DEFAULT_CONDITIONS)
    limit: int | None = Field(None, gt=0)  # stratified subsample per benchmark (None: all items)
    cot_limit: int | None = Field(None, gt=0)  # CoT subsample, drawn from the --limit one
    prompts: list[str] = []  # extra prompt-condition files: a path ($VARS expanded) or a shipped prompts file
    batch_size: int = Field(64, gt=0)
    gen_batch_size: int = Field(64, gt=0)
    bootstrap: int = Field(1000, ge=0)
    engine: Literal["hf", "vllm"] = "hf"  # what samples the CoT reasoning (selfcorrect.engines)
    vllm: VLLMSection = VLLMSection()  # the vLLM engine's settings (engine: vllm)
    # Where the evaluation runs (cpu, cuda:N). With when: during on GPUs, a GPU the training stages do not use: the
    # pipeline hides it from them. Left out there, the evaluation waits until PPO ends (it never shares a training GPU).
    device: str | None = None
    poll_seconds: float = Field(10.0, gt=0)  # when: during, how often to look for new checkpoints
    # Processes that share out the evaluation after training, each on its own GPU (selfcorrect.evaluate.shards), under
    # the pipeline's launcher; at most as many as it starts. Left out: all of them, or 1 (the pipeline's own process)
    # where `device` names one device or the evaluation runs while PPO trains.
    num_processes: int | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _dialogue_moved(cls, value: object) -> object:
        if isinstance(value, dict) and "dialogue" in value:
            raise ValueError(
                "dialogue: set the run-level 'dialogue' key instead (one format for training and evaluation)"
            )
        return value

    @field_validator("benchmarks")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        unknown = [b for b in value if b not in BENCHMARK_NAMES]
        if unknown:
            raise ValueError(f"unknown benchmark '{unknown[0]}' (known: {', '.join(BENCHMARK_NAMES)})")
        return value

    @field_validator("prompts")
    @classmethod
    def _expand(cls, value: list[str]) -> list[str]:
        files = []
        for name in value:
            path = Path(os.path.expanduser(os.path.expandvars(name)))
            files.append(str(shipped_file(path, "prompts") or path))
        return files

    def settings(
        self,
        output: Path,
        *,
        seed: int,
        dtype: str | None,
        trust_remote_code: bool,
        dialogue: DialogueSpec | None,
        model: str = "",
        data: str | Path | None = None,
        override_dialogue: bool = False,
        overwrite: bool = False,
        scorer: Literal["policy", "reward"] = "policy",
    ) -> EvalSettings:
        """The runner settings for one evaluation output dir: this section's values, then the call's.

        ``model`` may be left empty and set per target (a run's checkpoints); ``data``: the benchmark data directory
        (:func:`selfcorrect.config.data_dir`: default ``$SELFCORRECT_DATA_DIR``); ``dialogue`` None: each model's
        own format (its manifest), else human_assistant.
        """
        return EvalSettings(
            model=model,
            output=output,
            benchmarks=list(self.benchmarks),
            conditions=list(self.conditions),
            limit=self.limit,
            cot_limit=self.cot_limit,
            data_dir=data_dir(data),
            dialogue=dialogue,
            override_dialogue=override_dialogue,
            batch_size=self.batch_size,
            gen_batch_size=self.gen_batch_size,
            seed=seed,
            n_boot=self.bootstrap,
            prompt_files=[Path(p) for p in self.prompts],
            dtype=dtype,
            device=self.device,
            trust_remote_code=trust_remote_code,
            overwrite=overwrite,
            engine=self.engine,
            vllm=self.vllm,
            scorer=scorer,
            skip_unfit=False,
        )
