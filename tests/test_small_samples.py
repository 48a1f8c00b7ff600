"""Statistics that say when they cannot be computed: a metric whose units cannot give it is empty, with its reason,
in metrics.csv, the printed summary and the report; a --limit below the number of strata names the strata it leaves
out. Against hand-computed values, through the real evaluate, score and report commands."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from selfcorrect.cli import main
from selfcorrect.config import data_dir
from selfcorrect.config.evaluation import EvaluationSection
from selfcorrect.evaluate.benchmarks import bbq, law_school, winogender
from selfcorrect.evaluate.metrics import bootstrap, pearson_r
from selfcorrect.evaluate.paired import minus_q_rows
from selfcorrect.evaluate.prompts import load_prompts
from selfcorrect.evaluate.runner import plan

TWO_POINTS = "Pearson r needs at least 3 occupations, got 2: any 2 points correlate +1 or -1"


def read_rows(path: Path) -> dict[tuple[str, str, str], dict]:
    with path.open(newline="") as f:
        return {(r["condition"], r["subset"], r["metric"]): r for r in csv.DictReader(f)}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pearson_of_two_occupations_is_empty_in_metrics_csv_summary_and_report(tiny_model_dir, tmp_path, capsys):
    """`selfcorrect evaluate` of 2 occupations, then `selfcorrect report` of its output: the issue's case."""
    out = tmp_path / "eval"
    args = ["--benchmarks", "winogender", "--conditions", "q,q_if", "--limit", "2", "--bootstrap", "50"]
    assert main(["evaluate", str(tiny_model_dir), "--output", str(out), *args]) == 0
    summary = capsys.readouterr().out
    rows = read_rows(out / "metrics.csv")
    for condition in ("q", "q_if"):
        row = rows[(condition, "all", "pearson_r")]
        assert (row["value"], row["ci_low"], row["ci_high"], row["n"], row["note"]) == ("", "", "", "2", TWO_POINTS)
        # the means of the same two occupations are computed, by hand from the per-item file
        p_female = [r["probs"][0] for r in jsonl(out / "winogender" / f"{condition}.jsonl")]
        mean = rows[(condition, "all", "p_female_mean")]
        assert len(p_female) == 2 and float(mean["value"]) == pytest.approx(np.mean(p_female), abs=1e-9)
        assert mean["note"] == "" and float(mean["ci_low"]) <= float(mean["value"]) <= float(mean["ci_high"])
    delta = rows[("q_if_minus_q", "all", "pearson_r")]
    assert (delta["value"], delta["ci_low"], delta["n"]) == ("", "", "2")
    assert delta["note"] == f"q_if and q: {TWO_POINTS}"  # never the +2.000 of two points that correlate -1 and +1
    lines = [line for line in summary.splitlines() if "pearson_r" in line]
    assert len(lines) == 3 and all(" n/a " in line and line.endswith(f"{TWO_POINTS})") for line in lines)

    assert main(["report", str(out)]) == 0
    report_dir = out / "report-by-size"
    text = (report_dir / "report.md").read_text()
    model = tiny_model_dir.name
    assert f"- Winogender `pearson_r`, Q, {model}: {TWO_POINTS}" in text
    assert f"- Winogender `pearson_r`, Q+IF, {model}: {TWO_POINTS}" in text
    assert f"- Self-correction (condition − Q): Winogender `pearson_r`, Q+IF, {model}: q_if and q: {TWO_POINTS}" in text
    assert f"| winogender | q | pearson_r | n/a ({TWO_POINTS}) | n/a | 2 |" in text
    # nothing to draw: no figure with a confident point, and the report says why
    assert not (report_dir / "winogender.png").exists() and not (report_dir / "self_correction.png").exists()
    assert "Winogender: every plotted value is empty (see Empty values), no figure." in text
    assert "Self-correction: every difference is empty (see Empty values), no figure." in text


def score(capsys, tmp_path: Path, benchmark: str, lines: list[dict]) -> dict[tuple[str, str], dict]:
    """`selfcorrect score --format json` of prediction lines: rows by (subset, metric)."""
    path = tmp_path / f"{benchmark}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code = main(
        ["score", "--benchmark", benchmark, "--predictions", str(path), "--format", "json", "--bootstrap", "200"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return {(r["subset"], r["metric"]): r for r in json.loads(captured.out)}


def test_pearson_needs_three_occupations_and_two_sides_that_vary(capsys, tmp_path):
    occupations = winogender.load(data_dir())
    by_id = {u["id"]: u for u in occupations}

    def line(occupation: str, p_female: float) -> dict:
        return {"occupation": occupation, "p_female": p_female, "p_male": 1 - p_female, "p_neutral": 0.0}

    two = score(capsys, tmp_path, "winogender", [line("nurse", 0.9), line("engineer", 0.1)])
    assert (two[("all", "pearson_r")]["value"], two[("all", "pearson_r")]["note"]) == (None, TWO_POINTS)

    picked = {"nurse": 0.9, "engineer": 0.1, "secretary": 0.6}
    three = score(capsys, tmp_path, "winogender", [line(o, p) for o, p in picked.items()])
    bls = [by_id[o]["bls_pct_female"] / 100 for o in picked]
    r = three[("all", "pearson_r")]
    assert r["value"] == pytest.approx(np.corrcoef(list(picked.values()), bls)[0, 1]) and r["note"] == ""

    flat = score(capsys, tmp_path, "winogender", [line(o, 0.5) for o in ("nurse", "engineer", "secretary", "baker")])
    assert flat[("all", "pearson_r")]["value"] is None
    assert flat[("all", "pearson_r")]["note"] == "p_female is the same for all 4 occupations"
    assert flat[("all", "p_female_mean")]["value"] == pytest.approx(0.5)


def test_bbq_disambiguated_bias_without_a_non_unknown_answer_is_empty(capsys, tmp_path):
    """Age: 3 ambiguous and 3 disambiguated items with a target, every answer 'unknown'.

    Ambiguous: accuracy 1 (the label is 'unknown'), s_AMB = (1 - 1) * s = (2 * 0 - 0) / 3 = 0, a real value.
    Disambiguated: accuracy 0, and s_DIS = 2 * n_biased / n_nonUNK - 1 has n_nonUNK = 0: empty, with why.
    """
    age = [u for u in bbq.load(data_dir()) if u["category"] == "Age" and u["target"] is not None]
    amb = [u for u in age if u["context_condition"] == "ambig"][:3]
    dis = [u for u in age if u["context_condition"] == "disambig"][:3]
    lines = [{"category": "Age", "example_id": u["example_id"], "prediction": u["unknown"]} for u in amb + dis]
    rows = score(capsys, tmp_path, "bbq", lines)
    for subset in ("all", "Age"):
        assert rows[(subset, "accuracy_ambig")]["value"] == 1.0
        assert (rows[(subset, "bias_score_ambig")]["value"], rows[(subset, "bias_score_ambig")]["note"]) == (0.0, "")
        assert rows[(subset, "accuracy_disambig")]["value"] == 0.0
        empty = rows[(subset, "bias_score_disambig")]
        assert (empty["value"], empty["ci_low"], empty["ci_high"], empty["n"]) == (None, None, None, 3)
        assert empty["note"] == (
            "all 3 answers to disambiguated items with a target are 'unknown': raw bias 2*n_biased/n_nonUNK - 1 has "
            "no answer to count (n_nonUNK = 0)"
        )
        assert rows[(subset, "unknown_rate")]["value"] == 1.0


def onehot(choice: int) -> dict:
    return {"probs": [float(k == choice) for k in range(3)], "mass": None}


def test_a_difference_with_an_empty_side_is_empty_and_names_that_side():
    """Q answers the 3 disambiguated items (2 biased, 1 not: s_DIS 1/3); Q+IF answers 'unknown' to all of them."""
    age = [u for u in bbq.load(data_dir()) if u["category"] == "Age" and u["target"] is not None]
    dis = [u for u in age if u["context_condition"] == "disambig"][:3]
    anti = 3 - dis[2]["unknown"] - dis[2]["target"]
    q = {u["id"]: onehot(c) for u, c in zip(dis, [dis[0]["target"], dis[1]["target"], anti])}
    q_if = {u["id"]: onehot(u["unknown"]) for u in dis}
    by_q = {r.metric: r for r in bbq.metrics(dis, q, "q", n_boot=100) if r.subset == "all"}
    assert by_q["bias_score_disambig"].value == pytest.approx(2 * 2 / 3 - 1)
    rows = {r.metric: r for r in minus_q_rows("bbq", {"q": (dis, q), "q_if": (dis, q_if)}, n_boot=100, seed=0)}
    empty = rows["bias_score_disambig"]
    assert np.isnan(empty.value) and np.isnan(empty.ci_low) and empty.n == 3
    assert empty.note.startswith("q_if: all 3 answers to disambiguated items with a target are 'unknown'")
    assert "q:" not in empty.note.removeprefix("q_if:")  # Q's side is defined
    assert rows["accuracy_disambig"].value == pytest.approx(0 - by_q["accuracy_disambig"].value)
    # the ambiguous metrics have no items: empty on both sides, one reason
    assert (
        rows["accuracy_ambig"].note == "q_if and q: no ambiguous item with a stereotyped target among the 3 evaluated"
    )


def test_a_ci_undefined_in_most_resamples_is_empty_with_why():
    """Points (0, 0), (0, 1), (1, 1): r = 0.5 by hand; a resample is constant on a side in 15 of 27 index triples."""
    c = {"x": np.array([0.0, 0.0, 1.0]), "y": np.array([0.0, 1.0, 1.0])}
    result = bootstrap(c, lambda c: {"r": pearson_r(c["x"], c["y"])}, n_boot=1000, seed=0)
    value, low, high, note = result["r"]
    assert value == pytest.approx(0.5) and np.isnan(low) and np.isnan(high)
    undefined = int(re.fullmatch(r"no CI: undefined in (\d+) of 1000 resamples", note).group(1))
    assert undefined == pytest.approx(1000 * 15 / 27, abs=60)


def sample_strata(module, ids: list[str]) -> set[str]:
    by_id = {u["id"]: u for u in module.load(data_dir())}
    return {module.stratum(by_id[i]) for i in ids}


def test_a_limit_below_the_strata_warns_which_it_leaves_out(tmp_path, capsys):
    section = EvaluationSection(benchmarks=["bbq", "winogender", "law_school"], limit=8, cot_limit=2)
    settings = section.settings(
        tmp_path / "out", seed=0, dtype=None, trust_remote_code=False, dialogue=None, model="unused", data=data_dir()
    )
    _, samples = plan(settings, load_prompts([]))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    all_bbq = {bbq.stratum(u) for u in bbq.load(data_dir())}
    in_sample = sample_strata(bbq, samples["bbq"]["ids"])
    left_out = sorted(all_bbq - in_sample)
    assert len(all_bbq) == 44 and len(left_out) == 44 - len(in_sample) >= 36
    in_cot = sample_strata(bbq, samples["bbq"]["cot_ids"])
    law_cot = sample_strata(law_school, samples["law_school"]["cot_ids"])
    law_left = sorted(sample_strata(law_school, samples["law_school"]["ids"]) - law_cot)
    assert warnings == [
        f"warning: bbq: --limit 8 draws from 44 strata and leaves out {len(left_out)} of them: {', '.join(left_out)}",
        f"warning: bbq: --cot-limit 2 draws from {len(in_sample)} strata and leaves out {len(in_sample - in_cot)} of "
        f"them: {', '.join(sorted(in_sample - in_cot))}",
        # law school has 8 strata (original race): --limit 8 keeps one of each; Winogender has one
        f"warning: law_school: --cot-limit 2 draws from 8 strata and leaves out 6 of them: {', '.join(law_left)}",
    ]
    section = EvaluationSection(benchmarks=["bbq"], limit=44)
    plan(
        section.settings(tmp_path, seed=0, dtype=None, trust_remote_code=False, dialogue=None, model="unused"),
        load_prompts([]),
    )
    assert "warning" not in capsys.readouterr().err  # one unit per stratum
