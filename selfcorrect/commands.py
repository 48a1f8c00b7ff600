"""What each ``selfcorrect`` command does, given its parsed arguments (:mod:`selfcorrect.cli` parses them): one
``cmd_*`` function per command, returning the exit code. Everything heavy is imported inside the command that needs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from selfcorrect.config.evaluation import EvalSettings, EvaluationSection
from selfcorrect.errors import EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_WRITE_FAILED, UserError
from selfcorrect.evaluate.benchmarks import BENCHMARK_NAMES
from selfcorrect.rundir import RunDir


def _dialogue(args: argparse.Namespace):
    """The --dialogue/--system-prompt flags as a DialogueSpec, or None when neither was given."""
    from selfcorrect.dialogue import parse

    if args.dialogue is None and args.system_prompt is None:
        return None
    if args.dialogue is None:
        raise UserError("--system-prompt needs --dialogue chat_template")
    return parse({"format": args.dialogue, "system_prompt": args.system_prompt}, "--dialogue")


def _check_seed_and_bootstrap(args: argparse.Namespace) -> None:
    """--seed and --bootstrap must not be negative (0 resamples: no confidence intervals)."""
    for flag in ("seed", "bootstrap"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be 0 or more, got {getattr(args, flag)}")


ONLY_EVALUATE = ("cot_limit", "gen_batch_size", "engine")  # section keys with an option in evaluate, not in probe


def eval_settings(args: argparse.Namespace, output: Path, **extra: Any) -> EvalSettings:
    """The settings of ``evaluate`` or ``probe``: the evaluation section that their options give, its
    :meth:`~EvaluationSection.settings` with the options that are no key of it, then ``extra`` (``trust_remote_code``,
    ``scorer``). A key without an option (probe's ``engine``...) keeps the section's default. The section is not
    validated: the runner checks the values, with messages that name the options (``--limit must be ...``)."""
    from selfcorrect.config import data_dir

    section = EvaluationSection.model_construct(
        benchmarks=args.benchmarks,
        conditions=args.conditions,
        limit=args.limit,
        prompts=[str(p) for p in args.prompts],
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        device=args.device,
        **{key: getattr(args, key) for key in ONLY_EVALUATE if key in args},
    )
    directory = data_dir(args.data_dir)
    return section.settings(
        output,
        seed=args.seed,
        dtype=args.dtype,
        dialogue=_dialogue(args),
        model=args.model,
        data=directory,
        override_dialogue=args.override_dialogue,
        overwrite=args.overwrite,
        **extra,
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from selfcorrect import dirlock
    from selfcorrect.evaluate.runner import evaluate, print_summary
    from selfcorrect.evaluate.shards import Shard

    _check_seed_and_bootstrap(args)
    for flag in ("batch_size", "gen_batch_size"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    run_dir = Path(args.model)
    is_run = RunDir.is_run(run_dir)
    if args.output is None and not is_run:
        raise UserError("--output is required when evaluating a MODEL (it is optional for a RUN_DIR)")
    settings = eval_settings(args, args.output or RunDir(run_dir).eval, trust_remote_code=args.trust_remote_code)
    with dirlock.hold(settings.output, wait=args.wait_for_lock, what="--output"):  # one writer per output dir
        if is_run:
            from selfcorrect.evaluate.run_targets import evaluate_run

            metrics = evaluate_run(settings, run_dir)
        else:
            metrics = evaluate(settings)
    if Shard.from_env().main:  # under accelerate launch, process 0 wrote the table and prints it
        print_summary(metrics)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from selfcorrect import dirlock
    from selfcorrect.evaluate.runner import evaluate, print_summary

    _check_seed_and_bootstrap(args)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.output is None:
        raise UserError("--output is required")
    settings = eval_settings(args, args.output, trust_remote_code=False, scorer="reward")
    with dirlock.hold(settings.output, wait=args.wait_for_lock, what="--output"):
        metrics = evaluate(settings)
    print_summary(metrics)
    return 0


def _find_item(module, units: list[dict], prompts, condition: str, item: str):
    by_id = {u["id"]: u for u in units}
    unit_id = module.unit_of(item)
    if unit_id not in by_id:
        raise UserError(f"unknown {module.NAME} item '{item}'")
    for it in module.items([by_id[unit_id]], prompts, condition):
        if it.item_id == item:
            return it
    raise UserError(f"unknown {module.NAME} item '{item}'")


def cmd_prompts_show(args: argparse.Namespace) -> int:
    from selfcorrect.config import data_dir
    from selfcorrect.dialogue import DialogueSpec
    from selfcorrect.evaluate import benchmarks
    from selfcorrect.evaluate.prompts import load_prompts, render

    prompts = load_prompts(args.prompts)
    prompts.condition(args.benchmark, args.condition)
    module = benchmarks.get(args.benchmark)
    item = _find_item(module, module.load(data_dir(args.data_dir)), prompts, args.condition, args.item)
    spec = _dialogue(args) or DialogueSpec()
    tokenizer = None
    if spec.format == "chat_template":
        from selfcorrect.models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    if item.is_cot and args.reasoning is None:
        turns = item.cot_turns()
    else:
        turns = item.scored_turns(args.reasoning)
    text = render(turns, spec, tokenizer)
    sys.stdout.write(json.dumps(text) + "\n" if args.json else text)
    return 0


def cmd_prompts_list(args: argparse.Namespace) -> int:
    from selfcorrect.evaluate.prompts import load_prompts

    prompts = load_prompts(args.prompts)
    for bench in BENCHMARK_NAMES:
        for name in prompts.conditions(bench):
            cond = prompts.condition(bench, name)
            note = " [provisional]" if cond.provisional else ""
            print(f"{bench:<11} {name:<12} {cond.description}{note}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from selfcorrect.config import data_dir
    from selfcorrect.evaluate import benchmarks
    from selfcorrect.evaluate.table import METRIC_COLUMNS, to_csv
    from selfcorrect.io import atomic_write_text

    _check_seed_and_bootstrap(args)
    module = benchmarks.get(args.benchmark)
    units = module.load(data_dir(args.data_dir))
    preds = module.read_predictions(args.predictions, units)
    rows = module.metrics(units, preds, args.condition, n_boot=args.bootstrap, seed=args.seed)
    if not rows:
        raise UserError(f"{args.predictions}: no metrics: no {args.benchmark} unit is fully predicted")
    if args.format == "json":
        nan_to_none = lambda v: None if isinstance(v, float) and v != v else v  # noqa: E731
        text = json.dumps([{c: nan_to_none(getattr(r, c)) for c in METRIC_COLUMNS} for r in rows], indent=2) + "\n"
    else:
        text = to_csv(rows)
    if args.output:
        atomic_write_text(args.output, text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfcorrect.evaluate.report import report

    path = report(args.run_dirs, by=args.by, output=args.output)
    print(f"report: {path}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from importlib import import_module

    from selfcorrect import dirlock, tracking
    from selfcorrect.config.run import load_run_config
    from selfcorrect.evaluate.shards import Shard

    cfg = load_run_config(args.config)
    recipe = import_module(f"selfcorrect.recipes.{args.stage}")
    options = {"force": args.force} if args.stage == "sft" else {}
    with dirlock.hold(cfg.root(), wait=args.wait_for_lock, what="output_dir"):  # one writer per run directory
        try:
            out = recipe.run(cfg, args.config, **options)
        finally:
            tracking.finish(cfg.tracking)
    if Shard.from_env().main:  # under a launch of several processes, process 0 says it
        print(f"{args.stage}: {out}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from selfcorrect import dirlock
    from selfcorrect.config.run import load_run_config
    from selfcorrect.errors import StageFailed
    from selfcorrect.pipeline.run import run_pipeline

    # one writer per run directory, from before the plan reads pipeline.json (a dry run writes nothing: no lock); the
    # stages' child processes inherit it, and the evaluation stage's lock on eval/ waits as this one does
    lock = (
        nullcontext()
        if args.dry_run
        else dirlock.hold(load_run_config(args.config).root(), wait=args.wait_for_lock, what="output_dir")
    )
    try:
        with lock:
            run_pipeline(
                args.config,
                from_stage=args.from_stage,
                only=args.only,
                force=args.force,
                dry_run=args.dry_run,
                launcher=args.launcher,
                device_memory=args.device_memory,
            )
    except StageFailed as exc:
        print(f"selfcorrect: {'stopped' if exc.returncode == EXIT_STOPPED else 'error'}: {exc}", file=sys.stderr)
        # 2: the stage refused its input; 74: a write failed; 75: it stopped on a signal; else its own failure
        return exc.returncode if exc.returncode in (EXIT_BAD_INPUT, EXIT_WRITE_FAILED, EXIT_STOPPED) else 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfcorrect.export import export_checkpoint

    print(f"export: {export_checkpoint(args.checkpoint, args.out, dtype=args.dtype)}")
    return 0


def cmd_configs_list(args: argparse.Namespace) -> int:
    from selfcorrect.config import configs_dir, shipped_configs

    for kind, names in shipped_configs().items():
        print(f"{kind} ({configs_dir() / kind}):")
        for name in names:
            print(f"  {name}")
    return 0


def cmd_configs_copy(args: argparse.Namespace) -> int:
    from selfcorrect.config import configs_dir, shipped_file
    from selfcorrect.io import atomic_write_bytes

    source = shipped_file(args.name, "pipelines")
    if source is None or configs_dir() not in source.parents:
        raise UserError(f"{args.name}: not a shipped config (selfcorrect configs list shows them)")
    target = args.dest / source.name
    if target.exists() and not args.force:
        raise UserError(f"{target}: already exists (--force overwrites it)")
    atomic_write_bytes(target, source.read_bytes())
    print(f"configs: {target}")
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from selfcorrect.models import prepare_embedded

    path = prepare_embedded(force=args.force)
    print(path)
    return 0
