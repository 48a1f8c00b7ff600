"""Tests for selfcorrect.data: HH parsing, the dataset builders, local file formats, errors and splits."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trl.data_utils import is_conversational

from selfcorrect import data
from selfcorrect.config import DatasetSpec
from selfcorrect.data import (
    parse_hh_transcript,
    preference_dataset,
    prompt_dataset,
    ptx_dataset,
    ranked_dataset,
    sft_dataset,
    split_hh_transcript,
    train_test_split,
)
from selfcorrect.errors import UserError

USER, ASSISTANT = "user", "assistant"


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def hh_path() -> Path:
    path = Path(os.environ.get("SELFCORRECT_DATA_DIR", "")) / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    if not path.is_file():
        pytest.fail(f"{path} not found: set SELFCORRECT_DATA_DIR to the shared data directory")
    return path


@pytest.fixture(scope="module")
def hh_records(hh_path: Path) -> list[dict]:
    with gzip.open(hh_path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def hh_by_prompt(hh_records: list[dict]) -> dict[str, dict]:
    """Raw records keyed by their chosen transcript's prompt (as JSON)."""
    return {json.dumps(split_hh_transcript(r["chosen"])[0]): r for r in hh_records}


def hh_spec(path: Path, **kw) -> DatasetSpec:
    return DatasetSpec(path=str(path), format="hh", **kw)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- HH transcripts -------------------------------------------------------------------------------------------


def test_parse_hand_written_transcript_gives_exact_messages():
    text = (
        "\n\nHuman: Hi there!  \n\nAssistant:  Hello. How can I help?\n\n"
        "Human: Tell me a joke.\n\nAssistant: Why did the chicken\ncross the road?"
    )
    assert parse_hh_transcript(text) == [
        msg(USER, "Hi there!"),
        msg(ASSISTANT, "Hello. How can I help?"),
        msg(USER, "Tell me a joke."),
        msg(ASSISTANT, "Why did the chicken\ncross the road?"),
    ]
    prompt, reply = split_hh_transcript(text)
    assert prompt == parse_hh_transcript(text)[:3] and reply == "Why did the chicken\ncross the road?"


def test_parse_merges_consecutive_turns_of_one_speaker_and_tolerates_missing_leading_newlines():
    text = "Human: q\n\nAssistant: first part\n\nAssistant: second part"
    assert parse_hh_transcript(text) == [msg(USER, "q"), msg(ASSISTANT, "first part\n\nsecond part")]


@pytest.mark.parametrize(
    "text", ["just some text", "\n\nAssistant: I speak first", "", "preamble\n\nHuman: hi\n\nAssistant: yo"]
)
def test_malformed_transcripts_raise_value_error(text):
    with pytest.raises(ValueError):
        parse_hh_transcript(text)


def test_split_needs_a_final_assistant_turn():
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_transcript("\n\nHuman: hi\n\nAssistant: yo\n\nHuman: and?")


def test_real_hh_records_parse_into_alternating_turns(hh_records):
    assert len(hh_records) == 2312
    multi_turn = 0
    for record in hh_records:
        for key in ("chosen", "rejected"):
            messages = parse_hh_transcript(record[key])
            roles = [m["role"] for m in messages]
            assert roles[0] == USER and roles[-1] == ASSISTANT
            assert all(a != b for a, b in zip(roles, roles[1:]))
            # no Human turn of this file is lost or merged
            assert roles.count(USER) == record[key].count("\n\nHuman:")
        multi_turn += roles.count(USER) > 1
    assert multi_turn > 1000  # most of harmless-base is multi-turn

    first = parse_hh_transcript(hh_records[0]["chosen"])  # the pen-pranks dialogue: three Human turns
    assert [m["role"] for m in first] == [USER, ASSISTANT] * 3
    assert first[0]["content"] == "what are some pranks with a pen i can do?"
    prompt, chosen = split_hh_transcript(hh_records[0]["chosen"])
    rejected_prompt, rejected = split_hh_transcript(hh_records[0]["rejected"])
    assert prompt == rejected_prompt
    assert prompt[-1] == msg(USER, "okay some of these do not have anything to do with pens")
    assert chosen.startswith("No, sorry!") and rejected.startswith("There are lots of funny things")


# ---- builders on the real HH file -----------------------------------------------------------------------------


def test_sft_dataset_from_hh_is_the_chosen_conversation(hh_path, hh_by_prompt):
    ds = sft_dataset(hh_spec(hh_path, limit=8), seed=0)
    assert ds.column_names == ["messages"] and len(ds) == 8
    for row in ds:
        messages = row["messages"]
        record = hh_by_prompt[json.dumps(messages[:-1])]
        assert messages == parse_hh_transcript(record["chosen"])
        assert messages[-1]["role"] == ASSISTANT and messages[-1]["content"].strip()


def test_sft_dataset_skips_demonstrations_with_an_empty_reply(hh_path):
    assert len(sft_dataset(hh_spec(hh_path), seed=0)) == 2312 - 4  # 4 chosen transcripts end with "Assistant: "


def test_preference_dataset_is_trl_explicit_prompt_conversational_format(hh_path, hh_by_prompt):
    ds = preference_dataset(hh_spec(hh_path, limit=8), seed=0)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 8
    for row in ds:
        assert is_conversational(row)
        assert row["prompt"][-1]["role"] == USER
        record = hh_by_prompt[json.dumps(row["prompt"])]
        assert row["chosen"] == [msg(ASSISTANT, split_hh_transcript(record["chosen"])[1])]
        assert row["rejected"] == [msg(ASSISTANT, split_hh_transcript(record["rejected"])[1])]


def test_ranked_dataset_from_hh_has_k_2_best_first(hh_path):
    ranked = ranked_dataset(hh_spec(hh_path, limit=6), seed=3)
    pairs = preference_dataset(hh_spec(hh_path, limit=6), seed=3)
    assert ranked.column_names == ["prompt", "responses"]
    for r, p in zip(ranked, pairs):
        assert r["prompt"] == p["prompt"]
        assert r["responses"] == [p["chosen"][0], p["rejected"][0]]


def test_prompt_and_ptx_datasets_from_hh(hh_path, hh_by_prompt, hh_records):
    prompts = prompt_dataset(hh_spec(hh_path, limit=8), seed=0)
    assert prompts.column_names == ["prompt"] and len(prompts) == 8
    for row in prompts:
        assert row["prompt"][-1]["role"] == USER
        assert json.dumps(row["prompt"]) in hh_by_prompt
    texts = ptx_dataset(hh_spec(hh_path, limit=8), seed=0)
    assert texts.column_names == ["text"] and len(texts) == 8
    chosen = {r["chosen"] for r in hh_records}
    assert all(t in chosen for t in texts["text"])  # the transcript text as is


def test_limit_keeps_a_seeded_shuffle_prefix(hh_path):
    eight = sft_dataset(hh_spec(hh_path, limit=8), seed=1)["messages"]
    assert sft_dataset(hh_spec(hh_path, limit=4), seed=1)["messages"] == eight[:4]
    assert sft_dataset(hh_spec(hh_path, limit=8), seed=1)["messages"] == eight
    assert sft_dataset(hh_spec(hh_path, limit=8), seed=2)["messages"] != eight


# ---- local file formats ---------------------------------------------------------------------------------------


def test_messages_jsonl(tmp_path):
    conv = [msg("system", "Be kind."), msg(USER, "hi"), msg(ASSISTANT, "hello")]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": conv, "extra": 1}])
    assert sft_dataset(DatasetSpec(path=str(path), format="messages"), 0)["messages"] == [conv]


def test_pairwise_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"Is it safe?","Yes, it is.",No\nq2,a,b\n', encoding="utf-8")
    spec = DatasetSpec(path=str(path), format="pairwise")
    rows = sorted(preference_dataset(spec, 0), key=lambda r: r["prompt"][0]["content"])
    assert rows[0] == {"prompt": [msg(USER, "Is it safe?")], "chosen": [msg(ASSISTANT, "Yes, it is.")],
                       "rejected": [msg(ASSISTANT, "No")]}  # fmt: skip
    assert sorted(r["messages"][-1]["content"] for r in sft_dataset(spec, 0)) == ["Yes, it is.", "a"]


def test_ranked_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "responses": ["best", "mid", "worst"]}]), path)
    spec = DatasetSpec(path=str(path), format="ranked")
    assert ranked_dataset(spec, 0)[0] == {
        "prompt": [msg(USER, "p")],
        "responses": [msg(ASSISTANT, "best"), msg(ASSISTANT, "mid"), msg(ASSISTANT, "worst")],
    }
    assert sft_dataset(spec, 0)[0]["messages"] == [msg(USER, "p"), msg(ASSISTANT, "best")]


def test_text_txt_json_and_gz(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("first document\n\nsecond document\n", encoding="utf-8")
    assert sorted(ptx_dataset(DatasetSpec(path=str(txt), format="text"), 0)["text"]) == [
        "first document",
        "second document",
    ]
    as_list = tmp_path / "list.json"
    as_list.write_text(json.dumps([{"prompt": "a"}, {"prompt": [msg(USER, "b")]}]), encoding="utf-8")
    prompts = prompt_dataset(DatasetSpec(path=str(as_list), format="prompt"), 0)["prompt"]
    assert sorted(prompts, key=str) == [[msg(USER, "a")], [msg(USER, "b")]]
    as_lines = write_jsonl(tmp_path / "lines.json", [{"text": "x"}, {"text": "y"}])
    assert sorted(ptx_dataset(DatasetSpec(path=str(as_lines), format="text"), 0)["text"]) == ["x", "y"]
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "zipped"}\n'))
    assert prompt_dataset(DatasetSpec(path=str(gz), format="prompt"), 0)["prompt"] == [[msg(USER, "zipped")]]


# ---- errors ---------------------------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(UserError, match=f"{path}: file not found"):
        sft_dataset(DatasetSpec(path=str(path), format="hh"), 0)


def test_empty_file_has_no_records(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}: no records$"):
        sft_dataset(DatasetSpec(path=str(path), format="hh"), 0)


def test_record_missing_a_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b"}, {"rejected": "x"}])
    with pytest.raises(UserError, match=f"^{path}: line 2: missing field 'chosen'$"):
        sft_dataset(DatasetSpec(path=str(path), format="hh"), 0)
    with pytest.raises(UserError, match=f"^{path}: line 1: missing field 'rejected'$"):
        preference_dataset(DatasetSpec(path=str(path), format="hh"), 0)


def test_malformed_jsonl_line_is_numbered(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(UserError, match=f"^{path}: line 3: malformed JSON"):
        ptx_dataset(DatasetSpec(path=str(path), format="text"), 0)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "a"}\nnot json\n'))
    with pytest.raises(UserError, match=f"^{gz}: line 2: malformed JSON"):
        ptx_dataset(DatasetSpec(path=str(gz), format="text"), 0)


def test_malformed_hh_transcript_names_the_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "no speakers here", "rejected": "x"}])
    with pytest.raises(UserError, match=f"^{path}: line 1: field 'chosen': malformed HH transcript"):
        sft_dataset(DatasetSpec(path=str(path), format="hh"), 0)


@pytest.mark.parametrize(
    ("rows", "builder", "fmt", "problem"),
    [
        ([{"messages": [msg(USER, "q")]}], sft_dataset, "messages", "must end with an assistant message"),
        ([{"messages": [msg("robot", "q")]}], sft_dataset, "messages", "unknown role 'robot'"),
        ([{"prompt": [msg(USER, "q"), msg(ASSISTANT, "a")]}], prompt_dataset, "prompt", "must end with a user"),
        ([{"prompt": "q", "responses": ["only one"]}], ranked_dataset, "ranked", "at least 2 responses"),
        ([{"text": 5}], ptx_dataset, "text", "expected a string"),
    ],
)
def test_bad_field_values_name_the_field(tmp_path, rows, builder, fmt, problem):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=f"^{path}: line 1: field '.+': .*{problem}"):
        builder(DatasetSpec(path=str(path), format=fmt), 0)


def test_format_a_builder_cannot_use_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match="format 'text' cannot give preference pairs"):
        preference_dataset(DatasetSpec(path=str(path), format="text"), 0)
    txt = tmp_path / "d.txt"
    txt.write_text("a line\n", encoding="utf-8")
    with pytest.raises(UserError, match="needs format 'text'"):
        prompt_dataset(DatasetSpec(path=str(txt), format="prompt"), 0)


def test_hub_id_offline_is_a_user_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    spec = DatasetSpec(path="no-such-owner/no-such-dataset", format="hh", name="harmless-base")
    with pytest.raises(UserError, match="^no-such-owner/no-such-dataset: .*Hugging Face Hub") as info:
        sft_dataset(spec, 0)
    assert "\n" not in str(info.value)


def test_path_that_looks_like_a_file_is_never_a_hub_id(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the Hub was asked"))
    with pytest.raises(UserError, match="data/train.jsonl: file not found"):
        data.load_records(DatasetSpec(path="data/train.jsonl", format="hh"))


# ---- split ----------------------------------------------------------------------------------------------------


def test_seeded_split_is_deterministic_and_disjoint(hh_path):
    ds = sft_dataset(hh_spec(hh_path, limit=20), seed=0)
    key = json.dumps
    train, test = train_test_split(ds, 0.25, seed=7)
    assert (len(train), len(test)) == (15, 5)
    assert not {key(m) for m in train["messages"]} & {key(m) for m in test["messages"]}
    assert {key(m) for m in train["messages"]} | {key(m) for m in test["messages"]} == {key(m) for m in ds["messages"]}
    again_train, again_test = train_test_split(ds, 0.25, seed=7)
    assert again_train["messages"] == train["messages"] and again_test["messages"] == test["messages"]
    assert train_test_split(ds, 0.25, seed=8)[1]["messages"] != test["messages"]
    whole, none = train_test_split(ds, 0.0, seed=7)
    assert none is None and whole["messages"] == ds["messages"]
    with pytest.raises(UserError, match="leaves no training examples"):
        train_test_split(ds.select(range(1)), 0.5, seed=0)
