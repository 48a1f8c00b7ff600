"""One dialogue format per run: how a conversation becomes the text and the token ids that every stage sees.

PROTOCOL section 1.2: "Use exactly the serialization the SFT/RL data used." A run names its format once
(``dialogue:`` at the top of the run config) and SFT data, reward-model training and scoring, PPO prompts and the
response boundary, and evaluation all go through the functions below:

* ``human_assistant``: the papers' raw text, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (Anthropic HH). A prompt ends
  with ``"\\n\\nAssistant:"``; a reply or an assistant prefix follows after one space; a turn ends with the EOS token
  (or, for a model that never learnt EOS, when it starts the next ``"\\n\\nHuman:"`` turn). Tokenized with the
  tokenizer's special tokens (BOS where the tokenizer adds one). System messages, if the data has any, open the
  text as plain text.
* ``chat_template``: the tokenizer's own chat template, with the assistant turn opened (``add_generation_prompt``)
  and continued. ``system_prompt`` is the one explicit setting for the template's system turn: ``None`` keeps the
  template's own default (SmolLM2's inserts "You are a helpful AI assistant named SmolLM, ..."); a string (``""``
  included) is put first as the system message in every stage, so the template's default is never used. A
  conversation that brings its own system message keeps it. The special tokens come from the template.

Token ids of a training example are always ``prompt ids + reply ids + [EOS]``, the reply tokenized on its own
after the prompt, which is exactly what a PPO rollout produces (the prompt's ids, then sampled ids, then EOS when
the policy ends its turn). The end-of-turn token is the tokenizer's EOS token (``<|im_end|>`` for SmolLM2-Instruct).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from selfcorrect.config import StrictModel
from selfcorrect.errors import UserError
from selfcorrect.rundir import MANIFEST, REWARD_MANIFEST

FORMATS = ("human_assistant", "chat_template")
HUMAN_TURN = "\n\nHuman:"
ASSISTANT_TURN = "\n\nAssistant:"

Messages = list[dict[str, Any]]


class DialogueSpec(StrictModel):
    """The run's dialogue format; ``dialogue: human_assistant`` is short for ``dialogue: {format: human_assistant}``."""

    format: Literal["human_assistant", "chat_template"] = "human_assistant"
    system_prompt: str | None = None  # chat_template only: None = the template's default system turn

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"format": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _system_prompt_needs_a_template(self) -> DialogueSpec:
        if self.format == "human_assistant" and self.system_prompt is not None:
            raise ValueError("system_prompt applies to format chat_template only (human_assistant has no system turn)")
        return self

    def describe(self) -> str:
        """One line for logs and dry runs, e.g. ``chat_template (system prompt: template default)``."""
        if self.format == "human_assistant":
            return 'human_assistant ("\\n\\nHuman: ...\\n\\nAssistant:")'
        system = "template default" if self.system_prompt is None else json.dumps(self.system_prompt)
        return f"chat_template (system prompt: {system})"

    def record(self) -> dict[str, Any]:
        """What manifests store."""
        return self.model_dump(mode="json")


def parse(value: Any, where: str) -> DialogueSpec:
    """A DialogueSpec from a format name or a mapping; a bad value is a one-line UserError naming ``where``."""
    from pydantic import ValidationError

    try:
        return DialogueSpec.model_validate(value)
    except ValidationError as exc:
        problem = exc.errors()[0]
        field = ".".join(str(p) for p in problem["loc"])
        message = f"unknown format {value!r} (known: {', '.join(FORMATS)})" if field == "format" else problem["msg"]
        raise UserError(f"{where}: {message}") from None


# ---- text ---------------------------------------------------------------------------------------------------------


def _with_system(messages: Messages, spec: DialogueSpec) -> Messages:
    if spec.system_prompt is None or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": spec.system_prompt}, *messages]


def prompt_text(messages: Messages, spec: DialogueSpec, tokenizer: Any = None) -> str:
    """The text of a conversation (ending with a user turn) up to the opened assistant turn.

    ``human_assistant``: ``"\\n\\nHuman: ...\\n\\nAssistant:"`` (no trailing space); ``chat_template``: the template
    with the generation prompt.
    """
    if spec.format == "human_assistant":
        parts = []
        for message in messages:
            role, content = message.get("role"), str(message.get("content", ""))
            if role == "system":
                parts.append(content)
            else:
                parts.append(f"{ASSISTANT_TURN if role == 'assistant' else HUMAN_TURN} {content}")
        return "".join(parts) + ASSISTANT_TURN
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "the model")
        raise UserError(f"dialogue chat_template: {name}: the tokenizer has no chat template")
    return tokenizer.apply_chat_template(_with_system(messages, spec), tokenize=False, add_generation_prompt=True)


def separator(spec: DialogueSpec) -> str:
    """What comes between an opened assistant turn and its text: one space in the HH format, nothing in a template."""
    return " " if spec.format == "human_assistant" else ""


def continued_text(messages: Messages, assistant_prefix: str, spec: DialogueSpec, tokenizer: Any = None) -> str:
    """A conversation whose assistant turn is opened and continued with ``assistant_prefix`` (evaluation prompts)."""
    return prompt_text(messages, spec, tokenizer) + separator(spec) + assistant_prefix


def stop_strings(spec: DialogueSpec) -> list[str]:
    """Text that ends an assistant turn besides EOS: the next Human turn in the HH format."""
    return [HUMAN_TURN] if spec.format == "human_assistant" else []


# ---- token ids ----------------------------------------------------------------------------------------------------


def add_special_tokens(spec: DialogueSpec) -> bool:
    """Whether the tokenizer adds its special tokens (BOS...) to the text; a chat template writes its own."""
    return spec.format == "human_assistant"


def encode(tokenizer: Any, text: str, spec: DialogueSpec) -> list[int]:
    """Token ids of a rendered prompt."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens(spec))["input_ids"])


def encode_many(tokenizer: Any, texts: list[str], spec: DialogueSpec) -> list[list[int]]:
    """Token ids of many rendered prompts at once (the same ids as :func:`encode` of each)."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens(spec))["input_ids"]]


def prompt_ids(tokenizer: Any, messages: Messages, spec: DialogueSpec) -> list[int]:
    """Token ids of a conversation up to the opened assistant turn (a PPO prompt; the prompt of a training example)."""
    return encode(tokenizer, prompt_text(messages, spec, tokenizer), spec)


def reply_ids(tokenizer: Any, reply: str, spec: DialogueSpec) -> list[int]:
    """Token ids of an assistant reply as it follows the opened turn (without the end-of-turn token)."""
    return list(tokenizer(separator(spec) + reply, add_special_tokens=False)["input_ids"])


def example_ids(tokenizer: Any, messages: Messages, reply: str, spec: DialogueSpec) -> tuple[list[int], int]:
    """``(ids, n_prompt)`` of a complete exchange: prompt ids, reply ids, then the end-of-turn (EOS) token."""
    prompt = prompt_ids(tokenizer, messages, spec)
    return prompt + reply_ids(tokenizer, reply, spec) + [tokenizer.eos_token_id], len(prompt)


# ---- what a stage recorded ----------------------------------------------------------------------------------------

MANIFEST_NAMES = (MANIFEST, REWARD_MANIFEST)


def recorded(model_dir: str | Path) -> DialogueSpec | None:
    """The dialogue format a selfcorrect output directory (SFT, reward model, PPO checkpoint) was trained in.

    None for anything else (a hub id, a plain model directory, an output written before formats were recorded).
    """
    path = Path(str(model_dir)).expanduser()
    for name in MANIFEST_NAMES:
        manifest = path / name
        if manifest.is_file():
            try:
                value = json.loads(manifest.read_text(encoding="utf-8")).get("dialogue")
            except (OSError, ValueError, AttributeError):
                raise UserError(f"{manifest}: cannot read the manifest") from None
            return None if value is None else parse(value, f"{manifest}: dialogue")
    return None
