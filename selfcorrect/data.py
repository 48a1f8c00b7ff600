"""Datasets for the training stages, in TRL's conversational formats.

A :class:`~selfcorrect.config.DatasetSpec` names a local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.csv``,
``.parquet``, or ``.txt`` with one document per line for format ``text``) or, when the path is not an existing
file, a Hugging Face Hub dataset (``datasets.load_dataset(path, name, split=split)``). Its ``format`` says how a
record becomes an example; each builder below turns records into one kind of example:

- :func:`sft_dataset` -> ``messages``: hh (the chosen conversation), messages, pairwise (prompt + chosen), ranked
  (prompt + best response);
- :func:`preference_dataset` -> ``prompt``, ``chosen``, ``rejected`` (TRL's explicit-prompt conversational
  preference format): hh, pairwise;
- :func:`ranked_dataset` -> ``prompt``, ``responses`` (best first): ranked; hh and pairwise give K = 2;
- :func:`prompt_dataset` -> ``prompt`` (ending with a user turn): hh (the turns before the last reply), prompt,
  pairwise, ranked;
- :func:`ptx_dataset` -> ``text``: text; hh (the chosen transcript as is).

Messages are ``{"role", "content"}`` dicts. Anthropic HH transcripts (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``)
are parsed by :func:`parse_hh_transcript`; the prompt of an HH record is every turn before the final assistant
turn, and chosen/rejected are the final assistant replies. Consecutive turns of the same speaker (a reply that
itself contains ``"\\n\\nAssistant:"``, which happens in the real data) are merged into one message.

Records that are well-formed but unusable are skipped with a logged warning, never silently: HH pairs whose
chosen and rejected transcripts have different prompts (not a comparison on one prompt; none in harmless-base
test once same-speaker turns are merged) are left out of preference and ranked data, and demonstrations whose
final reply is empty (4 in harmless-base test) are left out of SFT data. Missing or malformed fields are
:class:`~selfcorrect.errors.UserError`\\ s that name the file, the record (``line N`` of a line-based file,
``record N`` counted from 0 otherwise) and the field.

Every builder shuffles its examples with the seed and then keeps the first ``spec.limit``; split the result with
:func:`train_test_split` and ``spec.test_size``.

A dataset's identity (what the config hashes of the pipeline and of PPO's resume state record) is
:func:`dataset_identity`: a local file or directory by its content, not its path, so the same data reached from
another directory or machine is the same data; a Hub dataset by its id.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from selfcorrect.config import DatasetSpec
from selfcorrect.errors import UserError, first_line
from selfcorrect.io import iter_jsonl
from selfcorrect.provenance import content_fingerprint

logger = logging.getLogger(__name__)

Message = dict[str, str]
Record = dict[str, Any]

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet", ".txt")
ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# ---- Anthropic HH transcripts -------------------------------------------------------------------------------------


def parse_hh_transcript(text: str) -> list[Message]:
    """Split an HH transcript into ``[{"role": "user" | "assistant", "content": str}, ...]``.

    Turns start at ``"\\n\\nHuman:"`` / ``"\\n\\nAssistant:"``; contents are stripped of surrounding whitespace and
    consecutive turns of one speaker are merged (joined by a blank line). Raises ValueError if the text is not a
    transcript that starts with a Human turn.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}")
    parts = HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("not a transcript starting with '\\n\\nHuman:'")
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{content.strip()}".strip()
        else:
            messages.append({"role": role, "content": content.strip()})
    if messages[0]["role"] != "user":
        raise ValueError("the first turn is not a Human turn")
    return messages


def split_hh_transcript(text: str) -> tuple[list[Message], str]:
    """``(prompt, reply)``: the turns before the final assistant turn (ending with a user turn) and that reply."""
    messages = parse_hh_transcript(text)
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last turn is not an Assistant turn")
    return messages[:-1], messages[-1]["content"]


# ---- reading records ----------------------------------------------------------------------------------------------


def _looks_local(path: str) -> bool:
    return path.endswith((*LOCAL_SUFFIXES, ".gz")) or path.startswith((".", "/", "~"))


def dataset_source(spec: DatasetSpec, where: str) -> str:
    """``"file"`` for an existing local file, ``"hub"`` for a Hub dataset id (or a local dataset directory); a path
    that looks like a file name but does not exist is a UserError naming ``where``."""
    path = Path(spec.path).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir() or not _looks_local(spec.path):
        return "hub"
    raise UserError(f"{where}: {spec.path}: file not found")


def dataset_identity(spec: dict[str, Any], where: str | None = None) -> dict[str, Any]:
    """A dataset as the results made from it depend on it: a DatasetSpec's fields as dumped, with the ``path`` of a
    local file or directory replaced by ``content`` (:func:`~selfcorrect.provenance.content_fingerprint`: size and
    sha256), so identical data at another path is the same data; a Hub dataset keeps its id.

    With ``where`` (the config key, e.g. ``sft.data``), a path that looks like a local file but does not exist is a
    UserError naming it; without, it stays a path (a record made before, whose file has gone).
    """
    path = spec["path"]
    if Path(path).expanduser().exists():
        return {**{k: v for k, v in spec.items() if k != "path"}, "content": content_fingerprint(path)}
    if where is not None and _looks_local(path):
        raise UserError(f"{where}.path: {path}: file not found")
    return dict(spec)


def datasets_by_content(obj: Any, where: str | None = "") -> Any:
    """A config as dumped (dicts and lists) with each DatasetSpec in it replaced by its :func:`dataset_identity`.

    ``where``: the dotted key of ``obj`` (``""`` at the top), for the error of a missing local file; None: records
    made before, whose missing files stay paths. Idempotent: an identity is no DatasetSpec.
    """
    if isinstance(obj, dict):
        if {"path", "format"} <= obj.keys() <= DatasetSpec.model_fields.keys():
            return dataset_identity(obj, where)
        key = lambda k: None if where is None else f"{where}.{k}" if where else str(k)  # noqa: E731
        return {k: datasets_by_content(v, key(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [datasets_by_content(v, where) for v in obj]
    return obj


def load_records(spec: DatasetSpec) -> list[tuple[str, Record]]:
    """Every record of a dataset as ``(where, record)``, ``where`` being ``"line N"`` or ``"record N"``.

    A path that is an existing file is read by its extension; any other path that does not look like a file
    name is a Hugging Face Hub dataset id (or a local dataset directory) for ``datasets.load_dataset``.
    """
    if dataset_source(spec, spec.path) == "file":
        records = _read_file(Path(spec.path).expanduser(), spec.format)
    else:
        records = _read_hub(spec)
    if not records:
        raise UserError(f"{spec.path}: no records")
    return records


def _read_file(path: Path, fmt: str) -> list[tuple[str, Record]]:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return [(f"line {n}", obj) for n, obj in iter_jsonl(path)]
    if name.endswith(".json"):
        return _read_json(path)
    if name.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(f"line {reader.line_num}", {k: v for k, v in row.items() if v is not None}) for row in reader]
    if name.endswith(".parquet"):
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises its own error types for bad files
            raise UserError(f"{path}: cannot read the parquet file: {first_line(exc)}") from None
        return [(f"record {i}", row) for i, row in enumerate(rows)]
    if name.endswith(".txt"):
        if fmt != "text":
            raise UserError(f"{path}: a .txt file holds one document per line; it needs format 'text', not '{fmt}'")
        lines = path.read_text(encoding="utf-8").split("\n")
        return [(f"line {n}", {"text": line}) for n, line in enumerate(lines, start=1) if line.strip()]
    raise UserError(f"{path}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})")


def _read_json(path: Path) -> list[tuple[str, Record]]:
    """A JSON list of objects, or JSON lines under a .json name (as many Hub datasets have them)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return [(f"line {n}", obj) for n, obj in iter_jsonl(path)]
    if isinstance(data, dict):  # a single object is one record
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise UserError(f"{path}: record {i}: expected a JSON object, got {type(obj).__name__}")
    return [(f"record {i}", obj) for i, obj in enumerate(data)]


def _read_hub(spec: DatasetSpec) -> list[tuple[str, Record]]:
    import datasets

    from selfcorrect import hub

    hub.require(spec.path, "dataset", "data file")  # offline: fail now, not after a minute of retries

    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split)
    except Exception as exc:  # offline, unknown id, bad split/config: datasets raises many unrelated types
        raise UserError(
            f"{spec.path}: not a local file, and it cannot be loaded as a Hugging Face Hub dataset "
            f"(offline or not found): {first_line(exc)}"
        ) from None
    return [(f"record {i}", row) for i, row in enumerate(ds)]


# ---- fields of one record -----------------------------------------------------------------------------------------


class _Skip(Exception):
    """A well-formed record that one builder cannot use (the reason is logged)."""


class _Fields:
    """Typed access to the fields of one record; problems are UserErrors naming file, record and field."""

    def __init__(self, path: str, where: str, record: Record):
        self.at, self.record = f"{path}: {where}", record

    def error(self, field: str, problem: str) -> UserError:
        return UserError(f"{self.at}: field '{field}': {problem}")

    def get(self, field: str) -> Any:
        value = self.record.get(field)
        if value is None:
            raise UserError(f"{self.at}: missing field '{field}'")
        return value

    def text(self, field: str) -> str:
        value = self.get(field)
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {type(value).__name__}")
        return value

    def messages(self, field: str, value: Any = None) -> list[Message]:
        value = self.get(field) if value is None else value
        if not isinstance(value, list) or not value:
            raise self.error(field, "expected a non-empty list of {role, content} messages")
        return [self._message(field, m) for m in value]

    def _message(self, field: str, message: Any) -> Message:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise self.error(field, "expected messages with a string 'content'")
        if message.get("role") not in ROLES:
            raise self.error(field, f"unknown role {message.get('role')!r} (expected one of {', '.join(ROLES)})")
        return {"role": message["role"], "content": message["content"]}

    def prompt(self, field: str = "prompt") -> list[Message]:
        """A string (one user message) or a message list ending with a user turn."""
        value = self.get(field)
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else self.messages(field, value)
        if messages[-1]["role"] != "user":
            raise self.error(field, "the prompt must end with a user message")
        return messages

    def reply(self, field: str, value: Any = None) -> Message:
        """One assistant message: a string, a message, or a list holding one message."""
        value = self.get(field) if value is None else value
        if isinstance(value, str):
            return {"role": "assistant", "content": value}
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        message = self._message(field, value)
        if message["role"] != "assistant":
            raise self.error(field, "expected an assistant message")
        return message

    def hh(self, field: str) -> tuple[list[Message], str]:
        try:
            return split_hh_transcript(self.text(field))
        except ValueError as exc:
            raise self.error(field, f"malformed HH transcript: {exc}") from None

    def hh_pair(self) -> tuple[list[Message], str, str]:
        """``(prompt, chosen reply, rejected reply)`` of an HH record whose two transcripts share the prompt."""
        prompt, chosen = self.hh("chosen")
        rejected_prompt, rejected = self.hh("rejected")
        if rejected_prompt != prompt:
            raise _Skip("chosen and rejected transcripts have different prompts")
        return prompt, chosen, rejected


# ---- builders -----------------------------------------------------------------------------------------------------


def _build(spec: DatasetSpec, seed: int, what: str, examples: dict[str, Callable[[_Fields], Record]]) -> Dataset:
    """Turn every record into an example with ``examples[spec.format]``, shuffle with the seed, apply the limit."""
    if spec.format not in examples:
        raise UserError(f"{spec.path}: format '{spec.format}' cannot give {what} (supported: {', '.join(examples)})")
    make = examples[spec.format]
    rows: list[Record] = []
    skipped: Counter[str] = Counter()
    for where, record in load_records(spec):
        try:
            rows.append(make(_Fields(spec.path, where, record)))
        except _Skip as skip:
            skipped[str(skip)] += 1
    for reason, count in skipped.items():
        logger.warning("%s: skipped %d record(s) for %s: %s", spec.path, count, what, reason)
    if not rows:
        raise UserError(f"{spec.path}: no usable records for {what} ({dict(skipped)})")
    order = np.random.default_rng(seed).permutation(len(rows))[: spec.limit]
    return Dataset.from_list([rows[i] for i in order])


def _sft_hh(r: _Fields) -> Record:
    prompt, reply = r.hh("chosen")
    if not reply.strip():
        raise _Skip("the final reply is empty")
    return {"messages": [*prompt, {"role": "assistant", "content": reply}]}


def _sft_messages(r: _Fields) -> Record:
    messages = r.messages("messages")
    if messages[-1]["role"] != "assistant" or not any(m["role"] == "user" for m in messages[:-1]):
        raise r.error("messages", "a demonstration needs a user message and must end with an assistant message")
    if not messages[-1]["content"].strip():
        raise _Skip("the final reply is empty")
    return {"messages": messages}


def sft_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """Demonstrations: a ``messages`` column, each conversation ending with the assistant reply to learn.

    hh: the chosen transcript's conversation; messages: as is; pairwise: prompt + chosen; ranked: prompt + the
    best response.
    """
    return _build(
        spec,
        seed,
        "SFT demonstrations",
        {
            "hh": _sft_hh,
            "messages": _sft_messages,
            "pairwise": lambda r: {"messages": [*r.prompt(), r.reply("chosen")]},
            "ranked": lambda r: {"messages": [*r.prompt(), _responses(r)[0]]},
        },
    )


def _preference_hh(r: _Fields) -> Record:
    prompt, chosen, rejected = r.hh_pair()
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def preference_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """Pairwise comparisons in TRL's explicit-prompt conversational preference format (as RewardTrainer takes it).

    Columns ``prompt`` (messages ending with a user turn), ``chosen`` and ``rejected`` (each
    ``[{"role": "assistant", "content": ...}]``). Formats hh and pairwise.
    """
    return _build(
        spec,
        seed,
        "preference pairs",
        {
            "hh": _preference_hh,
            "pairwise": lambda r: {
                "prompt": r.prompt(),
                "chosen": [r.reply("chosen")],
                "rejected": [r.reply("rejected")],
            },
        },
    )


def _responses(r: _Fields) -> list[Message]:
    value = r.get("responses")
    if not isinstance(value, list) or len(value) < 2:
        raise r.error("responses", "expected a list of at least 2 responses, best first")
    return [r.reply("responses", item) for item in value]


def _ranked_hh(r: _Fields) -> Record:
    prompt, chosen, rejected = r.hh_pair()
    return {
        "prompt": prompt,
        "responses": [{"role": "assistant", "content": chosen}, {"role": "assistant", "content": rejected}],
    }


def ranked_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """K-wise comparisons (InstructGPT): ``prompt`` (messages) and ``responses`` (assistant messages, best first).

    Format ranked; hh and pairwise records give K = 2 (chosen, rejected).
    """
    return _build(
        spec,
        seed,
        "ranked responses",
        {
            "ranked": lambda r: {"prompt": r.prompt(), "responses": _responses(r)},
            "hh": _ranked_hh,
            "pairwise": lambda r: {"prompt": r.prompt(), "responses": [r.reply("chosen"), r.reply("rejected")]},
        },
    )


def prompt_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """Prompts for RL: a ``prompt`` column of message lists ending with a user turn.

    hh: the turns before the chosen transcript's final reply; prompt, pairwise, ranked: the ``prompt`` field (a
    string becomes one user message).
    """
    return _build(
        spec,
        seed,
        "prompts",
        {
            "hh": lambda r: {"prompt": r.hh("chosen")[0]},
            "prompt": lambda r: {"prompt": r.prompt()},
            "pairwise": lambda r: {"prompt": r.prompt()},
            "ranked": lambda r: {"prompt": r.prompt()},
        },
    )


def _ptx_text(r: _Fields) -> Record:
    text = r.text("text")
    if not text.strip():
        raise _Skip("the text is empty")
    return {"text": text}


def ptx_dataset(spec: DatasetSpec, seed: int) -> Dataset:
    """Pretraining-style documents for the ptx loss: a ``text`` column.

    text: the ``text`` field (or the lines of a .txt file); hh: the chosen transcript as is.
    """
    return _build(spec, seed, "ptx texts", {"text": _ptx_text, "hh": lambda r: {"text": r.text("chosen")}})


def train_test_split(ds: Dataset, test_size: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Seeded split into ``(train, test)``; ``test_size`` 0 gives ``(ds, None)``.

    The test set has ``ceil(test_size * len(ds))`` examples; a split that leaves no training example is an error.
    """
    if test_size <= 0:
        return ds, None
    n_test = math.ceil(test_size * len(ds))
    if n_test >= len(ds):
        raise UserError(f"test_size {test_size} leaves no training examples out of {len(ds)}")
    split = ds.train_test_split(test_size=n_test, seed=seed)
    return split["train"], split["test"]
