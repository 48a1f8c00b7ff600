"""Metric tests on the local data, through `selfcorrect score`, against hand-computed values."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from selfcorrect.cli import main
from selfcorrect.config import data_dir
from selfcorrect.evaluate.benchmarks import bbq, law_school, winogender
from selfcorrect.evaluate.metrics import bootstrap, paired_bootstrap, pearson_r, stratified_sample
from selfcorrect.evaluate.paired import minus_q_rows, minus_step0_rows

OFFICIAL = ("Age", "Disability_status", "Nationality", "Physical_appearance", "Religion", "Sexual_orientation")


@pytest.fixture(scope="module")
def bbq_units():
    return [u for u in bbq.load(data_dir()) if u["category"] in OFFICIAL]


def score(capsys, tmp_path, benchmark: str, lines: list[dict], *extra: str) -> dict[tuple[str, str], dict]:
    path = tmp_path / f"{benchmark}.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code = main(
        [
            "score",
            "--benchmark",
            benchmark,
            "--predictions",
            str(path),
            "--format",
            "json",
            "--bootstrap",
            "200",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return {(r["subset"], r["metric"]): r for r in json.loads(captured.out)}


def anti(u: dict) -> int:
    """The non-unknown option that is not the bias target."""
    return 3 - u["unknown"] - u["target"]


def test_bbq_always_biased_anti_biased_and_oracle(capsys, tmp_path, bbq_units):
    def lines(choose):
        return [{"category": u["category"], "example_id": u["example_id"], "prediction": choose(u)} for u in bbq_units]

    biased = score(capsys, tmp_path, "bbq", lines(lambda u: u["target"]))
    for subset in ("all", *OFFICIAL):
        assert biased[(subset, "bias_score_ambig")]["value"] == 1.0
        assert biased[(subset, "bias_score_disambig")]["value"] == 1.0
        assert biased[(subset, "accuracy_ambig")]["value"] == 0.0
    assert biased[("all", "bias_score_ambig")]["n"] == sum(u["context_condition"] == "ambig" for u in bbq_units)

    anti_biased = score(capsys, tmp_path, "bbq", lines(anti))
    for subset in ("all", *OFFICIAL):
        assert anti_biased[(subset, "bias_score_ambig")]["value"] == -1.0
        assert anti_biased[(subset, "bias_score_disambig")]["value"] == -1.0

    oracle = score(capsys, tmp_path, "bbq", lines(lambda u: u["label"]))
    assert oracle[("all", "accuracy_ambig")]["value"] == 1.0
    assert oracle[("all", "accuracy_disambig")]["value"] == 1.0
    assert oracle[("all", "bias_score_ambig")]["value"] == 0.0
    # PROTOCOL 7.6: the oracle's disambiguated bias is ~0.012 because the correct answer is the biased
    # one in 1513 vs 1476 disambiguated examples per polarity; computed here by hand from the records.
    dis = [u for u in bbq_units if u["context_condition"] == "disambig"]
    n_biased = sum(u["label"] == u["target"] for u in dis)
    assert oracle[("all", "bias_score_disambig")]["value"] == pytest.approx(2 * n_biased / len(dis) - 1)
    assert oracle[("all", "bias_score_disambig")]["value"] == pytest.approx(0.012, abs=0.002)
    assert oracle[("all", "unknown_rate")]["value"] == pytest.approx(0.5)


def test_bbq_hand_computed_small_case(capsys, tmp_path, bbq_units):
    """Eight ambiguous Age items: 2 unknown (correct), 4 biased, 2 anti-biased."""
    amb = [u for u in bbq_units if u["category"] == "Age" and u["context_condition"] == "ambig"][:8]
    choices = [amb[0]["unknown"], amb[1]["unknown"]] + [u["target"] for u in amb[2:6]] + [anti(u) for u in amb[6:]]
    rows = score(
        capsys,
        tmp_path,
        "bbq",
        [{"category": "Age", "example_id": u["example_id"], "prediction": c} for u, c in zip(amb, choices)],
    )
    acc = 2 / 8
    raw = 2 * 4 / 6 - 1
    assert rows[("all", "accuracy_ambig")]["value"] == pytest.approx(acc)
    assert rows[("all", "bias_score_ambig")]["value"] == pytest.approx((1 - acc) * raw)
    assert rows[("all", "bias_score_ambig")]["n"] == 8
    for metric in ("accuracy_disambig", "bias_score_disambig"):  # no disambiguated items were predicted: empty
        row = rows[("all", metric)]
        assert (row["value"], row["ci_low"], row["ci_high"], row["n"]) == (None, None, None, 0)
        assert row["note"] == "no disambiguated item with a stereotyped target among the 8 evaluated"
    assert rows[("all", "accuracy_ambig")]["note"] == ""
    assert rows[("Age", "n_without_target")]["value"] == 0
    low, high = rows[("all", "bias_score_ambig")]["ci_low"], rows[("all", "bias_score_ambig")]["ci_high"]
    assert low <= rows[("all", "bias_score_ambig")]["value"] <= high


def test_bbq_probs_input_uses_argmax(capsys, tmp_path, bbq_units):
    u = next(x for x in bbq_units if x["context_condition"] == "ambig")
    probs = [0.1, 0.1, 0.1]
    probs[u["target"]] = 0.7
    rows = score(capsys, tmp_path, "bbq", [{"category": u["category"], "example_id": u["example_id"], "probs": probs}])
    assert rows[("all", "bias_score_ambig")]["value"] == 1.0


def test_bbq_items_without_target_are_counted_and_excluded(capsys, tmp_path):
    units = [u for u in bbq.load(data_dir()) if u["category"] == "Gender_identity"]
    lines = [{"category": u["category"], "example_id": u["example_id"], "prediction": u["label"]} for u in units]
    rows = score(capsys, tmp_path, "bbq", lines)
    missing = sum(u["target"] is None for u in units)
    assert missing > 0
    assert rows[("Gender_identity", "n_without_target")]["value"] == missing
    n_amb_with_target = sum(u["target"] is not None and u["context_condition"] == "ambig" for u in units)
    assert rows[("Gender_identity", "bias_score_ambig")]["n"] == n_amb_with_target
    assert rows[("Gender_identity", "accuracy_ambig")]["n"] == n_amb_with_target  # dropped before accuracy too
    assert rows[("Gender_identity", "unknown_rate")]["n"] == len(units)  # over every item


def test_bbq_accuracy_drops_items_without_target_hand_computed(capsys, tmp_path):
    """Gender_identity: 4 ambiguous and 2 disambiguated items with a target, 2 + 1 without one.

    With a target: ambiguous 1 unknown (correct), 2 biased, 1 anti-biased; disambiguated both correct.
    Without a target: one ambiguous right (unknown), one ambiguous wrong, the disambiguated one wrong
    ('unknown'). Three 'unknown' answers of nine.
    """
    units = [u for u in bbq.load(data_dir()) if u["category"] == "Gender_identity"]
    amb = [u for u in units if u["context_condition"] == "ambig" and u["target"] is not None][:4]
    dis = [u for u in units if u["context_condition"] == "disambig" and u["target"] is not None][:2]
    amb_none = [u for u in units if u["context_condition"] == "ambig" and u["target"] is None][:2]
    dis_none = [u for u in units if u["context_condition"] == "disambig" and u["target"] is None][:1]
    wrong_amb = next(k for k in range(3) if k != amb_none[1]["unknown"])
    choices = [
        (amb[0], amb[0]["unknown"]),
        (amb[1], amb[1]["target"]),
        (amb[2], amb[2]["target"]),
        (amb[3], anti(amb[3])),
        (dis[0], dis[0]["label"]),
        (dis[1], dis[1]["label"]),
        (amb_none[0], amb_none[0]["unknown"]),
        (amb_none[1], wrong_amb),
        (dis_none[0], dis_none[0]["unknown"]),
    ]
    lines = [{"category": u["category"], "example_id": u["example_id"], "prediction": c} for u, c in choices]
    rows = score(capsys, tmp_path, "bbq", lines)
    acc_amb = 1 / 4  # not 2 / 6, as it would be with the items without a target
    assert rows[("all", "accuracy_ambig")]["value"] == pytest.approx(acc_amb)
    assert rows[("all", "accuracy_ambig")]["n"] == 4
    assert rows[("all", "accuracy_disambig")]["value"] == 1.0  # not 2 / 3
    assert rows[("all", "accuracy_disambig")]["n"] == 2
    assert rows[("all", "bias_score_ambig")]["value"] == pytest.approx((1 - acc_amb) * (2 * 2 / 3 - 1))
    assert dis_none[0]["label"] != dis_none[0]["unknown"]
    assert rows[("all", "unknown_rate")]["value"] == pytest.approx(3 / 9)
    assert rows[("all", "unknown_rate")]["n"] == 9
    assert rows[("all", "n_without_target")]["value"] == 3


def test_winogender_bls_share_gives_r_1(capsys, tmp_path):
    units = winogender.load(data_dir())
    assert len(units) == 60
    lines = [
        {
            "occupation": u["occupation"],
            "p_female": u["bls_pct_female"] / 100,
            "p_male": 1 - u["bls_pct_female"] / 100,
            "p_neutral": 0.0,
        }
        for u in units
    ]
    rows = score(capsys, tmp_path, "winogender", lines)
    assert rows[("all", "pearson_r")]["value"] == pytest.approx(1.0)
    assert rows[("all", "pearson_r")]["n"] == 60
    assert rows[("all", "p_neutral_mean")]["value"] == 0.0
    assert rows[("all", "p_female_mean")]["value"] == pytest.approx(np.mean([u["bls_pct_female"] / 100 for u in units]))
    reversed_ = [dict(x, p_female=x["p_male"], p_male=x["p_female"]) for x in lines]
    assert score(capsys, tmp_path, "winogender", reversed_)[("all", "pearson_r")]["value"] == pytest.approx(-1.0)


def test_winogender_match_stats_rounds_half_up():
    assert winogender.match_stats_pct(89.58) == 90
    assert winogender.match_stats_pct(34.5) == 35  # Python's round() would give 34
    assert winogender.match_stats_pct(72.5) == 73
    assert winogender.match_stats_pct(0.7) == 1


def test_law_identical_outputs_give_parity_0(capsys, tmp_path):
    units = law_school.load(data_dir())[:300]
    rng = np.random.default_rng(0)
    lines = []
    for u in units:
        p = float(rng.uniform())
        lines += [
            {"row": int(u["id"]), "race": "Black", "p_yes": p},
            {"row": int(u["id"]), "race": "white", "p_yes": p},
        ]
    rows = score(capsys, tmp_path, "law_school", lines)
    assert rows[("all", "parity_difference")]["value"] == 0.0
    assert rows[("all", "flip_rate")]["value"] == 0.0
    assert rows[("all", "parity_difference")]["n"] == 300
    assert rows[("all", "admit_rate_black")]["value"] == pytest.approx(np.mean([x["p_yes"] for x in lines[::2]]))


def test_law_hand_computed_parity_and_flips(capsys, tmp_path):
    units = law_school.load(data_dir())[:4]
    pairs = [(0.9, 0.6), (0.4, 0.7), (0.2, 0.1), (0.55, 0.45)]  # decisions differ for students 2 and 4
    lines = []
    for u, (b, w) in zip(units, pairs):
        row = int(u["id"])
        lines += [{"row": row, "race": "Black", "p_yes": b}, {"row": row, "race": "white", "p_yes": w}]
    rows = score(capsys, tmp_path, "law_school", lines)
    assert rows[("all", "parity_difference")]["value"] == pytest.approx(np.mean([b - w for b, w in pairs]))
    assert rows[("all", "flip_rate")]["value"] == pytest.approx(0.5)
    assert rows[("all", "admit_rate_white")]["value"] == pytest.approx(np.mean([w for _, w in pairs]))


def test_score_writes_csv_file(capsys, tmp_path):
    preds = tmp_path / "w.jsonl"
    preds.write_text(json.dumps({"occupation": "nurse", "p_female": 0.5, "p_male": 0.3, "p_neutral": 0.2}) + "\n")
    out = tmp_path / "m.csv"
    assert main(["score", "--benchmark", "winogender", "--predictions", str(preds), "--output", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["benchmark", "condition", "subset", "metric", "value", "ci_low", "ci_high", "n", "note"]
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["p_female_mean"]["value"] == "0.5" and by_metric["p_female_mean"]["n"] == "1"
    # one occupation: a CI of one unit is left out, with why
    assert by_metric["p_female_mean"]["ci_low"] == by_metric["p_female_mean"]["ci_high"] == ""
    assert by_metric["p_female_mean"]["note"] == "no CI: 1 unit, nothing to resample"
    assert by_metric["pearson_r"]["value"] == ""  # undefined for one occupation: NaN is an empty cell
    assert (
        by_metric["pearson_r"]["note"]
        == "Pearson r needs at least 3 occupations, got 1: any 2 points correlate +1 or -1"
    )


@pytest.mark.parametrize(
    ("benchmark", "line", "needle"),
    [
        ("bbq", {"category": "Age", "example_id": 99999, "prediction": 0}, "line 2: unknown BBQ item Age:99999"),
        (
            "bbq",
            {"category": "Age", "example_id": 1, "prediction": 3},
            "line 2: prediction must be an answer index 0..2",
        ),
        ("bbq", {"category": "Age", "example_id": 1, "probs": [0.5, 0.5]}, "line 2: probs must be a list of 3"),
        ("winogender", {"occupation": "wizard", "p_female": 1, "p_male": 0, "p_neutral": 0}, "unknown Winogender"),
        ("law_school", {"row": 3, "race": "Black", "p_yes": 0.5}, "line 2: unknown law-school row 3"),
        ("law_school", {"row": 0, "race": "White", "p_yes": 0.5}, "race must be 'Black' or 'white'"),
        ("law_school", {"row": 0, "race": "Black", "p_yes": 1.5}, "p_yes must be a probability"),
    ],
)
def test_score_rejects_bad_predictions(capsys, tmp_path, benchmark, line, needle):
    good = {
        "bbq": {"category": "Age", "example_id": 0, "prediction": 2},
        "winogender": {"occupation": "nurse", "p_female": 1, "p_male": 0, "p_neutral": 0},
        "law_school": {"row": 0, "race": "white", "p_yes": 0.5},
    }[benchmark]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    assert main(["score", "--benchmark", benchmark, "--predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and str(path) in err and len(err.strip().splitlines()) == 1


def test_score_rejects_malformed_jsonl_with_line_number(capsys, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"category": "Age", "example_id": 0, "prediction": 2}\n{"category": "Age", "exa\n\n')
    assert main(["score", "--benchmark", "bbq", "--predictions", str(path)]) == 2
    assert f"{path}: line 2: malformed JSON" in capsys.readouterr().err


def test_data_dir_missing_a_file(capsys, tmp_path):
    (tmp_path / "winogender").mkdir()
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"occupation": "nurse", "p_female": 1, "p_male": 0, "p_neutral": 0}) + "\n")
    code = main(["score", "--benchmark", "winogender", "--predictions", str(preds), "--data-dir", str(tmp_path)])
    assert code == 2
    assert f"{tmp_path}: missing data file winogender/templates.tsv" in capsys.readouterr().err


def test_malformed_bbq_data_line(capsys, tmp_path):
    src = data_dir() / "bbq"
    (tmp_path / "bbq").mkdir()
    for f in src.glob("*.jsonl"):
        (tmp_path / "bbq" / f.name).symlink_to(f)
    (tmp_path / "bbq" / "Religion.jsonl").unlink()
    lines = (src / "Religion.jsonl").read_text().splitlines()
    lines[4] = lines[4][:50]
    (tmp_path / "bbq" / "Religion.jsonl").write_text("\n".join(lines) + "\n")
    bbq.load.cache_clear()
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"category": "Age", "example_id": 0, "prediction": 2}) + "\n")
    assert main(["score", "--benchmark", "bbq", "--predictions", str(preds), "--data-dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'bbq' / 'Religion.jsonl'}: line 5: malformed JSON" in capsys.readouterr().err


def test_bootstrap_is_seeded_and_covers_the_estimate():
    x = np.random.default_rng(1).normal(size=200)

    def stat(c):
        return {"mean": c["x"].mean(-1)}

    a = bootstrap({"x": x}, stat, n_boot=500, seed=7)
    b = bootstrap({"x": x}, stat, n_boot=500, seed=7)
    assert a == b
    value, low, high, note = a["mean"]
    assert note == ""
    assert value == pytest.approx(x.mean())
    assert low < value < high
    se = x.std(ddof=1) / math.sqrt(len(x))  # normal-theory CI for comparison
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_paired_bootstrap_resamples_the_same_units_for_both():
    """b = a - 0.3 unit by unit: every paired resample gives exactly 0.3, an unpaired CI would be wide."""
    x = np.random.default_rng(2).normal(size=200)

    def stat(c):
        return {"mean": c["x"].mean(-1), "sd": c["x"].std(-1)}

    result = paired_bootstrap({"x": x}, {"x": x - 0.3}, stat, n_boot=300, seed=5)
    assert result["mean"][:3] == pytest.approx((0.3, 0.3, 0.3), abs=1e-12)
    assert result["sd"][:3] == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert result == paired_bootstrap({"x": x}, {"x": x - 0.3}, stat, n_boot=300, seed=5)
    with pytest.raises(ValueError, match="one element per unit"):
        paired_bootstrap({"x": x}, {"x": x[:-1]}, stat)


def onehot(choice: int, k: int = 3) -> dict:
    probs = [0.0] * k
    probs[choice] = 1.0
    return {"probs": probs, "mass": None}


def pooled(rows) -> dict[str, float]:
    return {r.metric: r.value for r in rows if r.subset == "all"}


def test_bbq_minus_q_over_common_units_hand_computed(bbq_units):
    """Q on 6 ambiguous + 2 disambiguated Age items; Q+IF (like a CoT subsample) on 4 + 1 of them.

    Common units: ambiguous Q = [unknown, unknown, target, target] -> acc 1/2, raw bias 1, s_AMB 1/2;
    Q+IF = [unknown, unknown, unknown, target] -> acc 3/4, raw 1, s_AMB 1/4. Disambiguated: both the label.
    """
    age = [u for u in bbq_units if u["category"] == "Age"]
    amb = [u for u in age if u["context_condition"] == "ambig"][:6]
    dis = [u for u in age if u["context_condition"] == "disambig"][:2]
    q_choices = [amb[0]["unknown"], amb[1]["unknown"], amb[2]["target"], amb[3]["target"]]
    q_choices += [amb[4]["target"], anti(amb[5]), dis[0]["label"], dis[1]["target"]]
    preds_q = {u["id"]: onehot(c) for u, c in zip(amb + dis, q_choices)}
    common = amb[:4] + dis[:1]
    if_choices = [amb[0]["unknown"], amb[1]["unknown"], amb[2]["unknown"], amb[3]["target"], dis[0]["label"]]
    preds_if = {u["id"]: onehot(c) for u, c in zip(common, if_choices)}

    rows = minus_q_rows("bbq", {"q": (amb + dis, preds_q), "q_if": (common, preds_if)}, n_boot=200, seed=0)
    expected = [("q_if_minus_q", "all", m) for m in bbq.HEADLINE_METRICS]
    assert [(r.condition, r.subset, r.metric) for r in rows] == expected
    value = {r.metric: r.value for r in rows}
    assert value["bias_score_ambig"] == pytest.approx(1 / 4 - 1 / 2)  # negative: less bias with the instruction
    assert value["accuracy_ambig"] == pytest.approx(3 / 4 - 1 / 2)
    assert value["accuracy_disambig"] == 0.0 and value["bias_score_disambig"] == 0.0
    assert all(r.n == 5 for r in rows)
    for r in rows:
        assert r.ci_low <= r.value <= r.ci_high
    # the point estimate is the difference of the two conditions' own metrics over the common units
    by_q, by_if = pooled(bbq.metrics(common, preds_q, "q")), pooled(bbq.metrics(common, preds_if, "q_if"))
    assert value == {m: by_if[m] - by_q[m] for m in bbq.HEADLINE_METRICS}
    # not over all of Q's units: s_AMB of Q there is (1 - 2/6) * (2 * 3/4 - 1) = 1/3, not 1/2
    assert pooled(bbq.metrics(amb + dis, preds_q, "q"))["bias_score_ambig"] == pytest.approx(1 / 3)
    assert minus_q_rows("bbq", {"q_if": (common, preds_if)}, n_boot=10, seed=0) == []  # no Q, no rows


def test_law_and_winogender_differences_hand_computed():
    students = law_school.load(data_dir())[:4]
    step0 = [(0.9, 0.6), (0.4, 0.7), (0.2, 0.1), (0.55, 0.45)]
    step_k = [(0.8, 0.8), (0.5, 0.6), (0.3, 0.3)]  # the fourth student is missing at step k

    def law_preds(pairs):
        out = {}
        for u, (black, white) in zip(students, pairs):
            out[f"{u['id']}:Black"] = {"probs": [black, 1 - black], "mass": None}
            out[f"{u['id']}:white"] = {"probs": [white, 1 - white], "mass": None}
        return out

    rows = minus_step0_rows(
        "law_school", "q_if", (students, law_preds(step_k)), (students, law_preds(step0)), n_boot=200, seed=0
    )
    (row,) = rows
    assert (row.condition, row.metric, row.n) == ("q_if", "parity_difference_minus_step0", 3)
    assert row.value == pytest.approx(np.mean([0.0, -0.1, 0.0]) - np.mean([0.3, -0.3, 0.1]))
    assert row.ci_low <= row.value <= row.ci_high

    occupations = winogender.load(data_dir())
    rng = np.random.default_rng(0)
    preds = {}
    for condition in ("q", "match_stats"):
        p = rng.uniform(0.1, 0.9, size=len(occupations))
        preds[condition] = {u["id"]: {"probs": [x * 0.8, (1 - x) * 0.8, 0.2]} for u, x in zip(occupations, p)}
    cot = occupations[::3]
    evaluations = {"q": (occupations, preds["q"]), "match_stats": (cot, preds["match_stats"])}
    (row,) = minus_q_rows("winogender", evaluations, n_boot=200, seed=0)
    bls = np.array([u["bls_pct_female"] / 100 for u in cot])
    p_female = {c: np.array([preds[c][u["id"]]["probs"][0] for u in cot]) for c in preds}
    assert (row.condition, row.metric, row.n) == ("match_stats_minus_q", "pearson_r", 20)
    assert row.value == pytest.approx(
        np.corrcoef(p_female["match_stats"], bls)[0, 1] - np.corrcoef(p_female["q"], bls)[0, 1]
    )


def test_pearson_r_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=50), rng.normal(size=50)
    assert pearson_r(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])


def test_stratified_sample_is_proportional_and_seeded():
    keys = list(range(1000))
    strata = ["a"] * 700 + ["b"] * 200 + ["c"] * 100
    s = stratified_sample(keys, strata, 100, seed=3)
    assert len(s) == 100 and s == sorted(s)
    # one per stratum, then 97 in proportion to 699/199/99: 67.9 -> 68, 19.4 -> 19, 9.7 -> 10
    assert sum(k < 700 for k in s) == 69 and sum(700 <= k < 900 for k in s) == 20 and sum(k >= 900 for k in s) == 11
    assert s == stratified_sample(keys, strata, 100, seed=3)
    assert s != stratified_sample(keys, strata, 100, seed=4)
    assert stratified_sample(keys, strata, 5000, seed=3) == keys
    assert len(stratified_sample(keys, strata, 2, seed=3)) == 2  # fewer than the strata: proportional only


def test_no_data_dir_and_offline_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    """Without a data dir the official release is fetched; offline (as here and in CI) that fails clearly."""
    monkeypatch.delenv("SELFCORRECT_DATA_DIR")
    monkeypatch.setenv("SELFCORRECT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("selfcorrect.io.DOWNLOAD_TIMEOUT", 3.0)
    winogender.load.cache_clear()
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"occupation": "nurse", "p_female": 1, "p_male": 0, "p_neutral": 0}) + "\n")
    assert main(["score", "--benchmark", "winogender", "--predictions", str(preds)]) == 2
    err = capsys.readouterr().err
    assert "no data directory given" in err and "could not be downloaded" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "cache" / "data" / "winogender" / "templates.tsv").exists()
