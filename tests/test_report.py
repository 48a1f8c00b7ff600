"""`selfcorrect report`: metrics.csv files (from the real metric code) -> PNGs and report.md."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from selfcorrect.cli import main
from selfcorrect.config import data_dir
from selfcorrect.errors import UserError
from selfcorrect.evaluate.benchmarks import bbq, law_school, winogender
from selfcorrect.evaluate.metrics import stable_seed, stratified_sample
from selfcorrect.evaluate.paired import minus_q_rows, minus_step0_rows
from selfcorrect.evaluate.report import report
from selfcorrect.evaluate.report_figures import Style, _draw_series, _new_figure
from selfcorrect.evaluate.report_input import COLUMNS, PANELS, load_runs, self_correction_deltas, step0_deltas
from selfcorrect.evaluate.table import METRIC_COLUMNS, row_cells
from selfcorrect.evaluate.table import to_csv as metrics_csv

CONDITIONS = ("q", "q_if", "q_if_cot")
POLICY_COLUMNS = tuple(c for c in COLUMNS if c != "scorer")  # a table as written before the scorer column
STEPS = (0, 50, 100)
STEP_PNGS = ("bbq.png", "winogender.png", "law_school.png", "self_correction.png", "vs_step0.png", "training.png")


def uniform(*parts: object) -> float:
    """A deterministic number in [0, 1) from any parts."""
    return stable_seed(*parts) / 2**32


def bias_level(step: int, condition: str) -> float:
    """How often the synthetic model gives the biased answer: less with RLHF and with instructions."""
    return max(0.05, 0.6 - 0.15 * CONDITIONS.index(condition) - 0.002 * step)


def bbq_preds(units: list[dict], step: int, condition: str) -> dict[str, dict]:
    """Ambiguous: the bias target with probability bias_level, else 'unknown'; disambiguated: 80% correct."""
    preds = {}
    for u in units:
        r = uniform(u["id"], step, condition)
        if u["target"] is None:  # items without a bias target: always right
            choice = u["label"]
        elif u["context_condition"] == "ambig":
            choice = u["target"] if r < bias_level(step, condition) else u["unknown"]
        else:
            choice = u["label"] if r < 0.8 else u["target"]
        probs = [0.1, 0.1, 0.1]
        probs[choice] = 0.8
        preds[u["id"]] = {"probs": probs, "mass": 0.9}
    return preds


def winogender_preds(units: list[dict], step: int, condition: str) -> dict[str, dict]:
    """p_female follows the BLS share in proportion to bias_level, plus noise."""
    w = bias_level(step, condition)
    preds = {}
    for u in units:
        p_female = w * u["bls_pct_female"] / 100 + (1 - w) * 0.5 + 0.1 * (uniform(u["id"], step, condition) - 0.5)
        preds[u["id"]] = {"probs": [0.6 * p_female, 0.6 * (1 - p_female), 0.4], "mass": 0.5}
    return preds


def law_preds(units: list[dict], step: int, condition: str) -> dict[str, dict]:
    """p_yes rises with GPA; Black students get -0.1 * bias_level against them, plus noise."""
    preds = {}
    for u in units:
        base = min(0.9, max(0.1, u["gpa"] / 4.0))
        for race, shift in (("Black", -0.1 * bias_level(step, condition)), ("white", 0.0)):
            p = min(1.0, max(0.0, base + shift + 0.02 * (uniform(u["id"], race, step) - 0.5)))
            preds[f"{u['id']}:{race}"] = {"probs": [p, 1 - p], "mass": 0.8}
    return preds


@pytest.fixture(scope="module")
def units() -> dict[str, list[dict]]:
    """Seeded stratified subsamples of the real benchmark data."""
    out = {}
    for module, limit in ((bbq, 400), (winogender, 60), (law_school, 80)):
        all_units = module.load(data_dir())
        keep = set(stratified_sample([u["id"] for u in all_units], [module.stratum(u) for u in all_units], limit, 0))
        out[module.NAME] = [u for u in all_units if u["id"] in keep]
    return out


def real_metrics_csv(
    units: dict[str, list[dict]], model: str, params: int | str, steps=STEPS, conditions=CONDITIONS, deltas=True
):
    """A run's metrics.csv text from the real metric code on synthetic predictions, per step and condition.

    As evaluate and join_metrics write it: each step's metrics() rows, its ``<c>_minus_q`` rows, and past
    step 0 its ``<m>_minus_step0`` rows; ``deltas=False`` gives a table from before paired differences.
    """
    makers = {bbq: bbq_preds, winogender: winogender_preds, law_school: law_preds}
    parts = []
    for step in steps:
        rows, step_rows = [], []
        for module, make in makers.items():
            evaluations = {}
            for condition in conditions:
                preds = make(units[module.NAME], step, condition)
                evaluations[condition] = (units[module.NAME], preds)
                rows += module.metrics(units[module.NAME], preds, condition, n_boot=100, seed=0)
                if deltas and step != 0 and 0 in steps:
                    at_step0 = (units[module.NAME], make(units[module.NAME], 0, condition))
                    step_rows += minus_step0_rows(
                        module.NAME, condition, evaluations[condition], at_step0, n_boot=100, seed=0
                    )
            if deltas:
                rows += minus_q_rows(module.NAME, evaluations, n_boot=100, seed=0)
        text = metrics_csv(rows + step_rows, {"model": model, "params": params, "step": step})
        parts.append(text if not parts else text.split("\n", 1)[1])
    return "".join(parts)


def write_run(run_dir: Path, metrics: str, manifests: dict[int, dict] | None = None) -> Path:
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "metrics.csv").write_text(metrics)
    for step, manifest in (manifests or {}).items():
        path = run_dir / "ppo" / "checkpoints" / f"step-{step:06d}" / "manifest.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"step": step, **manifest}))
    return run_dir


def manifests(steps=STEPS) -> dict[int, dict]:
    """PPO manifests as train/ppo_checkpoints.py writes them (no rollout yet at step 0)."""
    out = {}
    for step in steps:
        logged = {"reward": 0.01 * step, "kl": 0.002 * step, "response_length": 40 + 0.1 * step} if step else {}
        out[step] = {
            "episodes": 64 * step,
            "tokens": 4000 * step,
            "mean_reward": logged.get("reward"),
            "kl": logged.get("kl"),
            "config_hash": "abc",
            "metrics": logged,
        }
    return out


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    height, width, _ = matplotlib.image.imread(path).shape
    assert 500 <= width <= 2000 and 300 <= height <= 1600, (path, width, height)


def run_report(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_line(r: dict) -> str:
    """The report.md table line of a metrics.csv row (params 135M, values with 3 decimals)."""
    ci = f"[{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}]" if r["ci_low"] else "n/a"
    params = {"135000000": "135M", "1700000000": "1.7B", "": "–"}[r["params"]]
    cells = [r["model"], params, r["step"], r["benchmark"], r["condition"], r["metric"]]
    return "| " + " | ".join([*cells, f"{float(r['value']):+.3f}", ci, r["n"]]) + " |"


def test_columns_are_the_evaluate_columns_with_model_params_step_scorer():
    assert COLUMNS == ("model", "params", "step", "scorer", *METRIC_COLUMNS)


def test_panels_are_the_benchmarks_headline_metrics():
    """The report plots and tabulates the metrics whose paired differences the benchmark modules declare."""
    assert {b: tuple(p.metric for p in panels) for b, panels in PANELS.items()} == {
        m.NAME: m.HEADLINE_METRICS for m in (bbq, winogender, law_school)
    }


def test_report_by_step_from_real_metrics(units, tmp_path, capsys):
    run = write_run(tmp_path / "run", real_metrics_csv(units, "tiny-rlhf", 135_000_000), manifests())
    code, out, err = run_report(capsys, str(run))
    assert code == 0, err
    report_md = run / "report" / "report.md"
    assert out.strip() == f"report: {report_md}"
    text = report_md.read_text()
    for name in STEP_PNGS:
        assert_png(run / "report" / name)
        assert f"]({name})" in text
    headline = {"bias_score_ambig", "bias_score_disambig", "accuracy_ambig", "accuracy_disambig"}
    headline |= {"pearson_r", "parity_difference"}
    rows = [
        r
        for r in read_csv(run / "eval" / "metrics.csv")
        if r["subset"] == "all" and r["metric"] in headline and not r["condition"].endswith("_minus_q")
    ]
    table = [line for line in text.splitlines() if line.startswith("| tiny-rlhf |")]
    assert sorted(table) == sorted(table_line(r) for r in rows)
    assert len(table) == len(STEPS) * len(CONDITIONS) * len(headline)
    # the synthetic model gets less biased with RLHF steps, and the real BBQ metric shows it
    amb = {
        int(r["step"]): float(r["value"]) for r in rows if r["metric"] == "bias_score_ambig" and r["condition"] == "q"
    }
    assert amb[0] > amb[100] > 0
    # the sign conventions are stated
    assert "condition minus Q" in text and "step k minus step 0" in text
    assert "a negative BBQ bias-score difference means less bias" in text


def test_difference_rows_are_only_drawn_in_their_own_figures(units, tmp_path, capsys):
    """The same table with and without paired differences gives byte-identical benchmark figures."""
    with_deltas = write_run(tmp_path / "new", real_metrics_csv(units, "m", 135_000_000), manifests())
    without = write_run(tmp_path / "old", real_metrics_csv(units, "m", 135_000_000, deltas=False), manifests())
    for run in (with_deltas, without):
        code, _, err = run_report(capsys, str(run))
        assert code == 0, err
    for name in ("bbq.png", "winogender.png", "law_school.png", "training.png"):
        assert (with_deltas / "report" / name).read_bytes() == (without / "report" / name).read_bytes(), name
    new, old = ((run / "report" / "report.md").read_text() for run in (with_deltas, without))
    table = [line for line in new.splitlines() if line.startswith("| m |")]
    assert table == [line for line in old.splitlines() if line.startswith("| m |")]
    assert not any("minus" in line for line in table)
    # a table from before the paired differences: every other figure, and a note saying how to add them
    for name in ("self_correction.png", "vs_step0.png"):
        assert_png(with_deltas / "report" / name)
        assert not (without / "report" / name).exists() and f"]({name})" not in old
    assert "Self-correction: metrics.csv has no `<condition>_minus_q` rows" in old
    assert "RLHF vs step 0: metrics.csv has no `<metric>_minus_step0` rows" in old
    assert "rerunning the same `selfcorrect evaluate` command adds them" in old


def test_delta_rows_are_read_with_their_cis(units, tmp_path):
    run = write_run(tmp_path / "run", real_metrics_csv(units, "m", 135_000_000, steps=(0, 50)))
    rows, _ = load_runs([run])
    by_key = {(r.step, r.benchmark, r.condition, r.metric): r for r in rows if r.subset == "all"}

    def value(step: int, benchmark: str, condition: str, metric: str) -> float:
        return by_key[(step, benchmark, condition, metric)].value

    headline = {"bbq": "bias_score_ambig", "winogender": "pearson_r", "law_school": "parity_difference"}
    assert {b: panels[0].metric for b, panels in PANELS.items()} == headline

    deltas = self_correction_deltas(rows)
    assert {(d.benchmark, d.metric) for d in deltas} == set(headline.items())
    assert len(deltas) == 2 * 3 * 2  # steps x benchmarks x (q_if, q_if_cot)
    for d in deltas:
        row = by_key[(d.step, d.benchmark, f"{d.condition}_minus_q", d.metric)]
        assert d.condition in ("q_if", "q_if_cot")
        assert (d.value, d.ci_low, d.ci_high) == (row.value, row.ci_low, row.ci_high)
        assert d.ci_low <= d.value <= d.ci_high
        # condition minus Q: on the same units, the difference of the two conditions' own rows
        own = value(d.step, d.benchmark, d.condition, d.metric) - value(d.step, d.benchmark, "q", d.metric)
        assert d.value == pytest.approx(own, abs=1e-9)

    deltas = step0_deltas(rows)
    assert {(d.step, d.benchmark, d.metric) for d in deltas} == {(50, b, m) for b, m in headline.items()}
    assert len(deltas) == 3 * 3  # benchmarks x conditions, at step 50 only
    for d in deltas:
        row = by_key[(50, d.benchmark, d.condition, f"{d.metric}_minus_step0")]
        assert (d.value, d.ci_low, d.ci_high) == (row.value, row.ci_low, row.ci_high)
        own = value(50, d.benchmark, d.condition, d.metric) - value(0, d.benchmark, d.condition, d.metric)
        assert d.value == pytest.approx(own, abs=1e-9)
    # the synthetic model is less biased at step 50 than at step 0, and the paired CI shows it
    bbq_q = next(d for d in deltas if (d.benchmark, d.condition) == ("bbq", "q"))
    assert bbq_q.ci_high < 0


def test_hand_written_table_shows_exactly_the_numbers(tmp_path, capsys):
    header = ",".join(POLICY_COLUMNS)
    lines = [
        "m,1700000000,0,bbq,q,all,bias_score_ambig,0.125,0.05,0.2,100",
        "m,1700000000,0,bbq,q_if,all,bias_score_ambig,-0.0625,,,100",
        "m,1700000000,0,bbq,q,Age,bias_score_ambig,0.9,0.8,1,10",
        "m,1700000000,0,bbq,q,all,candidate_mass,0.5,0.4,0.6,100",
        "m,1700000000,0,law_school,liu_neg,all,parity_difference,,,,0",
        "m,1700000000,0,bbq,q_if_minus_q,all,bias_score_ambig,-0.1875,-0.3,-0.05,100",
        "m,1700000000,0,bbq,q_if_minus_q,all,accuracy_ambig,0.25,0.1,0.4,100",
    ]
    run = write_run(tmp_path / "run", "\n".join([header, *lines]) + "\n")
    code, _, err = run_report(capsys, str(run))
    assert code == 0, err
    text = (run / "report" / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| m |")]
    assert table == [
        "| m | 1.7B | 0 | bbq | q | bias_score_ambig | +0.125 | [+0.050, +0.200] | 100 |",
        "| m | 1.7B | 0 | bbq | q_if | bias_score_ambig | -0.062 | n/a | 100 |",
        "| m | 1.7B | 0 | law_school | liu_neg | parity_difference | n/a | n/a | 0 |",
    ]
    # absent benchmarks (and one without a value) are skipped with a note; a single step still gives figures
    assert_png(run / "report" / "bbq.png")
    assert_png(run / "report" / "self_correction.png")
    assert not (run / "report" / "winogender.png").exists() and not (run / "report" / "law_school.png").exists()
    assert "Winogender: no metric values in the input" in text
    assert "Law-school admissions: every plotted value is empty (see Empty values), no figure." in text
    assert "- Law-school admissions `parity_difference`, liu_neg, m step 0: no value" in text  # a row without a note


def test_single_step_and_only_q_plots_without_self_correction(units, tmp_path, capsys):
    run = write_run(tmp_path / "run", real_metrics_csv(units, "m", 135_000_000, steps=(0,), conditions=("q",)))
    code, _, err = run_report(capsys, str(run))
    assert code == 0, err
    for name in ("bbq.png", "winogender.png", "law_school.png", "training.png"):
        assert_png(run / "report" / name)
    assert not (run / "report" / "self_correction.png").exists()
    text = (run / "report" / "report.md").read_text()
    assert "Self-correction: metrics.csv has no `<condition>_minus_q` rows (no condition besides Q" in text
    assert "RLHF vs step 0: metrics.csv has no `<metric>_minus_step0` rows (step 0 and a later" in text


def test_several_runs_by_step_need_output(units, tmp_path, capsys):
    a = write_run(tmp_path / "a", real_metrics_csv(units, "run-a", 135_000_000), manifests())
    b = write_run(tmp_path / "b", real_metrics_csv(units, "run-b", 135_000_000, steps=(0, 100)))
    code, _, err = run_report(capsys, str(a), str(b))
    assert code == 2 and "--output" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_report(capsys, str(a), str(b), "--output", str(tmp_path / "both"))
    assert code == 0, err
    text = (tmp_path / "both" / "report.md").read_text()
    for name in STEP_PNGS:
        assert_png(tmp_path / "both" / name)
        assert f"]({name})" in text
    assert "| run-a |" in text and "| run-b |" in text


def test_by_size_over_two_runs_uses_the_largest_step(units, tmp_path, capsys):
    small = write_run(tmp_path / "small", real_metrics_csv(units, "small", 135_000_000, steps=(0, 100)))
    large = write_run(tmp_path / "large", real_metrics_csv(units, "large", 1_700_000_000, steps=(0, 50)))
    out = tmp_path / "sizes"
    code, stdout, err = run_report(capsys, str(small), str(large), "--by", "size", "--output", str(out))
    assert code == 0, err
    assert stdout.strip() == f"report: {out / 'report.md'}"
    text = (out / "report.md").read_text()
    for name in ("bbq.png", "winogender.png", "law_school.png", "self_correction.png"):
        assert_png(out / name)
        assert f"]({name})" in text
    assert not (out / "training.png").exists()
    table = [line.split(" | ") for line in text.splitlines() if line.startswith(("| small |", "| large |"))]
    assert {(cells[0], cells[1], cells[2]) for cells in table} == {
        ("| small", "135M", "100"),
        ("| large", "1.7B", "50"),
    }


def test_by_size_over_one_run_with_several_models(units, tmp_path, capsys):
    """An evaluation-only sweep: model a without RLHF (empty step), model b at step 0."""
    text = real_metrics_csv(units, "a", 135_000_000, steps=(0,)).replace(",135000000,0,", ",135000000,,")
    text += real_metrics_csv(units, "b", 1_700_000_000, steps=(0,)).split("\n", 1)[1]
    run = write_run(tmp_path / "sweep", text)
    code, _, err = run_report(capsys, str(run), "--by", "size")
    assert code == 0, err
    assert_png(run / "report-by-size" / "bbq.png")
    report = (run / "report-by-size" / "report.md").read_text()
    assert "| a | 135M | – | bbq |" in report and "| b | 1.7B | 0 | law_school |" in report


def test_by_size_needs_params(units, tmp_path, capsys):
    run = write_run(tmp_path / "run", real_metrics_csv(units, "m", "", steps=(0,)))
    code, _, err = run_report(capsys, str(run), "--by", "size")
    assert code == 2
    assert err.strip() == (
        f"selfcorrect: error: {run / 'eval' / 'metrics.csv'}: model 'm' has no 'params' (parameter count); "
        "--by size needs it"
    )


def test_no_metrics_is_a_one_line_error_and_overwrites_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "report.md").write_text("old report\n")
    (run / "report" / "bbq.png").write_bytes(b"old png")
    code, out, err = run_report(capsys, str(run))
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()]
    assert f"{run / 'eval' / 'metrics.csv'}: no metrics" in err
    assert (run / "report" / "report.md").read_text() == "old report\n"
    assert (run / "report" / "bbq.png").read_bytes() == b"old png"
    assert sorted(p.name for p in (run / "report").iterdir()) == ["bbq.png", "report.md"]


@pytest.mark.parametrize(
    "content, needle",
    [
        ("model,step,benchmark,condition,subset,metric,value\nm,0,bbq,q,all,unknown_rate,0.3\n", "missing columns"),
        (",".join(POLICY_COLUMNS) + "\n", "no rows"),
        (",".join(POLICY_COLUMNS) + "\nm,,x,bbq,q,all,unknown_rate,0.3,,,10\n", "line 2: column 'step': not a number"),
        (",".join(POLICY_COLUMNS) + "\nm,,0,bbq,q,all,x,0.1,,,1\nm,,0,bbq,q,all,x,0.2,,,1\n", "two rows for model 'm'"),
        (",".join(POLICY_COLUMNS) + "\nm,,,bbq,q,all,unknown_rate,0.3,,,10\n", "has no 'params'"),  # no steps: by size
    ],
)
def test_bad_metrics_csv(tmp_path, capsys, content, needle):
    run = write_run(tmp_path / "run", content)
    (run / "report").mkdir()
    (run / "report" / "report.md").write_text("old\n")
    code, _, err = run_report(capsys, str(run))
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert str(run / "eval" / "metrics.csv") in err and needle in err
    assert (run / "report" / "report.md").read_text() == "old\n"


def test_bad_manifest_names_the_file(tmp_path, capsys):
    run = write_run(tmp_path / "run", ",".join(POLICY_COLUMNS) + "\nm,,0,bbq,q,all,unknown_rate,0.3,,,10\n")
    path = run / "ppo" / "checkpoints" / "step-000050" / "manifest.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"step": 50, "mean_reward": "high"}')
    code, _, err = run_report(capsys, str(run))
    assert code == 2 and f"{path}: 'mean_reward' must be a number or null" in err


def test_training_covariates_from_manifests(tmp_path, capsys):
    """An eval-only metric set plus manifests: training.png has the reward/KL/length and unknown panels."""
    rows = [f"m,,{s},bbq,{c},all,unknown_rate,{0.2 + 0.001 * s},0.1,0.4,50" for s in STEPS for c in CONDITIONS]
    run = write_run(tmp_path / "run", "\n".join([",".join(POLICY_COLUMNS), *rows]) + "\n", manifests())
    code, _, err = run_report(capsys, str(run))
    assert code == 0, err
    assert_png(run / "report" / "training.png")
    image = matplotlib.image.imread(run / "report" / "training.png")
    assert image.shape[0] > image.shape[1] * 0.6  # 2 x 2 panels
    assert np.asarray(image).std() > 0.05  # something is drawn


def test_report_returns_the_report_path_and_refuses_a_file_as_output(tmp_path):
    run = write_run(tmp_path / "run", ",".join(POLICY_COLUMNS) + "\nm,,0,bbq,q,all,unknown_rate,0.3,,,10\n")
    assert report([run]) == run / "report" / "report.md"
    (tmp_path / "taken").write_text("a file\n")
    with pytest.raises(UserError, match="taken: exists and is not a directory"):
        report([run], output=tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "a file\n"


def test_report_of_a_single_model_evaluation_directory(tiny_model_dir, tmp_path, capsys):
    """The output of `selfcorrect evaluate MODEL --output DIR` plots too: one point per condition, by size."""
    out = tmp_path / "eval"
    args = ["--benchmarks", "winogender", "--conditions", "q,q_if", "--limit", "4", "--bootstrap", "10"]
    assert main(["evaluate", str(tiny_model_dir), "--output", str(out), *args]) == 0
    assert main(["report", str(out)]) == 0
    report_dir = out / "report-by-size"
    assert (report_dir / "winogender.png").is_file() and (report_dir / "report.md").is_file()
    text = (report_dir / "report.md").read_text()
    assert tiny_model_dir.name in text and "model size" in text
    capsys.readouterr()
    assert main(["report", str(out), "--by", "step", "--output", str(tmp_path / "r")]) == 2
    assert "no row has an RLHF step" in capsys.readouterr().err


TWO_POINTS = "Pearson r needs at least 3 occupations, got 2: any 2 points correlate +1 or -1"


def test_empty_values_are_not_drawn_and_the_report_says_why(tmp_path, capsys):
    """Winogender r at steps 0 and 100, empty at step 50 (a 2-occupation CoT subsample); a value without a CI."""
    header = ",".join(POLICY_COLUMNS)
    lines = [
        "m,1700000000,0,winogender,q_if_cot,all,pearson_r,0.4,0.1,0.7,60,",
        f'm,1700000000,50,winogender,q_if_cot,all,pearson_r,,,,2,"{TWO_POINTS}"',
        "m,1700000000,100,winogender,q_if_cot,all,pearson_r,0.2,-0.1,0.5,60,",
        'm,1700000000,100,bbq,q,all,accuracy_ambig,1,,,1,"no CI: 1 unit, nothing to resample"',
        f'm,1700000000,50,winogender,q_if_cot_minus_q,all,pearson_r,,,,2,"q_if_cot and q: {TWO_POINTS}"',
        "m,1700000000,100,winogender,q_if_cot_minus_q,all,pearson_r,0.1,0,0.2,60,",
    ]
    run = write_run(tmp_path / "run", "\n".join([header, *lines]) + "\n")
    code, _, err = run_report(capsys, str(run))
    assert code == 0, err
    text = (run / "report" / "report.md").read_text()
    assert "| m | 1.7B | 50 | winogender | q_if_cot | pearson_r | n/a (" + TWO_POINTS + ") | n/a | 2 |" in text
    assert (
        "| m | 1.7B | 100 | bbq | q | accuracy_ambig | +1.000 | n/a (no CI: 1 unit, nothing to resample) | 1 |" in text
    )
    assert "## Empty values" in text
    assert f"- Winogender `pearson_r`, Q+IF+CoT, m step 50: {TWO_POINTS}" in text
    assert (
        f"- Self-correction (condition − Q): Winogender `pearson_r`, Q+IF+CoT, m step 50: q_if_cot and q: {TWO_POINTS}"
        in text
    )
    assert_png(run / "report" / "winogender.png")
    assert_png(run / "report" / "self_correction.png")

    # drawn: the empty step is a gap in the line, not a point; the two points it cuts off get error bars
    rows, _ = load_runs([run])
    points = [r for r in rows if r.metric == "pearson_r" and r.condition == "q_if_cot"]
    assert [r.note for r in points] == ["", TWO_POINTS, ""]
    _, (ax,) = _new_figure(1, "t", "m")
    _draw_series(ax, points, Style.of("step", ["q_if_cot"], ["m"]), lambda r: r.value, lambda r: (r.ci_low, r.ci_high))
    line = ax.lines[0]  # the series (then the error bars' caps)
    assert list(line.get_xdata()) == [0, 50, 100]
    ys = line.get_ydata()
    assert ys[0] == 0.4 and np.isnan(ys[1]) and ys[2] == 0.2
    (errorbars,) = ax.containers
    (bars,) = errorbars.lines[2]
    segments = [np.asarray(segment, dtype=float) for segment in bars.get_segments()]
    assert len(segments) == 2
    assert segments[0] == pytest.approx(np.array([[0, 0.1], [0, 0.7]]))
    assert segments[1] == pytest.approx(np.array([[100, -0.1], [100, 0.5]]))


def test_a_table_from_before_the_note_column_still_reads(tmp_path, capsys):
    old_columns = [c for c in POLICY_COLUMNS if c != "note"]
    run = write_run(
        tmp_path / "run", ",".join(old_columns) + "\nm,1700000000,0,bbq,q,all,bias_score_ambig,0.1,0,0.2,9\n"
    )
    code, _, err = run_report(capsys, str(run))
    assert code == 0, err
    (row,) = load_runs([run])[0]
    assert row.note == "" and row.value == 0.1
    raw = dict(zip(old_columns, ["m", "1", "0", "bbq", "q", "all", "x", "0.1", "0", "0.2", "9"]))
    assert row_cells(raw) == ["bbq", "q", "all", "x", "0.1", "0", "0.2", "9", ""]  # as a run's joined table writes it


def with_reward_rows(policy_csv: str, units: dict[str, list[dict]], model: str) -> str:
    """A run's table with the probe of its reward model: the policy rows (scorer policy), then the reward model's
    rows (scorer reward, no step) from the real metric code on synthetic preferences (BBQ as the step-0 policy)."""
    lines = policy_csv.splitlines()
    text = "\n".join([lines[0].replace("step,", "step,scorer,", 1)] + [
        ",".join([*line.split(",")[:3], "policy", *line.split(",")[3:]]) for line in lines[1:]
    ]) + "\n"  # fmt: skip
    makers = {bbq: bbq_preds, winogender: winogender_preds, law_school: law_preds}
    rows = []
    for module, make in makers.items():
        evaluations = {c: (units[module.NAME], make(units[module.NAME], 0, c)) for c in ("q", "q_if")}
        for condition, (us, preds) in evaluations.items():
            rows += module.metrics(us, preds, condition, n_boot=100, seed=0)
        rows += minus_q_rows(module.NAME, evaluations, n_boot=100, seed=0)
    reward = metrics_csv(rows, {"model": model, "params": "", "step": "", "scorer": "reward"})
    return text + reward.split("\n", 1)[1]


def test_the_reward_models_rows_are_reference_lines_and_a_table_of_their_own(units, tmp_path, capsys):
    """The same run with and without its reward model's probe: the benchmark figures gain its dotted lines (and a
    caption that says how to read them), report.md a table of its numbers; the paired-difference and training
    figures and the policy's table are unchanged, and the probe's rows are no line or point of their own."""
    policy = real_metrics_csv(units, "m", 135_000_000)
    plain = write_run(tmp_path / "plain", policy, manifests())
    probed = write_run(tmp_path / "probed", with_reward_rows(policy, units, "m"), manifests())
    for run in (plain, probed):
        code, _, err = run_report(capsys, str(run))
        assert code == 0, err
    for name in ("bbq.png", "winogender.png", "law_school.png"):
        assert (plain / "report" / name).read_bytes() != (probed / "report" / name).read_bytes(), name
    for name in ("self_correction.png", "vs_step0.png", "training.png"):
        assert (plain / "report" / name).read_bytes() == (probed / "report" / name).read_bytes(), name
    old, new = ((run / "report" / "report.md").read_text() for run in (plain, probed))
    policy_table = [line for line in old.splitlines() if line.startswith("| m | 135M |")]
    assert policy_table == [line for line in new.splitlines() if line.startswith("| m | 135M |")]
    assert "## Reward model (probe)" in new and "Dotted horizontal lines: the run's reward model" in new
    assert "Reward model" not in old and "Dotted" not in old
    reward_lines = [line for line in new.splitlines() if line.startswith("| m | – | – |")]
    assert len(reward_lines) == 2 * 6  # q and q_if x the 6 headline metrics
    assert "Left out of the step plots" not in new  # the probe is not a model without steps


def test_a_table_of_reward_model_rows_only_or_a_bad_scorer_is_a_one_line_error(units, tmp_path, capsys):
    only = with_reward_rows(real_metrics_csv(units, "m", 135_000_000), units, "m")
    header, *lines = only.splitlines()
    run = write_run(tmp_path / "only", "\n".join([header, *(x for x in lines if ",reward," in x)]) + "\n")
    code, _, err = run_report(capsys, str(run))
    assert code == 2 and "only reward-model (probe) rows" in err and len(err.strip().splitlines()) == 1
    bad = write_run(tmp_path / "bad", only.replace(",reward,", ",critic,", 1))
    code, _, err = run_report(capsys, str(bad))
    assert code == 2 and "column 'scorer': expected policy or reward, got 'critic'" in err
