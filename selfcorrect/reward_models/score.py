"""Scoring (prompt, response) pairs with a reward model saved by :func:`~selfcorrect.train.reward.run_reward`
or with a plain Python reward function.

A reward reference given to :meth:`RewardModel.load` is one of:

* a directory written by ``run_reward``: a sequence classifier with one output (``num_labels == 1``), its
  tokenizer, and ``reward_manifest.json`` holding the normalisation bias (InstructGPT: the mean reward of
  the SFT demonstrations is 0), the dialogue format it was trained in and its ``max_length``. A
  sequence-classification directory without the manifest loads with bias 0;
* a directory whose manifest names a ``function`` (``run_reward`` with ``reward.function`` set);
* ``"module:function"``: an importable function ``f(prompts: list[str], responses: list[str]) -> list[float]``.
  Its result is checked where it comes back (:func:`checked_rewards`: one finite real number per response, as a list,
  tuple, 1-D array or 1-D tensor); anything else, or an exception inside it, is a one-line error naming the reward.

How a (prompt, response) pair becomes tokens (shared with training, so scores match what the model was trained on):
:func:`selfcorrect.dialogue.example_ids` in the reward model's dialogue format -- the prompt messages up to the opened
assistant turn, the response, then the end-of-turn (EOS) token. PPO hands the rollout's own token ids to
:meth:`RewardModel.score_ids` instead, with EOS only where the policy produced one. Sequences longer than
``max_length`` are dropped from reward training, so they cannot be scored (a ValueError; PPO's config check keeps
prompt + response within it).

The sequence classifier reads the score at the right-most token that is not the pad token (transformers'
``GenericForSequenceClassification``). Sequences are always right-padded here, as in training, so position ids are
the same as in training and the score does not depend on the batch a sequence lands in. (Where the pad token is
the EOS token, as for SmolLM2, the score is read at the token before a final EOS, in training and scoring alike.)
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from selfcorrect import dialogue as dialogues
from selfcorrect.config.reward import FUNCTION_SPEC
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError
from selfcorrect.models import parse_dtype
from selfcorrect.rundir import REWARD_MANIFEST

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
Prompt = str | Messages  # messages, or a string already rendered in the dialogue format
Response = str | dict[str, Any] | Messages  # text, one assistant message, or a list of messages


# ---- rendering ---------------------------------------------------------------------------------------------------


def response_messages(response: Response) -> Messages:
    """A response as a list of messages: a string becomes one assistant message."""
    if isinstance(response, str):
        return [{"role": "assistant", "content": response}]
    if isinstance(response, dict):
        return [response]
    return list(response)


def response_text(response: Response) -> str:
    """A response as plain text: the concatenated contents of its messages."""
    return "".join(str(message.get("content", "")) for message in response_messages(response))


def encode(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, response: Response, dialogue: DialogueSpec) -> list:
    """Token ids of one complete (prompt, response) exchange in a dialogue format (ends with the EOS token).

    A prompt is a message list, or a string already rendered in the format (e.g. ``"\\n\\nHuman: hi\\n\\nAssistant:"``).
    """
    if isinstance(prompt, str):
        reply = dialogues.reply_ids(tokenizer, response_text(response), dialogue)
        return dialogues.encode(tokenizer, prompt, dialogue) + reply + [tokenizer.eos_token_id]
    return dialogues.example_ids(tokenizer, prompt, response_text(response), dialogue)[0]


def hh_prompt(prompt: Prompt) -> str:
    """A prompt as the HH-format string that function rewards receive (strings are passed as they are)."""
    return prompt if isinstance(prompt, str) else dialogues.prompt_text(prompt, DialogueSpec())


# ---- function rewards --------------------------------------------------------------------------------------------


def load_function(spec: str) -> Callable[[list[str], list[str]], Sequence[float]]:
    """Import ``"module:function"``; any problem is a one-line UserError naming the spec."""
    if not FUNCTION_SPEC.match(spec):
        raise UserError(f"{spec}: not a reward model directory nor a 'module:function' reward")
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module failing at import time
        raise UserError(f"{spec}: cannot import module '{module_name}' ({type(exc).__name__}: {exc})") from None
    function = getattr(module, function_name, None)
    if function is None:
        raise UserError(f"{spec}: module '{module_name}' has no attribute '{function_name}'")
    if not callable(function):
        raise UserError(f"{spec}: '{function_name}' is not callable")
    return function


def reward_label(reward: Any) -> str:
    """How errors name a reward: a :class:`RewardModel`'s source, else a function's ``module:qualname``."""
    source = getattr(reward, "source", "")
    if source:
        return str(source)
    if isinstance(reward, RewardModel) and reward.function is None:
        return "(a reward model in memory)"
    function = getattr(reward, "function", None) or reward
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or type(function).__name__
    module = getattr(function, "__module__", None)
    return f"{module}:{name}" if module else str(name)


def _short(value: Any, limit: int = 40) -> str:
    """A value's repr on one line, at most ``limit`` characters."""
    try:
        text = " ".join(repr(value).split())
    except Exception:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _a(value: Any) -> str:
    """``"a str ('x')"``, ``"an int (3)"``, ``"None"``: a value's type with its article, and its short repr."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiouAEIOU' else 'a'} {name} ({_short(value)})"


def _where(reward: str, step: int | None) -> str:
    return f"reward {reward}: " + ("" if step is None else f"at RLHF step {step}: ")


def _first_non_finite(values: torch.Tensor) -> str | None:
    """``"NaN at index i"`` / ``"inf at index i"`` / ``"-inf at index i"`` for the first non-finite value, else None."""
    bad = (~torch.isfinite(values)).nonzero()
    if not len(bad):
        return None
    index = int(bad[0, 0])
    value = float(values[index])
    return f"{'NaN' if math.isnan(value) else ('inf' if value > 0 else '-inf')} at index {index}"


def _real_dtype(values: torch.Tensor | np.ndarray) -> bool:
    """An integer or floating dtype (not bool, not complex, not strings or objects)."""
    if isinstance(values, np.ndarray):
        return values.dtype.kind in "iuf"
    return values.dtype != torch.bool and not values.dtype.is_complex


def _is_number(value: Any) -> bool:
    """A real number: int, float, a numpy scalar or 0-d array or tensor of a real dtype; not a bool."""
    if isinstance(value, bool | np.bool_):
        return False
    if isinstance(value, numbers.Real):  # int, float, np.integer, np.floating
        return True
    return isinstance(value, torch.Tensor | np.ndarray) and value.ndim == 0 and _real_dtype(value)


def checked_rewards(values: Any, n: int, reward: str, step: int | None = None) -> torch.Tensor:
    """What a reward function returned, checked: ``n`` finite real numbers as float32 on the CPU, shape ``(n,)``.

    Accepted: a list, tuple (or other sequence) of ints and floats (numpy scalars and 0-d tensors too), a 1-D numpy
    array or a 1-D torch tensor of an integer or float dtype. Refused, as a one-line UserError naming ``reward`` and
    the RLHF ``step`` (when given): None, a string, a mapping, an iterator, another shape or length, bools, strings or
    other objects among the values, NaN or infinity, or a number beyond float32's range.
    """
    where = _where(reward, step)
    if values is None:
        raise UserError(f"{where}returned None; return one number per response")
    if isinstance(values, str | bytes):
        raise UserError(f"{where}returned {_a(values)}; return one number per response")
    if isinstance(values, torch.Tensor | np.ndarray):
        kind = "tensor" if isinstance(values, torch.Tensor) else "array"
        if values.ndim != 1:
            shape = tuple(values.shape)
            raise UserError(f"{where}returned a {values.ndim}-D {kind} of shape {shape}; return one value per response")
        if not _real_dtype(values):
            raise UserError(f"{where}returned {'a tensor' if kind == 'tensor' else 'an array'} of dtype {values.dtype}")
        items: Sequence[Any] | None = None
    elif isinstance(values, Sequence):
        items = values
    else:
        raise UserError(f"{where}returned {_a(values)}; return a list of numbers, one per response")
    if len(values) != n:
        raise UserError(f"{where}returned {len(values)} value{'' if len(values) == 1 else 's'} for {n} responses")
    if items is None:  # a tensor or an array of real numbers
        wide = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64)
    else:
        floats = []
        for index, item in enumerate(items):
            if not _is_number(item):
                raise UserError(f"{where}returned {_a(item)} at index {index}")
            try:
                floats.append(float(item))
            except OverflowError:  # an int beyond any float
                raise UserError(f"{where}returned {_short(item)} at index {index}: beyond float range") from None
        wide = torch.tensor(floats, dtype=torch.float64)
    problem = _first_non_finite(wide)
    if problem is not None:
        raise UserError(f"{where}returned {problem}")
    rewards = wide.to(torch.float32)
    problem = _first_non_finite(rewards)
    if problem is not None:
        index = int(problem.rsplit(" ", 1)[1])
        raise UserError(f"{where}returned {float(wide[index]):g} at index {index}: beyond float32's range")
    return rewards


def checked_scores(scores: torch.Tensor, reward: str, step: int | None = None, dtype: Any = None) -> torch.Tensor:
    """A reward model's scores, refused if any is NaN or infinite (a 16-bit overflow, or broken weights): a one-line
    UserError naming the reward model, the RLHF step (when given) and the dtype of its weights (when given)."""
    problem = _first_non_finite(scores.detach().float().cpu())
    if problem is not None:
        when = "" if step is None else f"at RLHF step {step}: "
        weights = "" if dtype is None else f" (its weights in {dtype})"
        raise UserError(f"reward model {reward}: {when}scored {problem}{weights}")
    return scores


def call_reward(
    function: Callable[..., Any], prompts: list[Any], responses: list[str], reward: str, step: int | None = None
) -> torch.Tensor:
    """``function(prompts, responses)``, checked by :func:`checked_rewards`; an exception inside it becomes a one-line
    UserError naming the reward, the RLHF step (when given) and the exception's type and first line."""
    try:
        values = function(prompts, responses)
    except Exception as exc:
        when = "raised" if step is None else f"raised at RLHF step {step}"
        message = str(exc).strip()
        what = type(exc).__name__ + (f": {message.splitlines()[0][:300]}" if message else "")
        raise UserError(f"reward {reward}: {when}: {what}") from exc
    return checked_rewards(values, len(responses), reward, step)


# ---- the reward model --------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The ``reward_manifest.json`` of a directory, or None if there is none."""
    manifest_path = path / REWARD_MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{manifest_path}: cannot read the reward manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{manifest_path}: expected a JSON object")
    return manifest


def check_reward_dir(path: Path) -> Any:
    """The config of a reward-model directory; UserError unless it holds a scalar-head sequence classifier."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a reward model (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read config.json ({exc})") from None
    architectures = config.architectures or []
    is_classifier = any(name.endswith("ForSequenceClassification") for name in architectures)
    if not is_classifier or config.num_labels != 1:
        raise UserError(f"{path}: not a reward model (no scalar head)")
    has_weights = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_weights:
        raise UserError(f"{path}: no safetensors weights (model.safetensors) found")
    return config


class RewardModel:
    """A reward: a scalar-head sequence classifier plus a bias, or a Python function.

    ``score(prompts, responses)`` returns one float32 reward per pair (on the CPU), with the bias added.
    Build one with :meth:`load`, or directly from an in-memory model and tokenizer.
    """

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        bias: float = 0.0,
        function: Callable[[list[str], list[str]], Sequence[float]] | None = None,
        max_length: int | None = None,
        dialogue: DialogueSpec | None = None,
        source: str = "",
    ):
        if (model is None) == (function is None):
            raise ValueError("give either a model (with its tokenizer) or a function")
        if model is not None and tokenizer is None:
            raise ValueError("a model needs its tokenizer")
        self.model: Any = model  # a transformers sequence classifier (or a PEFT value model: share_base_of)
        self.adapters_off = False  # the model is a LoRA value model on this reward model's weights (share_base_of)
        self.tokenizer: Any = tokenizer
        self.bias = float(bias)
        self.function = function
        self.max_length = max_length
        self.dialogue = dialogue  # the format it was trained in (None: not recorded)
        self.source = source
        if model is not None:
            assert tokenizer is not None  # checked above
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            text_config = model.config.get_text_config()
            if text_config.pad_token_id is None:
                text_config.pad_token_id = tokenizer.pad_token_id
            if self.max_length is None:
                self.max_length = getattr(text_config, "max_position_embeddings", None)

    # -- loading --

    @classmethod
    def load(
        cls, path_or_function: str | Path, device: str | None = None, dtype: str | torch.dtype | None = None
    ) -> RewardModel:
        """Load a reward from a ``run_reward`` output directory or a ``"module:function"`` spec.

        ``device`` defaults to this process's own device (accelerate's: ``cuda:<local rank>`` under a multi-GPU
        launch, else CUDA when available, else the CPU); ``dtype`` to float32 on the CPU and bf16/fp16 on a GPU.
        """
        from accelerate import PartialState

        from selfcorrect.models import load_tokenizer

        spec = str(path_or_function)
        path = Path(spec).expanduser()
        if not path.is_dir():
            if FUNCTION_SPEC.match(spec):
                return cls(function=load_function(spec), source=spec)
            if path.exists():
                raise UserError(f"{spec}: not a reward model directory")
            raise UserError(f"{spec}: reward model not found (neither a directory nor a 'module:function' spec)")

        manifest = read_manifest(path) or {}
        if manifest.get("function"):
            return cls(function=load_function(str(manifest["function"])), source=spec)

        config = check_reward_dir(path)
        from transformers import AutoModelForSequenceClassification

        device = device or str(PartialState().device)
        torch_dtype = parse_dtype(dtype, device)
        tokenizer = load_tokenizer(str(path))
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype, use_safetensors=True)
        model.eval().to(device)
        bias = manifest.get("bias", getattr(config, "reward_bias", 0.0)) or 0.0
        if not math.isfinite(float(bias)):
            raise UserError(f"{path / REWARD_MANIFEST}: bias: not a finite number")
        dialogue = manifest.get("dialogue")
        dialogue = None if dialogue is None else dialogues.parse(dialogue, f"{path / REWARD_MANIFEST}: dialogue")
        return cls(
            model, tokenizer, bias=float(bias), max_length=manifest.get("max_length"), dialogue=dialogue, source=spec
        )

    def share_base_of(self, value_model: Any) -> bool:
        """Score with ``value_model`` -- PEFT LoRA adapters (and a trained copy of the scalar head) on a copy of this
        reward model -- with its adapters off, which is this reward model, and drop this one's own copy of the
        weights. Only where the two agree in dtype, device and pad token (the readout position); returns whether it
        did."""
        if self.model is None or not hasattr(value_model, "disable_adapter"):
            return False
        mine, theirs = next(self.model.parameters()), next(value_model.parameters())
        pad = self.model.config.get_text_config().pad_token_id
        if (mine.dtype, mine.device, pad) != (theirs.dtype, theirs.device, value_model.config.pad_token_id):
            return False
        self.model, self.adapters_off = value_model, True
        return True

    # -- scoring --

    @property
    def device(self) -> torch.device:
        if self.model is None:
            return torch.device("cpu")
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> torch.Tensor:
        """Raw model scores (bias NOT added) of tokenized sequences, as float32 on the CPU.

        Sequences longer than ``max_length`` are a ValueError: reward training drops them, so the model never saw
        one (callers keep within it). Batches are formed from sequences of similar length and right-padded.
        """
        if self.model is None:
            raise ValueError("score_ids needs a model reward, not a function reward")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        model, pad_id = self.model, self.tokenizer.pad_token_id
        was_training = model.training
        model.eval()
        seqs = [list(s) for s in sequences]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("cannot score an empty token sequence")
        too_long = [len(s) for s in seqs if self.max_length and len(s) > self.max_length]
        if too_long:
            raise ValueError(f"{len(too_long)} sequence(s) longer than the reward model's max_length {self.max_length}")
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = torch.empty(len(seqs), dtype=torch.float32)
        device = self.device
        as_trained = model.disable_adapter() if self.adapters_off else contextlib.nullcontext()  # share_base_of
        try:
            with as_trained:
                for start in range(0, len(order), batch_size):
                    idx = order[start : start + batch_size]
                    width = max(len(seqs[i]) for i in idx)
                    input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
                    for row, i in enumerate(idx):
                        input_ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                        attention_mask[row, : len(seqs[i])] = 1
                    logits = model(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
                    ).logits
                    out[idx] = logits[:, 0].float().cpu()
        finally:
            model.train(was_training)
        return out

    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[Response],
        batch_size: int = 16,
        dialogue: DialogueSpec | None = None,
    ) -> torch.Tensor:
        """Rewards (with the bias) of complete (prompt, response) exchanges: float32, shape ``(len(prompts),)``.

        Prompts are message lists (or strings already in the format); a model reward tokenizes each exchange with
        :func:`encode` in ``dialogue`` (default: the format the reward model was trained in, else ``human_assistant``).
        Function rewards get HH-format prompt strings (``"\\n\\nHuman: ...\\n\\nAssistant:"``) and plain response
        strings.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if self.function is not None:
            return self.score_texts([hh_prompt(p) for p in prompts], responses)
        spec = dialogue or self.dialogue or DialogueSpec()
        ids = [encode(self.tokenizer, p, r, spec) for p, r in zip(prompts, responses, strict=True)]
        return self.score_ids(ids, batch_size=batch_size) + self.bias

    def score_texts(
        self, prompts: Sequence[str], responses: Sequence[Response], step: int | None = None
    ) -> torch.Tensor:
        """Rewards (with the bias) from a function reward, given HH-format prompt strings: checked by
        :func:`call_reward` (errors name ``step``, the RLHF step, when given)."""
        if self.function is None:
            raise ValueError("score_texts needs a function reward, not a model reward")
        texts = [response_text(r) for r in responses]
        rewards = call_reward(self.function, list(prompts), texts, self.source or reward_label(self), step)
        return rewards + self.bias

    __call__ = score
