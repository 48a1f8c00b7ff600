"""The config package (:mod:`selfcorrect.config`): a run config's schema loads without any deep-learning library, the
``trainer:`` checks still run on a full load, and the evaluation settings come from the ``evaluation`` section alone --
for the pipeline and for the ``evaluate`` and ``probe`` options alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import selfcorrect
from selfcorrect import commands
from selfcorrect.cli import build_parser
from selfcorrect.config import VLLMSection, configs_dir, data_dir
from selfcorrect.config.evaluation import PROBE_CONDITIONS, EvaluationSection
from selfcorrect.config.run import RunConfig, load_run_config
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError

DEEP_LEARNING = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "vllm", "deepspeed")
PIPELINES = sorted((configs_dir() / "pipelines").glob("*.yaml"))
LOAD = """
import sys
from selfcorrect.config.run import load_run_config

cfg = load_run_config(sys.argv[1], schema_only=True)
print(" ".join(name for name in ("sft", "reward", "ppo", "evaluation") if getattr(cfg, name) is not None))
print(" ".join(name for name in sys.argv[2:] if name in sys.modules))
"""


def test_the_shipped_pipelines_are_there():
    assert {p.name for p in PIPELINES} >= {"quickstart.yaml", "ganguli2023.yaml", "liu2024.yaml"}


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_loading_a_shipped_pipeline_into_its_sections_imports_no_deep_learning_library(path: Path):
    """In a fresh interpreter: the run config and every section it has, and none of torch, transformers, TRL..."""
    package_root = str(Path(selfcorrect.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD, str(path), *DEEP_LEARNING], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    sections, imported = proc.stdout.split("\n")[:2]
    keys = yaml.safe_load(path.read_text())
    assert sections.split() == [name for name in ("sft", "reward", "ppo", "evaluation") if name in keys]
    assert imported == "", f"{path.name}: loading the config imported {imported}"


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_a_full_load_checks_the_trainer_values_and_otherwise_equals_the_schema(path: Path):
    assert load_run_config(path) == load_run_config(path, schema_only=True)


def test_trainer_values_are_checked_on_a_full_load_only(tmp_path: Path):
    path = tmp_path / "run.yaml"
    hh = str(Path(os.environ["SELFCORRECT_DATA_DIR"]) / "hh-rlhf" / "harmless-base-test.jsonl.gz")
    sft = {"data": {"path": hh, "format": "hh"}, "trainer": {"learning_rat": 1.0e-5, "learning_rate": "1e-5"}}
    path.write_text(yaml.safe_dump({"name": "t", "sft": sft}))
    with pytest.raises(UserError, match=r"run\.yaml: sft\.trainer: learning_rat: unknown SFTConfig field$"):
        load_run_config(path)
    assert load_run_config(path, schema_only=True).sft.trainer == sft["trainer"]  # as written: unchecked
    del sft["trainer"]["learning_rat"]
    path.write_text(yaml.safe_dump({"name": "t", "sft": sft}))
    assert load_run_config(path).sft.trainer == {"learning_rate": 1e-5}  # YAML's string converted
    assert load_run_config(path, schema_only=True).sft.trainer == {"learning_rate": "1e-5"}


def test_eval_settings_carry_the_section_values_and_the_calls(tmp_path: Path):
    section = EvaluationSection(
        benchmarks=["winogender", "bbq"],
        conditions=["q", "q_if_cot"],
        limit=5,
        cot_limit=2,
        prompts=["quickstart_cot.yaml"],
        batch_size=3,
        gen_batch_size=7,
        bootstrap=9,
        engine="vllm",
        vllm={"max_num_seqs": 4},
        device="cpu",
    )
    dialogue = DialogueSpec(format="chat_template", system_prompt="Be fair.")
    settings = section.settings(
        tmp_path / "out",
        seed=4,
        dtype="bfloat16",
        trust_remote_code=True,
        dialogue=dialogue,
        model="a-model",
        data=os.environ["SELFCORRECT_DATA_DIR"],
        overwrite=True,
        scorer="reward",
    )
    assert (settings.benchmarks, settings.conditions) == (["winogender", "bbq"], ["q", "q_if_cot"])
    assert (settings.limit, settings.cot_limit, settings.batch_size, settings.gen_batch_size) == (5, 2, 3, 7)
    assert settings.n_boot == 9 and settings.engine == "vllm" and settings.vllm == VLLMSection(max_num_seqs=4)
    assert settings.device == "cpu"
    assert settings.prompt_files == [configs_dir() / "prompts" / "quickstart_cot.yaml"]  # the shipped file
    assert (settings.model, settings.output, settings.seed) == ("a-model", tmp_path / "out", 4)
    assert settings.dtype == "bfloat16"
    assert settings.trust_remote_code and settings.dialogue == dialogue and settings.data_dir == data_dir()
    assert settings.overwrite and not settings.override_dialogue and settings.scorer == "reward"
    assert not settings.skip_unfit


def test_the_evaluate_and_probe_defaults_are_the_sections(tmp_path: Path):
    seed = RunConfig.model_fields["seed"].default
    common = {"seed": seed, "dtype": None, "trust_remote_code": False, "dialogue": None, "model": "m"}
    args = build_parser().parse_args(["evaluate", "m", "--output", str(tmp_path)])
    assert commands.eval_settings(args, tmp_path, trust_remote_code=False) == EvaluationSection().settings(
        tmp_path, **common
    )
    args = build_parser().parse_args(["probe", "m", "--output", str(tmp_path)])
    expected = EvaluationSection(conditions=list(PROBE_CONDITIONS)).settings(tmp_path, **common, scorer="reward")
    assert commands.eval_settings(args, tmp_path, trust_remote_code=False, scorer="reward") == expected


def test_the_evaluate_options_become_the_settings(tmp_path: Path):
    options = "--benchmarks bbq --conditions q,q_if --limit 5 --cot-limit 2 --batch-size 3 --gen-batch-size 7 "
    options += "--engine vllm --seed 4 --bootstrap 9 --dtype bfloat16 --device cpu --prompts a.yaml"
    args = build_parser().parse_args(["evaluate", "m", "--output", str(tmp_path), *options.split()])
    settings = commands.eval_settings(args, tmp_path, trust_remote_code=True)
    keys = {"batch_size": 3, "gen_batch_size": 7, "engine": "vllm", "bootstrap": 9, "device": "cpu"}
    section = EvaluationSection(
        benchmarks=["bbq"], conditions=["q", "q_if"], limit=5, cot_limit=2, prompts=["a.yaml"], **keys
    )
    common = {"seed": 4, "dtype": "bfloat16", "trust_remote_code": True, "dialogue": None, "model": "m"}
    assert settings == section.settings(tmp_path, **common)
