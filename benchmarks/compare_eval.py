"""Side by side: ``selfcorrect evaluate`` against lm-evaluation-harness (``lm-eval[hf]==0.4.13``) on BBQ, end to end.

Both commands run one after the other on the same model (fp32, CPU), each in its own process and Python
environment, and each is timed from process start to exit (imports, model and data loading, scoring, metrics,
writing results):

* **selfcorrect** -- ``python -m selfcorrect evaluate MODEL --benchmarks bbq --conditions q --limit N --output TMP
  --data-dir DATA --dtype float32 --device cpu --batch-size B`` with selfcorrect's python and ``PYTHONPATH`` = this
  repository. It draws a seeded sample of N BBQ examples stratified by category x context condition x polarity,
  renders each under the Q prompt (``"\\n\\nHuman: <context> <question>\\n\\n(a) .. (b) .. (c) ..\\n\\nAssistant: The
  answer is ("``), runs each batch of prompts as one row holding their token trie (shared prefixes once), reads the
  next-token log-probabilities of the letters a/b/c at the last position, and computes accuracy and bias scores with
  1000-sample bootstrap CIs.
* **lm-eval** -- ``lm_eval --model hf --model_args pretrained=MODEL,dtype=float32 --tasks bbq_local --include_path
  TASKS --limit N --device cpu --batch_size B --output_path TMP --log_samples`` in a virtualenv built on first use
  under ``--cache-dir``. ``bbq_local`` is lm-eval's own ``bbq`` task (``tasks/bbq/bbq_multiple_choice.yaml``,
  included, not copied) with its data source changed from the hub dataset ``oskarvanderwal/bbq`` (config ``All``) to
  the local ``bbq/*.jsonl`` files via ``dataset_path: json`` and ``dataset_kwargs.data_files`` (the eleven category
  files in alphabetical order; records with an empty ``answer_info``, which lm-eval 0.4.13's ``process_docs`` cannot
  read, are dropped first: see ``anchors/lm_eval_bbq_local.py``). ``--limit N`` takes the first N documents of that
  split, so all of them come from ``Age.jsonl``. Each document is a multiple-choice item with 12 options (the two
  non-unknown answers plus lm-eval's 10 "unknown" phrasings), so lm-eval scores 12 ``(context, " " + option)``
  log-likelihoods per item (``"<context>\\n\\nQ: <question>\\nA:"``), logits at every position, and computes accuracy
  and bias scores. The run has ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1``; the local JSON files are read once
  before the timed run so that the datasets cache is warm (lm-eval would otherwise convert all 58,492 records on its
  first run only).

It prints wall clock, items/s and peak RSS (process tree) of each, the ratio of items/s (goal >= 20x), the scoring
time each tool reports itself (selfcorrect's ``N items in S s`` line, lm-eval's loglikelihood progress bar), and
the work per item: selfcorrect's tokens forwarded per item against the one-pass-per-item bound, and
lm-eval's requests and tokens per item (from its logged samples). The two ``--limit N`` samples differ (selfcorrect's
shares no contexts, lm-eval's first N documents are whole contexts asked four questions each), so it then also times
selfcorrect's scoring of lm-eval's own documents (``anchors/same_items.py``) against lm-eval's scoring time. It
measures; it asserts nothing.

    /work/main/.venv/bin/python benchmarks/compare_eval.py --data-dir ../shared/data --json out/eval.json
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import harness

LM_EVAL_VENV = "lm-eval-0.4.13"
LM_EVAL_STEPS = [[harness.TORCH_PIN], ["lm-eval[hf]==0.4.13"]]
LM_EVAL_PACKAGES = ["torch", "transformers", "accelerate", "lm_eval", "datasets"]
TASK_NAME = "bbq_local"
LM_EVAL_METRICS = ("acc", "accuracy_amb", "accuracy_disamb", "amb_bias_score", "disamb_bias_score")
HEADLINE = ("acc", "bias", "amb_bias", "disamb_bias")  # metric-name prefixes printed for both tools
SPEED_GOAL = 20.0
HERE = Path(__file__).resolve().parent
LOCAL_UTILS = HERE / "anchors" / "lm_eval_bbq_local.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="BBQ evaluation side by side, end to end: selfcorrect evaluate (condition q) vs lm-eval 0.4.13's "
        "bbq task on the local data; wall clock, items/s, peak RSS, work per item.",
        epilog="The lm-eval virtualenv is built on first use (several minutes) and reused afterwards.",
    )
    p.add_argument("--limit", type=int, default=200, help="BBQ items per tool (default 200)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of both tools (default 16)")
    harness.add_common_arguments(p, "lm-eval", "outputs and logs (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.limit < 1 or args.batch_size < 1:
        p.error("--limit and --batch-size must be positive")
    return args


def base_env() -> dict[str, str]:
    """The environment of every child: offline hub access, no tokenizer thread pools."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    return env


def model_dir(args: argparse.Namespace, py: Path, work: Path) -> str:
    """The model directory: ``--model``, else the embedded model converted once by selfcorrect."""
    if args.model:
        return str(Path(args.model).resolve())
    code = "from selfcorrect.models import prepare_embedded; print(prepare_embedded())"
    run = harness.measure(
        [str(py), "-c", code], work / "prepare.log", {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)}
    )
    harness.check(run, "preparing the embedded model")
    return Path(run.log_path).read_text().strip().splitlines()[-1]


def bbq_files(data: Path) -> list[str]:
    """The local BBQ category files, alphabetically."""
    files = sorted(glob.glob(str(data / "bbq" / "*.jsonl")))
    if not files:
        raise SystemExit(f"compare_eval: no bbq/*.jsonl under {data}; give --data-dir or set SELFCORRECT_DATA_DIR")
    return files


def write_task(lm_python: Path, files: list[str], tasks_dir: Path) -> Path:
    """A task YAML that includes lm-eval's installed ``bbq`` task and points it at the local files.

    Its ``process_docs`` is ``anchors/lm_eval_bbq_local.py`` (copied beside the YAML): lm-eval's own, after dropping
    the records with an empty ``answer_info`` that lm-eval 0.4.13 cannot read (none among the first documents).
    """
    venv = lm_python.parent.parent
    found = sorted(venv.glob("lib/python*/site-packages/lm_eval/tasks/bbq/bbq_multiple_choice.yaml"))
    if not found:
        raise SystemExit(f"compare_eval: lm-eval's bbq task not found in {venv}")
    tasks_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"include: {found[0]}",
        f"task: {TASK_NAME}",
        "dataset_path: json",
        "dataset_name: null",
        "dataset_kwargs:",
        "  data_files:",
        "    test:",
        *[f"      - {f}" for f in files],
        "test_split: test",
        f"process_docs: !function {LOCAL_UTILS.stem}.process_docs",
    ]
    shutil.copy(LOCAL_UTILS, tasks_dir / LOCAL_UTILS.name)
    path = tasks_dir / f"{TASK_NAME}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def warm_datasets_cache(lm_python: Path, files: list[str], work: Path) -> None:
    """Load the local JSON files once with ``datasets`` in the lm-eval venv (the timed run then hits the cache)."""
    code = "import sys, datasets; datasets.load_dataset('json', data_files={'test': sys.argv[1:]})"
    run = harness.measure([str(lm_python), "-c", code, *files], work / "lm-eval-warm.log", base_env())
    harness.check(run, "loading the BBQ files with datasets")


def run_selfcorrect(args: argparse.Namespace, model: str, data: Path, work: Path, py: Path) -> dict[str, Any]:
    """``selfcorrect evaluate`` on BBQ q; measurements and headline metrics."""
    out = work / "selfcorrect-eval"
    cmd = [
        str(py), "-m", "selfcorrect", "evaluate", model, "--benchmarks", "bbq", "--conditions", "q",
        "--limit", str(args.limit), "--output", str(out), "--data-dir", str(data), "--dtype", "float32",
        "--device", "cpu", "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    harness.log("selfcorrect evaluate: " + " ".join(cmd[2:]))
    run = harness.measure(cmd, work / "selfcorrect-eval.log", {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)})
    harness.check(run, "selfcorrect evaluate")
    metrics = {}
    with open(out / "metrics.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("condition") == "q" and row.get("subset") == "all":
                metrics[row["metric"]] = float(row["value"]) if row["value"] else None
    return {"items": args.limit, "output": str(out), "metrics": metrics, "run": run.as_dict()}


def run_lm_eval(args: argparse.Namespace, model: str, tasks_dir: Path, work: Path, py: Path) -> dict[str, Any]:
    """``lm_eval`` with the local bbq task; measurements, headline metrics and the samples file."""
    out = work / "lm-eval-out"
    cmd = [
        str(py.parent / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
        "--tasks", TASK_NAME, "--include_path", str(tasks_dir), "--limit", str(args.limit), "--device", "cpu",
        "--batch_size", str(args.batch_size), "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    harness.log("lm_eval: " + " ".join(cmd[1:]))
    run = harness.measure(cmd, work / "lm-eval.log", base_env())
    harness.check(run, "lm_eval")
    results = sorted(out.rglob("results_*.json"))
    samples = sorted(out.rglob(f"samples_{TASK_NAME}_*.jsonl"))
    metrics: dict[str, Any] = {}
    n_items = args.limit
    if results:
        data = json.loads(results[-1].read_text())
        task = data.get("results", {}).get(TASK_NAME, {})
        metrics = {k.split(",")[0]: v for k, v in task.items() if k.split(",")[0] in LM_EVAL_METRICS}
        n_items = data.get("n-samples", {}).get(TASK_NAME, {}).get("effective", n_items)
    return {
        "items": n_items,
        "metrics": metrics,
        "samples_file": str(samples[-1]) if samples else None,
        "run": run.as_dict(),
    }


def scoring_seconds(log_path: str, tool: str) -> float | None:
    """The scoring time each tool reports in its own log (best effort; None if not found).

    selfcorrect: ``bbq/q: N items in S s``; lm-eval: the elapsed time of the last update of its
    ``Running loglikelihood requests`` progress bar (``[MM:SS<`` or ``[H:MM:SS<``).
    """
    text = Path(log_path).read_text(errors="replace").replace("\r", "\n")
    if tool == "selfcorrect":
        found = re.findall(r"bbq/q: \d+ items in ([\d.]+) s", text)
        return float(found[-1]) if found else None
    found = re.findall(r"Running loglikelihood requests: 100%.*?\[([\d:]+)<", text)
    if not found:
        return None
    seconds = 0.0
    for part in found[-1].split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def work_per_item(model: str, data: Path, sc: dict, lm: dict | None, args: argparse.Namespace, work: Path, py: Path):
    """Token counts per item of both runs (``anchors/eval_work.py``; tokenization only), or None on failure."""
    out = work / "work.json"
    cmd = [
        str(py), str(HERE / "anchors" / "eval_work.py"), "--model", model, "--data-dir", str(data),
        "--sc-output", sc["output"], "--batch-size", str(args.batch_size), "--out", str(out),
    ]  # fmt: skip
    if lm and lm.get("samples_file"):
        cmd += ["--lm-eval-samples", lm["samples_file"]]
    run = harness.measure(cmd, work / "work.log", {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)})
    if run.returncode != 0:
        harness.log(f"work per item: failed (see {run.log_path}); left out")
        return None
    return json.loads(out.read_text())


def same_items(model: str, data: Path, lm: dict | None, args: argparse.Namespace, work: Path, py: Path):
    """selfcorrect's scoring time on lm-eval's documents (``anchors/same_items.py``), or None without them."""
    if not lm or not lm.get("samples_file"):
        return None
    out = work / "same-items.json"
    cmd = [
        str(py), str(HERE / "anchors" / "same_items.py"), "--model", model, "--data-dir", str(data),
        "--lm-eval-samples", lm["samples_file"], "--batch-size", str(args.batch_size), "--out", str(out),
    ]  # fmt: skip
    harness.log("selfcorrect scoring lm-eval's documents")
    run = harness.measure(cmd, work / "same-items.log", {**base_env(), "PYTHONPATH": str(harness.REPO_ROOT)})
    if run.returncode != 0:
        harness.log(f"same items: failed (see {run.log_path}); left out")
        return None
    return json.loads(out.read_text())


def report(
    args: argparse.Namespace, results: dict[str, dict], work: dict | None, same: dict | None = None
) -> dict[str, Any]:
    """Print the table, the ratio and the work per item; return the summary figures."""
    rows, summary = [], {}
    for tool, r in results.items():
        wall, peak = r["run"]["wall_s"], r["run"]["peak_rss_mb"]
        rate = r["items"] / wall
        scoring = scoring_seconds(r["run"]["log_path"], tool)
        summary[tool] = {
            "items": r["items"], "wall_s": wall, "items_per_s": rate, "peak_rss_mb": peak, "scoring_s": scoring,
        }  # fmt: skip
        shown = f"{scoring:.1f}" if scoring is not None else "?"
        rows.append([tool, str(r["items"]), f"{wall:.1f}", f"{rate:.3g}", shown, f"{peak:.0f}"])
    load = harness.load_note([r["run"] for r in results.values()])
    print(f"BBQ, --limit {args.limit}, batch size {args.batch_size}, fp32, CPU, end to end; {load}")
    harness.print_table(["tool", "items", "wall s", "items/s", "scoring s", "peak RSS MB"], rows)
    figures: dict[str, Any] = {"summary": summary}
    if "selfcorrect" in summary and "lm_eval" in summary:
        ratio = summary["selfcorrect"]["items_per_s"] / summary["lm_eval"]["items_per_s"]
        figures["speed_ratio"] = ratio
        print(f"items/s selfcorrect/lm-eval: {ratio:.1f}x   (goal >= {SPEED_GOAL:.0f}x)")
        a, b = summary["selfcorrect"]["scoring_s"], summary["lm_eval"]["scoring_s"]
        if a and b:
            figures["scoring_ratio"] = b / a * summary["selfcorrect"]["items"] / summary["lm_eval"]["items"]
            print(f"scoring only (each tool's own timer), items/s selfcorrect/lm-eval: {figures['scoring_ratio']:.1f}x")
    if work:
        sc = work["selfcorrect"]
        print(
            f"selfcorrect work per item: {sc['tokens_per_item_forwarded']:.1f} tokens forwarded (each node of a "
            f"batch's token trie once, {sc['batches']} batches) vs {sc['tokens_per_item_bound']:.1f} for one "
            "pass over the prompt "
            f"({sc['tokens_per_item_forwarded'] / sc['tokens_per_item_bound']:.2f}x one pass per item); "
            f"{sc['forward_rows'] / sc['items']:.2f} forward rows and {sc['lm_head_positions_per_item']:.2f} "
            "LM-head positions per item"
        )
        lm = work.get("lm_eval")
        if lm and lm["items"]:
            print(
                f"lm-eval work per item: {lm['requests_per_item']:.1f} requests, ~{lm['tokens_per_item_estimate']:.0f} "
                "tokens forwarded (unpadded estimate), logits at every position"
            )
        figures["work_per_item"] = work
    lm_scoring = summary.get("lm_eval", {}).get("scoring_s")
    if same and lm_scoring:
        ratio = lm_scoring / same["scoring_s"] * same["items"] / summary["lm_eval"]["items"]
        print(
            f"on lm-eval's own {same['items']} documents ({', '.join(same['categories'])}), scoring only: selfcorrect "
            f"{same['scoring_s']:.1f} s ({same['tokens_per_item_forwarded']:.1f} tokens forwarded per item, "
            f"{same['tokens_per_item_forwarded'] / same['tokens_per_item_bound']:.2f}x one pass, {same['batches']} "
            f"batches) vs lm-eval {lm_scoring:.1f} s: {ratio:.1f}x"
        )
        figures["same_items"] = {**same, "scoring_ratio": ratio}
    for tool, r in results.items():
        headline = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float)) and k.startswith(HEADLINE)}
        shown = ", ".join(f"{k} {v:.3f}" for k, v in headline.items())
        print(f"{tool} metrics (different items and scoring; not comparable): {shown}")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run both evaluations and print the comparison."""
    args = parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        vars(args).update({k: v for k, v in saved["settings"].items() if k in ("limit", "batch_size")})
        report(args, saved["runs"], saved.get("work_per_item"), saved.get("same_items"))
        return 0
    data = Path(args.data_dir or os.environ.get("SELFCORRECT_DATA_DIR") or "").expanduser().resolve()
    files = bbq_files(data)
    root, sc_python, work = harness.start(args, "compare-eval-")
    versions = {"selfcorrect": harness.package_versions(sc_python, LM_EVAL_PACKAGES)}
    lm_python = None
    if not args.skip_anchor:
        lm_python, versions["lm_eval"] = harness.ensure_venv(LM_EVAL_VENV, LM_EVAL_STEPS, LM_EVAL_PACKAGES, root)
    model = model_dir(args, sc_python, work)
    results: dict[str, dict] = {"selfcorrect": run_selfcorrect(args, model, data, work, sc_python)}
    if lm_python is not None:
        tasks_dir = work / "lm-eval-tasks"
        write_task(lm_python, files, tasks_dir)
        harness.log("lm-eval: warming the datasets cache with the local BBQ files (not timed)")
        warm_datasets_cache(lm_python, files, work)
        results["lm_eval"] = run_lm_eval(args, model, tasks_dir, work, lm_python)
    harness.log("work per item (tokenization only)")
    work_figures = work_per_item(model, data, results["selfcorrect"], results.get("lm_eval"), args, work, sc_python)
    same = same_items(model, data, results.get("lm_eval"), args, work, sc_python)
    figures = report(args, results, work_figures, same)
    for tool, v in versions.items():
        print(f"{tool} env: " + ", ".join(f"{k} {v[k]}" for k in LM_EVAL_PACKAGES if v.get(k)))
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    harness.write_json(args.json, {"settings": settings, "model": model, "versions": versions, **figures,
                                   "runs": results})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
