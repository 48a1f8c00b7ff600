"""The regression suite of bad inputs: every `selfcorrect` command, each case a one-line error with exit code 2, no
traceback, and nothing that was on disk before changed (byte for byte)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from selfcorrect.cli import main

DATA = Path(os.environ.get("SELFCORRECT_DATA_DIR", ""))
HH = str(DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz")


@dataclass
class Env:
    """A directory of inputs, good and bad, that the cases point at."""

    root: Path
    model: Path

    def __call__(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def write(self, name: str, text: str) -> str:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def config(self, name: str, **changes) -> str:
        """A small run config on the tiny model and the local HH slice (output under out/), with changes."""
        cfg = {
            "name": "bad",
            "output_dir": self("out", name),
            "model": {"name_or_path": str(self.model)},
            "sft": {"data": {"path": HH, "format": "hh", "limit": 8}, "max_length": 64, "trainer": {"max_steps": 1}},
            "reward": {"function": "selfcorrect_bad_inputs_rules:length"},
            "ppo": {"prompts": {"path": HH, "format": "hh", "limit": 8}, "steps": 2, "save_at_steps": [0, 2]},
        }
        for key, value in changes.items():
            section, _, field = key.partition("__")
            if field:
                cfg[section] = {**cfg[section], field: value}
            else:
                cfg[section] = value
        return self.write(f"configs/{name}.yaml", yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def env(tiny_model_dir, tmp_path_factory) -> Env:
    root = tmp_path_factory.mktemp("bad-inputs")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    e = Env(root, model)
    e.write(
        "rules/selfcorrect_bad_inputs_rules.py", "def length(prompts, responses):\n    return [1.0] * len(responses)\n"
    )  # noqa: E501
    e.write("a_file.txt", "not a directory\n")
    # an evaluation output that bad reruns must leave as it is
    args = ["--benchmarks", "winogender", "--conditions", "q", "--limit", "4", "--bootstrap", "10"]
    assert main(["evaluate", str(model), "--output", e("eval_done"), *args]) == 0
    # broken models
    truncated = root / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    unknown = root / "unknown_type"
    shutil.copytree(tiny_model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model-type"}))
    recorded = root / "recorded"
    shutil.copytree(tiny_model_dir, recorded)
    (recorded / "manifest.json").write_text(json.dumps({"step": 1, "dialogue": {"format": "chat_template"}}))
    # prompt files
    e.write(
        "prompts/positional.yaml",
        "name: p\nbbq:\n  conditions:\n    mine:\n      human: ['{} {question}']\n      assistant: 'The answer is'\n",
    )
    e.write(
        "prompts/attribute.yaml",
        "name: p\nbbq:\n  conditions:\n    mine:\n      human: ['{context.upper}']\n      assistant: 'The answer is'\n",
    )
    e.write(
        "prompts/unbalanced.yaml",
        "name: p\nbbq:\n  conditions:\n    mine:\n      human: ['{context']\n      assistant: 'The answer is'\n",
    )
    # predictions made elsewhere
    e.write(
        "preds/duplicate.jsonl", '{"occupation": "nurse", "p_female": 0.9, "p_male": 0.05, "p_neutral": 0.05}\n' * 2
    )  # noqa: E501
    e.write("preds/infinite.jsonl", '{"category": "Age", "example_id": 0, "probs": [Infinity, 0, 0]}\n')
    e.write(
        "preds/contradict.jsonl", '{"category": "Age", "example_id": 0, "probs": [0.8, 0.1, 0.1], "prediction": 2}\n'
    )  # noqa: E501
    e.write("preds/unpaired.jsonl", '{"row": 0, "race": "Black", "p_yes": 0.5}\n')
    e.write("preds/unknown_item.jsonl", '{"category": "Age", "example_id": 999999, "prediction": 0}\n')
    e.write("preds/malformed.jsonl", '{"category": "Age", "example_id": 0, "prediction": 0}\n{"category": \n')
    e.write("preds/good_bbq.jsonl", '{"category": "Age", "example_id": 0, "prediction": 2}\n')
    e.write("score_out.csv", "an earlier result\n")
    # BBQ data whose label is a string
    bbq = root / "data_str_label" / "bbq"
    bbq.mkdir(parents=True)
    for path in (DATA / "bbq").glob("*.jsonl"):
        shutil.copy(path, bbq / path.name)
    lines = (bbq / "Age.jsonl").read_text().splitlines()
    record = json.loads(lines[0])
    lines[0] = json.dumps({**record, "label": str(record["label"])})
    (bbq / "Age.jsonl").write_text("\n".join(lines) + "\n")
    # a run dir with a good metrics table, one whose table is malformed, and one without a table
    rows = (root / "eval_done" / "metrics.csv").read_text().splitlines()
    e.write("run_ok/eval/metrics.csv", "\n".join(["model,params,step," + rows[0]] + [f"m,1,0,{r}" for r in rows[1:]]))

    e.write("run_bad_metrics/eval/metrics.csv", "model,params,step,benchmark\nx,1,0\n")
    (root / "run_no_metrics").mkdir()
    return e


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    needle: str


SCORE_BBQ = ["score", "--benchmark", "bbq", "--predictions"]
WINO = ["--benchmarks", "winogender", "--conditions", "q", "--limit", "4", "--bootstrap", "10"]


def evaluate(model: str, out: str, *extra: str) -> list[str]:
    return ["evaluate", model, "--output", out, *WINO, *extra]


CPU_2PROC = "accelerate/cpu_2proc.yaml"
CASES = [
    # ---- evaluate ---------------------------------------------------------------------------------------------
    Case("evaluate: --output is a file", lambda e: evaluate(str(e.model), e("a_file.txt")), "is not a directory"),
    Case("evaluate: --output not writable", lambda e: evaluate(str(e.model), "/proc/selfcorrect-out"), "not writable"),
    Case("evaluate: --device cuda without CUDA", lambda e: evaluate(str(e.model), e("o1"), "--device", "cuda"), "CUDA"),
    Case("evaluate: unknown device", lambda e: evaluate(str(e.model), e("o1"), "--device", "tpu"), "unknown device"),
    Case("evaluate: negative seed", lambda e: evaluate(str(e.model), e("o1"), "--seed", "-1"), "seed"),
    Case("evaluate: --limit 0", lambda e: evaluate(str(e.model), e("o1"), "--limit", "0"), "--limit"),
    Case("evaluate: negative bootstrap", lambda e: evaluate(str(e.model), e("o1"), "--bootstrap", "-5"), "bootstrap"),
    Case("evaluate: --batch-size 0", lambda e: evaluate(str(e.model), e("o1"), "--batch-size", "0"), "--batch-size"),
    Case("evaluate: unknown benchmark", lambda e: evaluate(str(e.model), e("o1"), "--benchmarks", "wino"), "'wino'"),
    Case("evaluate: unknown condition", lambda e: evaluate(str(e.model), e("o1"), "--conditions", "q_iff"), "q_iff"),
    Case("evaluate: truncated safetensors", lambda e: evaluate(e("truncated"), e("o1")), "safetensors"),
    Case("evaluate: unknown model_type", lambda e: evaluate(e("unknown_type"), e("o1")), "unknown_type"),
    Case("evaluate: a mistyped local path", lambda e: evaluate("models/noweigths", e("o1")), "no such local"),
    Case("evaluate: a hub id offline", lambda e: evaluate("NoSuchOrg/no-such-model", e("o1")), "HF_HUB_OFFLINE=1"),
    Case(
        "evaluate: other settings in --output",
        lambda e: evaluate(str(e.model), e("eval_done"), "--limit", "5"),
        "other settings",
    ),
    Case("evaluate: another model in --output", lambda e: evaluate(e("recorded"), e("eval_done")), "other settings"),
    Case(
        "evaluate: template with {}",
        lambda e: evaluate(str(e.model), e("o1"), "--prompts", e("prompts/positional.yaml")),  # noqa: E501
        "positional.yaml",
    ),
    Case(
        "evaluate: template with {context.upper}",
        lambda e: evaluate(str(e.model), e("o1"), "--prompts", e("prompts/attribute.yaml")),
        "attribute.yaml",
    ),
    Case(
        "evaluate: template with an unbalanced brace",
        lambda e: evaluate(str(e.model), e("o1"), "--prompts", e("prompts/unbalanced.yaml")),
        "unbalanced.yaml",
    ),
    Case(
        "evaluate: missing prompt file",
        lambda e: evaluate(str(e.model), e("o1"), "--prompts", e("nope.yaml")),
        "file not found",
    ),
    Case(
        "evaluate: --system-prompt alone",
        lambda e: evaluate(str(e.model), e("o1"), "--system-prompt", "x"),
        "--dialogue chat_template",
    ),
    Case(
        "evaluate: --dialogue contradicting the checkpoint",
        lambda e: evaluate(e("recorded"), e("o1"), "--dialogue", "human_assistant"),
        "--override-dialogue",
    ),
    Case(
        "evaluate: missing data dir",
        lambda e: evaluate(str(e.model), e("o1"), "--data-dir", e("no-data")),
        "data directory not found",
    ),
    Case("evaluate: a model dir without --output", lambda e: ["evaluate", str(e.model)], "--output is required"),
    # ---- score ------------------------------------------------------------------------------------------------
    Case(
        "score: duplicate ids",
        lambda e: ["score", "--benchmark", "winogender", "--predictions", e("preds/duplicate.jsonl")],
        "duplicate.jsonl",
    ),  # noqa: E501
    Case("score: Infinity in probs", lambda e: [*SCORE_BBQ, e("preds/infinite.jsonl")], "infinite.jsonl"),
    Case("score: probs contradict prediction", lambda e: [*SCORE_BBQ, e("preds/contradict.jsonl")], "contradict.jsonl"),
    Case(
        "score: law school without a complete pair",
        lambda e: ["score", "--benchmark", "law_school", "--predictions", e("preds/unpaired.jsonl")],
        "unpaired.jsonl",
    ),  # noqa: E501
    Case(
        "score: negative bootstrap", lambda e: [*SCORE_BBQ, e("preds/good_bbq.jsonl"), "--bootstrap", "-5"], "bootstrap"
    ),
    Case("score: unknown item", lambda e: [*SCORE_BBQ, e("preds/unknown_item.jsonl")], "unknown BBQ item"),
    Case("score: malformed JSON", lambda e: [*SCORE_BBQ, e("preds/malformed.jsonl")], "line 2"),
    Case("score: missing predictions file", lambda e: [*SCORE_BBQ, e("preds/none.jsonl")], "file not found"),
    Case(
        "score: a BBQ label that is a string",
        lambda e: [*SCORE_BBQ, e("preds/good_bbq.jsonl"), "--data-dir", e("data_str_label")],
        "label",
    ),
    Case(
        "score: bad input keeps --output",
        lambda e: [*SCORE_BBQ, e("preds/infinite.jsonl"), "--output", e("score_out.csv")],
        "infinite.jsonl",
    ),
    # ---- prompts ----------------------------------------------------------------------------------------------
    Case(
        "prompts show: unknown item",
        lambda e: ["prompts", "show", "--benchmark", "bbq", "--condition", "q", "--item", "Age:999999"],
        "unknown bbq",
    ),  # noqa: E501
    Case(
        "prompts show: unknown condition",
        lambda e: ["prompts", "show", "--benchmark", "bbq", "--condition", "zz", "--item", "Age:0"],
        "'zz'",
    ),
    Case(
        "prompts list: a template with an unbalanced brace",
        lambda e: ["prompts", "list", "--prompts", e("prompts/unbalanced.yaml")],
        "unbalanced.yaml",
    ),
    # ---- report -----------------------------------------------------------------------------------------------
    Case("report: no metrics", lambda e: ["report", e("run_no_metrics")], "metrics.csv"),
    Case("report: malformed metrics", lambda e: ["report", e("run_bad_metrics")], "metrics.csv"),
    Case("report: --output is a file", lambda e: ["report", e("run_ok"), "--output", e("a_file.txt")], "a_file.txt"),
    # ---- pipeline ---------------------------------------------------------------------------------------------
    Case(
        "pipeline: unsorted save_at_steps",
        lambda e: ["pipeline", e.config("unsorted", ppo__save_at_steps=[2, 0]), "--dry-run"],
        "ppo.save_at_steps",
    ),
    Case(
        "pipeline: duplicated save_at_steps",
        lambda e: ["pipeline", e.config("dup", ppo__save_at_steps=[0, 0]), "--dry-run"],
        "listed twice",
    ),
    Case(
        "pipeline: negative save_at_steps",
        lambda e: ["pipeline", e.config("neg", ppo__save_at_steps=[-1]), "--dry-run"],
        "negative",
    ),
    Case(
        "pipeline: save_at_steps beyond the run",
        lambda e: ["pipeline", e.config("far", ppo__save_at_steps=[0, 9]), "--dry-run"],
        "beyond",
    ),
    Case(
        "pipeline: negative SFT learning rate",
        lambda e: ["pipeline", e.config("lr", sft__trainer={"learning_rate": -1e-5}), "--dry-run"],
        "learning_rate",
    ),
    Case(
        "pipeline: a launcher that does not exist",
        lambda e: ["pipeline", e.config("launcher", launcher="no-such-launcher --flag")],
        "no-such-launcher",
    ),
    Case(
        "pipeline: a launcher config file that does not exist",
        lambda e: ["pipeline", e.config("lcfg", launcher="accelerate launch --config_file nope.yaml"), "--dry-run"],
        "nope.yaml",
    ),
    Case(
        "pipeline: more evaluation processes than the launcher starts",
        lambda e: [
            "pipeline",
            e.config(
                "evalprocs",
                launcher=f"accelerate launch --config_file {CPU_2PROC}",
                evaluation={"benchmarks": ["winogender"], "num_processes": 3},
            ),
            "--dry-run",
        ],
        "evalprocs.yaml: evaluation.num_processes 3: the launcher starts 2 process(es)",
    ),
    Case(
        "pipeline: unwritable output_dir",
        lambda e: ["pipeline", e.config("ro", output_dir="/proc/selfcorrect-run"), "--dry-run"],
        "not writable",
    ),
    Case(
        "pipeline: a local data file that does not exist",
        lambda e: ["pipeline", e.config("data", sft__data={"path": e("no.jsonl"), "format": "hh"}), "--dry-run"],
        "sft.data",
    ),
    Case(
        "pipeline: unknown dialogue", lambda e: ["pipeline", e.config("dlg", dialogue="chatml"), "--dry-run"], "chatml"
    ),
    Case(
        "pipeline: warmup longer than the run",
        lambda e: ["pipeline", e.config("warm", ppo__warmup_iterations=5), "--dry-run"],
        "warmup_iterations",
    ),
    Case(
        "pipeline: EMA decay of 1.5",
        lambda e: ["pipeline", e.config("ema", ppo__ema_decay=1.5), "--dry-run"],
        "ema_decay",
    ),
    Case(
        "pipeline: value learning rate 0",
        lambda e: ["pipeline", e.config("vlr", ppo__value_learning_rate=0), "--dry-run"],
        "value_learning_rate",
    ),
    Case(
        "pipeline: a logits chunk of 0 positions",
        lambda e: ["pipeline", e.config("chunk0", ppo__logits_chunk_size=0), "--dry-run"],
        "ppo.logits_chunk_size",
    ),
    Case(
        "pipeline: a logits chunk that is not an integer",
        lambda e: ["pipeline", e.config("chunkf", ppo__logits_chunk_size=2.5), "--dry-run"],
        "ppo.logits_chunk_size",
    ),
    Case(
        "pipeline: a vLLM share of the GPU above 1",
        lambda e: [
            "pipeline",
            e.config("vgpu", ppo__engine="vllm", ppo__vllm={"gpu_memory_utilization": 1.5}),
            "--dry-run",
        ],
        "ppo.vllm.gpu_memory_utilization",
    ),
    Case(
        "pipeline: a vLLM share of the GPU of 0",
        lambda e: [
            "pipeline",
            e.config("vgpu0", evaluation={"engine": "vllm", "vllm": {"gpu_memory_utilization": 0}}),
            "--dry-run",
        ],
        "evaluation.vllm.gpu_memory_utilization",
    ),
    Case(
        "pipeline: vLLM sleep mode on a CPU engine",
        lambda e: ["pipeline", e.config("vsleep", ppo__engine="vllm", ppo__vllm={"sleep": True}), "--dry-run"],
        "ppo.vllm.sleep: true",
    ),
    Case(
        "pipeline: an evaluation device that does not exist",
        lambda e: [
            "pipeline",
            e.config("evdev", evaluation={"device": "cuda:3", "benchmarks": ["winogender"]}),
            "--dry-run",
        ],
        "evaluation.device cuda:3",
    ),
    Case(
        "pipeline: a trainer key PPO ignores",
        lambda e: ["pipeline", e.config("tr", ppo__trainer={"warmup_steps": 8}), "--dry-run"],
        "warmup_iterations",
    ),
    Case(
        "pipeline: unknown reward trainer key",
        lambda e: [
            "pipeline",
            e.config("rt", reward={"data": {"path": HH, "format": "hh"}, "trainer": {"lr": 1}}),
            "--dry-run",
        ],
        "reward.trainer",
    ),
    Case("pipeline: negative seed", lambda e: ["pipeline", e.config("seed", seed=-1), "--dry-run"], "seed"),
    Case(
        "pipeline: a function reward that does not import",
        lambda e: ["pipeline", e.config("fn", reward={"function": "no_such_module:f"}), "--dry-run"],
        "no_such_module",
    ),  # noqa: E501
    Case("pipeline: missing config", lambda e: ["pipeline", e("configs/none.yaml")], "file not found"),
    # ---- training stages --------------------------------------------------------------------------------------
    Case("sft: no sft section", lambda e: ["sft", e.config("nosft", sft=None)], "'sft' section"),
    Case(
        "reward: a function reward that does not import",
        lambda e: ["reward", e.config("rfn", reward={"function": "no_such_module:f"})],
        "no_such_module",
    ),
    Case("ppo: bad save_at_steps", lambda e: ["ppo", e.config("pss", ppo__save_at_steps=[3])], "ppo.save_at_steps"),
    Case("ppo: unknown key", lambda e: ["ppo", e.config("pkey", ppo__kl_coeff=0.1)], "kl_coeff"),
]


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_the_suite_covers_every_command():
    commands = {case.name.split(":")[0].split()[0] for case in CASES}
    assert {"evaluate", "score", "prompts", "report", "pipeline", "sft", "reward", "ppo"} <= commands
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_a_one_line_error_that_changes_nothing(case: Case, env: Env, capsys, monkeypatch):
    monkeypatch.syspath_prepend(env("rules"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    argv = case.argv(env)  # may write the case's own input file first
    before = snapshot(env.root)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("selfcorrect: error:") == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("selfcorrect: error: ") and case.needle in last, last
    assert snapshot(env.root) == before


def test_the_console_script_prints_no_traceback(env: Env):
    """The same through the real entry point, in a process of its own."""
    for argv in (evaluate(str(env.model), env("a_file.txt")), [*SCORE_BBQ, env("preds/infinite.jsonl")]):
        proc = subprocess.run([sys.executable, "-m", "selfcorrect", *argv], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("selfcorrect: error: ")
