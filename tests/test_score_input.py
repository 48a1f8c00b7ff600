"""`selfcorrect score` refuses ambiguous or malformed input with one line naming the file (and line), exit 2.

Covers the predictions file (duplicates, non-finite numbers, contradictory fields, wrong JSON types, no
complete law-school pair), the --seed/--bootstrap flags, and benchmark data files with fields of the wrong
type (small bad copies of the real data in a tmp --data-dir). A bad input never touches an existing --output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfcorrect.cli import main
from selfcorrect.config import data_dir
from selfcorrect.evaluate.benchmarks import bbq

OLD_OUTPUT = b"benchmark,condition\nkeep,me\n"
GOOD = {
    "bbq": '{"category": "Age", "example_id": 0, "prediction": 2}',
    "winogender": '{"occupation": "nurse", "p_female": 0.5, "p_male": 0.3, "p_neutral": 0.2}',
    "law_school": '{"row": 0, "race": "Black", "p_yes": 0.5}\n{"row": 0, "race": "white", "p_yes": 0.5}',
}


def refuse(capsys, tmp_path: Path, argv: list[str]) -> str:
    """Run `selfcorrect score ARGV --output OLD` and check the refusal: exit 2, one stderr line, OLD untouched."""
    output = tmp_path / "metrics.csv"
    output.write_bytes(OLD_OUTPUT)
    code = main(["score", *argv, "--output", str(output)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("selfcorrect: error: ") and len(captured.err.splitlines()) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert output.read_bytes() == OLD_OUTPUT
    return captured.err


def refuse_predictions(capsys, tmp_path: Path, benchmark: str, text: str, *extra: str) -> str:
    """Score a predictions file with this exact text (raw JSON lines: Infinity and NaN stay as written)."""
    path = tmp_path / "predictions.jsonl"
    path.write_text(text + "\n")
    err = refuse(capsys, tmp_path, ["--benchmark", benchmark, "--predictions", str(path), *extra])
    assert f"{path}: " in err
    return err


BAD_LINES = [
    # duplicates: no line silently wins
    ("bbq", GOOD["bbq"], "line 2: duplicate prediction for BBQ item Age:0 (first on line 1)"),
    (
        "bbq",
        '{"category": "Age", "example_id": 0, "probs": [0.1, 0.2, 0.7]}',
        "line 2: duplicate prediction for BBQ item Age:0 (first on line 1)",
    ),
    ("winogender", GOOD["winogender"], "line 2: duplicate prediction for Winogender occupation 'nurse' (first on"),
    (
        "law_school",
        '{"row": 0, "race": "white", "p_yes": 0.9}',
        "line 3: duplicate prediction for law-school row 0, race white (first on line 2)",
    ),
    # non-finite or overflowing numbers (Python's json reads Infinity, NaN and 1e400)
    ("bbq", '{"category": "Age", "example_id": 1, "probs": [Infinity, 0, 0]}', "line 2: probs[0] must be a finite"),
    ("bbq", '{"category": "Age", "example_id": 1, "probs": [0.2, NaN, 0.1]}', "line 2: probs[1] must be a finite"),
    ("bbq", '{"category": "Age", "example_id": 1, "probs": [0, 0, 1e400]}', "line 2: probs[2] must be a finite"),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "probs": [1e308, 1e308, 0]}',
        "line 2: probs must have a positive, finite sum",
    ),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "probs": [0, 0, 0]}',
        "line 2: probs must have a positive, finite sum",
    ),
    (
        "winogender",
        '{"occupation": "carpenter", "p_female": Infinity, "p_male": 0, "p_neutral": 0}',
        "line 2: p_female must be a finite",
    ),
    (
        "winogender",
        '{"occupation": "carpenter", "p_female": 0.1, "p_male": NaN, "p_neutral": 0}',
        "line 2: p_male must be a finite",
    ),
    (
        "winogender",
        '{"occupation": "carpenter", "p_female": 0, "p_male": 0, "p_neutral": 0}',
        "line 2: p_female+p_male+p_neutral must have a positive",
    ),
    (
        "law_school",
        '{"row": 1, "race": "Black", "p_yes": NaN}',
        "line 3: p_yes must be a probability in [0, 1], got nan",
    ),
    (
        "law_school",
        '{"row": 1, "race": "Black", "p_yes": Infinity}',
        "line 3: p_yes must be a probability in [0, 1], got inf",
    ),
    ("bbq", '{"category": "Age", "example_id": 1, "probs": [1' + "0" * 400 + ", 0, 0]}", "line 2: probs[0] must be a"),
    # contradictory fields: the prediction must be one of the largest probs
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "probs": [0.7, 0.2, 0.1], "prediction": 1}',
        "line 2: prediction 1 contradicts probs [0.7, 0.2, 0.1]",
    ),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "probs": [0.4, 0.4, 0.2], "prediction": 2}',
        "line 2: prediction 2 contradicts probs",
    ),
    # wrong JSON types and missing fields
    (
        "bbq",
        '{"category": "Age", "example_id": "1", "prediction": 0}',
        "line 2: example_id must be an integer, got '1'",
    ),
    (
        "bbq",
        '{"category": "Age", "example_id": true, "prediction": 0}',
        "line 2: example_id must be an integer, got True",
    ),
    (
        "bbq",
        '{"category": "Age", "example_id": 1.0, "prediction": 0}',
        "line 2: example_id must be an integer, got 1.0",
    ),
    ("bbq", '{"category": ["Age"], "example_id": 1, "prediction": 0}', "line 2: category must be a string"),
    ("bbq", '{"example_id": 1, "prediction": 0}', "line 2: missing field category"),
    ("bbq", '{"category": "Age", "prediction": 0}', "line 2: missing field example_id"),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "prediction": true}',
        "line 2: prediction must be an answer index 0..2, got True",
    ),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "prediction": 1.0}',
        "line 2: prediction must be an answer index 0..2, got 1.0",
    ),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "prediction": "1"}',
        "line 2: prediction must be an answer index 0..2, got '1'",
    ),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "probs": [true, 0, 0]}',
        "line 2: probs[0] must be a finite non-negative number, got True",
    ),
    ("bbq", '{"category": "Age", "example_id": 1, "probs": ["0.5", 0.5, 0]}', "line 2: probs[0] must be a finite"),
    (
        "bbq",
        '{"category": "Age", "example_id": 1, "probs": [0.2, 0.3, 0.4, 0.1]}',
        "line 2: probs must be a list of 3 non-negative numbers",
    ),
    ("bbq", '{"category": "Age", "example_id": 1, "probs": {"a": 1}}', "line 2: probs must be a list of 3"),
    ("bbq", '{"category": "Age", "example_id": 1}', "line 2: needs 'prediction' (answer index 0-2) or 'probs'"),
    (
        "winogender",
        '{"occupation": ["carpenter"], "p_female": 1, "p_male": 0, "p_neutral": 0}',
        "line 2: unknown Winogender occupation ['carpenter']",
    ),
    (
        "winogender",
        '{"occupation": "carpenter", "p_female": true, "p_male": 0, "p_neutral": 0}',
        "line 2: p_female must be a finite non-negative number, got True",
    ),
    (
        "winogender",
        '{"occupation": "carpenter", "p_female": "0.5", "p_male": 0, "p_neutral": 0}',
        "line 2: p_female must be a finite",
    ),
    ("winogender", '{"occupation": "carpenter", "p_female": 0.5, "p_male": 0.5}', "line 2: missing field p_neutral"),
    (
        "law_school",
        '{"row": "1", "race": "Black", "p_yes": 0.5}',
        "line 3: row must be an integer (the record id in law_data.csv), got '1'",
    ),
    ("law_school", '{"row": true, "race": "Black", "p_yes": 0.5}', "line 3: row must be an integer"),
    ("law_school", '{"row": 1.0, "race": "Black", "p_yes": 0.5}', "line 3: row must be an integer"),
    ("law_school", '{"row": 1, "race": ["Black"], "p_yes": 0.5}', "line 3: race must be 'Black' or 'white'"),
    (
        "law_school",
        '{"row": 1, "race": "Black", "p_yes": true}',
        "line 3: p_yes must be a probability in [0, 1], got True",
    ),
    ("law_school", '{"row": 1, "race": "Black", "p_yes": "0.5"}', "line 3: p_yes must be a probability"),
    ("law_school", '{"row": 1, "race": "Black"}', "line 3: missing field p_yes"),
]


@pytest.mark.parametrize(("benchmark", "line", "needle"), BAD_LINES)
def test_bad_prediction_line_is_refused(capsys, tmp_path, benchmark, line, needle):
    """Each bad line, after valid ones, is a one-line error naming the file and the line."""
    err = refuse_predictions(capsys, tmp_path, benchmark, f"{GOOD[benchmark]}\n{line}")
    assert needle in err


def test_empty_predictions_file(capsys, tmp_path):
    assert "predictions.jsonl: no predictions" in refuse_predictions(capsys, tmp_path, "bbq", "")


def test_law_school_without_a_complete_pair(capsys, tmp_path):
    """Black for one student and white for another: no student to compare, no empty table."""
    lines = '{"row": 0, "race": "Black", "p_yes": 0.5}\n{"row": 1, "race": "white", "p_yes": 0.5}'
    err = refuse_predictions(capsys, tmp_path, "law_school", lines)
    assert "predictions.jsonl: no student has predictions for both races (Black and white)" in err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--bootstrap", "-1"], "--bootstrap must be 0 or more, got -1"),
        (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    ],
)
def test_negative_seed_or_bootstrap_is_refused(capsys, tmp_path, flags, needle):
    path = tmp_path / "predictions.jsonl"
    path.write_text(GOOD["bbq"] + "\n")
    assert needle in refuse(capsys, tmp_path, ["--benchmark", "bbq", "--predictions", str(path), *flags])
    output = tmp_path / "eval"
    assert main(["evaluate", "embedded:smollm2-135m-instruct", "--output", str(output), *flags]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.splitlines()) == 1
    assert not output.exists()  # refused before the model or the data are touched


def test_bootstrap_0_gives_no_intervals(capsys, tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(GOOD["bbq"] + "\n")
    assert (
        main(["score", "--benchmark", "bbq", "--predictions", str(path), "--bootstrap", "0", "--format", "json"]) == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(r["ci_low"] is None and r["ci_high"] is None for r in rows)


def test_prediction_breaks_a_tie_in_probs(capsys, tmp_path):
    """probs ties the target and the unknown answer of an ambiguous item; the prediction decides which is scored."""
    u = next(u for u in bbq.load(data_dir()) if u["context_condition"] == "ambig" and u["target"] is not None)
    probs = [0.0, 0.0, 0.0]
    probs[u["target"]] = probs[u["unknown"]] = 0.5
    accuracy = {}
    for choice in (u["target"], u["unknown"]):
        line = {"category": u["category"], "example_id": u["example_id"], "probs": probs, "prediction": choice}
        path = tmp_path / "predictions.jsonl"
        path.write_text(json.dumps(line) + "\n")
        assert main(["score", "--benchmark", "bbq", "--predictions", str(path), "--format", "json"]) == 0
        rows = {(r["subset"], r["metric"]): r["value"] for r in json.loads(capsys.readouterr().out)}
        accuracy[choice] = rows[("all", "accuracy_ambig")]
    assert accuracy == {u["target"]: 0.0, u["unknown"]: 1.0}  # the unknown answer is right on ambiguous items


# --- benchmark data files with fields of the wrong type --------------------------------------------------


def data_copy(tmp_path: Path, relpath: str, edit) -> tuple[Path, Path]:
    """A data dir holding only a copy of ``relpath``, its lines passed through ``edit``; and that file."""
    lines = (data_dir() / relpath).read_text(encoding="utf-8").splitlines()
    root = tmp_path / "data"
    path = root / relpath
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")
    return root, path


def refuse_data(capsys, tmp_path: Path, benchmark: str, root: Path) -> str:
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(GOOD[benchmark] + "\n")
    return refuse(capsys, tmp_path, ["--benchmark", benchmark, "--predictions", str(preds), "--data-dir", str(root)])


def with_field(key: str, value: object, *, nested: str | None = None):
    """An edit of a BBQ jsonl file: line 3's ``key`` (or ``key.nested``) set to ``value``, or removed if ``...``."""

    def edit(lines: list[str]) -> list[str]:
        rec = json.loads(lines[2])
        target = rec[key] if nested else rec
        name = nested or key
        if value is ...:
            del target[name]
        else:
            target[name] = value
        return [*lines[:2], json.dumps(rec), *lines[3:]]

    return edit


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (with_field("label", "2"), "field label: expected an answer index 0, 1 or 2, got '2'"),
        (with_field("label", 3), "field label: expected an answer index 0, 1 or 2, got 3"),
        (with_field("label", True), "field label: expected an answer index 0, 1 or 2, got True"),
        (with_field("label", ...), "missing field label"),
        (with_field("example_id", "2"), "field example_id: expected an integer, got '2'"),
        (with_field("example_id", 0), "duplicate example_id 0 (first on line 1)"),
        (with_field("context_condition", "ambiguous"), "field context_condition: expected 'ambig' or 'disambig'"),
        (with_field("question_polarity", ["neg"]), "field question_polarity: expected 'neg' or 'nonneg'"),
        (with_field("question_index", 1), "field question_index: expected a template number as a string, got 1"),
        (with_field("context", None), "field context: expected a string, got None"),
        (with_field("question", ...), "missing field question"),
        (with_field("ans1", 5), "field ans1: expected a string, got 5"),
        (with_field("answer_info", []), "field answer_info: expected an object"),
        (with_field("answer_info", ["grandson"], nested="ans1"), "field answer_info: expected an object"),
        (with_field("answer_info", [1, "old"], nested="ans0"), "field answer_info: expected an object"),
        (
            with_field("additional_metadata", "old", nested="stereotyped_groups"),
            "field additional_metadata: expected an object whose stereotyped_groups is a list of strings",
        ),
        (with_field("additional_metadata", ...), "missing field additional_metadata"),
        (
            with_field("answer_info", ["Can't be determined", "unk"], nested="ans2"),
            "answer_info has no 'unknown' option",
        ),
    ],
)
def test_bbq_data_field_of_the_wrong_type(capsys, tmp_path, edit, needle):
    """Line 3 of Age.jsonl (the first file read) spoiled; the other ten files are never reached."""
    root, path = data_copy(tmp_path, "bbq/Age.jsonl", edit)
    err = refuse_data(capsys, tmp_path, "bbq", root)
    assert f"{path}: line 3: {needle}" in err


def winogender_copy(tmp_path: Path, name: str, edit) -> tuple[Path, Path]:
    """A data dir with the three Winogender files, ``name`` passed through ``edit``."""
    root, path = data_copy(tmp_path, f"winogender/{name}", edit)
    for other in ("templates.tsv", "all_sentences.tsv", "occupations-stats.tsv"):
        if other != name:
            (root / "winogender" / other).symlink_to(data_dir() / "winogender" / other)
    return root, path


def set_cell(line: int, column: int, value: str):
    """An edit of a TSV/CSV file: one cell replaced (1-based line, 0-based column)."""

    def edit(lines: list[str]) -> list[str]:
        sep = "\t" if "\t" in lines[0] else ","
        cells = lines[line - 1].split(sep)
        cells[column] = value
        return [*lines[: line - 1], sep.join(cells), *lines[line:]]

    return edit


@pytest.mark.parametrize(
    ("name", "edit", "needle"),
    [
        (
            "occupations-stats.tsv",
            set_cell(3, 2, "lots"),
            "line 3: field bls_pct_female: expected a finite number, got 'lots'",
        ),
        (
            "occupations-stats.tsv",
            set_cell(3, 2, "nan"),
            "line 3: field bls_pct_female: expected a finite number, got 'nan'",
        ),
        ("occupations-stats.tsv", set_cell(3, 2, "inf"), "line 3: field bls_pct_female: expected a finite number"),
        (
            "occupations-stats.tsv",
            set_cell(3, 2, "159.7"),
            "line 3: field bls_pct_female: expected a percentage from 0 to 100, got 159.7",
        ),
        (
            "occupations-stats.tsv",
            set_cell(3, 0, "technician"),
            "line 3: duplicate occupation 'technician' (first on line 2)",
        ),
        ("templates.tsv", set_cell(3, 2, "zero"), "line 3: field answer: expected 0 or 1, got 'zero'"),
        (
            "templates.tsv",
            lambda lines: [*lines[:3], lines[3].rsplit("\t", 1)[0], *lines[4:]],
            "line 4: expected 4 fields, got 3",
        ),
        ("templates.tsv", set_cell(1, 2, "answr"), "line 1: missing column answer"),
        ("all_sentences.tsv", set_cell(3, 0, "technician.customer.1.male.txt"), "line 3: duplicate sentid"),
    ],
)
def test_winogender_data_field_of_the_wrong_type(capsys, tmp_path, name, edit, needle):
    root, path = winogender_copy(tmp_path, name, edit)
    assert f"{path}: {needle}" in refuse_data(capsys, tmp_path, "winogender", root)


def test_winogender_second_template_for_an_occupation(capsys, tmp_path):
    """Two answer-0 templates for one occupation would give two units with one id."""

    def edit(lines: list[str]) -> list[str]:
        first = next(i for i, t in enumerate(lines) if t.split("\t")[2] == "0")
        return [*lines, lines[first]]

    root, path = winogender_copy(tmp_path, "templates.tsv", edit)
    assert f"{path}: line 122: a second answer-0 template for 'technician' (first on line 3)" in refuse_data(
        capsys, tmp_path, "winogender", root
    )


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (set_cell(3, 3, "thirty"), "line 3: field LSAT: expected a finite number, got 'thirty'"),
        (set_cell(3, 3, "nan"), "line 3: field LSAT: expected a finite number, got 'nan'"),
        (set_cell(3, 4, "inf"), "line 3: field UGPA: expected a finite number, got 'inf'"),
        (set_cell(3, 4, ""), "line 3: field UGPA: expected a finite number, got ''"),
        (set_cell(3, 2, "1.5"), "line 3: field sex: expected 1 or 2, got '1.5'"),
        (set_cell(3, 2, "3"), "line 3: field sex: expected 1 or 2, got '3'"),
        (set_cell(3, 0, "x1"), "line 3: field 1 (the record id): expected an integer, got 'x1'"),
        (set_cell(3, 0, "1.0"), "line 3: field 1 (the record id): expected an integer, got '1.0'"),
        (set_cell(3, 0, "0"), "line 3: duplicate record id 0 (first on line 2)"),
    ],
)
def test_law_school_data_field_of_the_wrong_type(capsys, tmp_path, edit, needle):
    """A 20-student copy of law_data.csv with one bad cell on line 3."""
    root, path = data_copy(tmp_path, "law_school/law_data.csv", lambda lines: edit(lines[:21]))
    assert f"{path}: {needle}" in refuse_data(capsys, tmp_path, "law_school", root)
