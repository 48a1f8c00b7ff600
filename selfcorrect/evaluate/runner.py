"""Evaluate one model on benchmarks x conditions: cached, resumable, with a tidy metrics table.

Output layout (``--output DIR``)::

    DIR/evaluation.json             settings and prompt hashes; which (benchmark, condition) are complete
    DIR/<benchmark>/sample.json     the evaluated units (the --limit / --cot-limit subsample)
    DIR/<benchmark>/<condition>.jsonl   one line per item, appended batch by batch as it finishes
    DIR/metrics.csv                 benchmark,condition,subset,metric,value,ci_low,ci_high,n,note: every complete
                                    condition's rows, then the paired differences "<c>_minus_q" (evaluate.paired);
                                    note: why a value or CI is empty (evaluate.table)

A ``--limit`` or ``--cot-limit`` below a benchmark's number of strata leaves some out: a warning on stderr names
them. Each (benchmark, condition) group and each CoT sampling shows a progress bar on stderr where it is a terminal.

Evaluating a run (``selfcorrect evaluate RUN_DIR`` or the pipeline's evaluate stage,
:mod:`selfcorrect.evaluate.run_targets`) repeats this per target, i.e. per kept PPO checkpoint or per extra model
(``RUN_DIR/eval/models/<model>/``), and joins their tables into ``RUN_DIR/eval/metrics.csv`` with the
leading columns ``model,params,step,scorer`` (:mod:`selfcorrect.evaluate.table`); each checkpoint past step 0 also gets
the paired differences of its headline metrics from step 0's (``<m>_minus_step0``).

A rerun with the same settings skips every item already in a ``.jsonl`` file, and the batches are
planned from the whole item list, so a resumed run scores exactly the batches an uninterrupted run
would have, and gives the same metrics. ``metrics.csv`` is derived from the per-item files and written
(atomically) only for complete conditions.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from selfcorrect import dialogue as dialogues
from selfcorrect import engines
from selfcorrect import stop as stopping
from selfcorrect.config.evaluation import EvalSettings
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.engines import Engine
from selfcorrect.errors import UserError
from selfcorrect.evaluate import benchmarks as bench_registry
from selfcorrect.evaluate import table
from selfcorrect.evaluate.metrics import stable_seed, stratified_sample
from selfcorrect.evaluate.paired import Evaluation, minus_q_rows
from selfcorrect.evaluate.prompts import ItemPrompt, PromptSet, load_prompts, render
from selfcorrect.evaluate.shards import Shard
from selfcorrect.evaluate.table import MetricRow
from selfcorrect.io import append_jsonl, atomic_write_text, check_writable_dir, iter_jsonl
from selfcorrect.rundir import LOCK, EvalDir, part_file, part_files

COT_PROMPT_TOKENS = 1024  # the longest CoT prompt a vLLM engine's KV cache is sized for by default (vllm_options)


@dataclass
class Task:
    """One (benchmark, condition) to evaluate, on its sampled units."""

    benchmark: str
    condition: str
    units: list[dict]
    items: list[ItemPrompt]

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.condition}"

    @property
    def is_cot(self) -> bool:
        return bool(self.items) and self.items[0].is_cot


def _check_limit(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{flag} must be a positive number of items, got {value}")


def _select(units: list[dict], module, limit: int | None, seed: int, flag: str) -> list[dict]:
    """The seeded stratified subsample of ``limit`` units (all units without a limit). A limit below the number of
    strata leaves some out: a warning on stderr names them."""
    if limit is None:
        return units
    strata = [module.stratum(u) for u in units]
    keep = set(stratified_sample([u["id"] for u in units], strata, limit, seed))
    chosen = [u for u in units if u["id"] in keep]
    left_out = sorted(set(strata) - {module.stratum(u) for u in chosen})
    if left_out and Shard.from_env().main:  # every process draws the same: one says so
        print(
            f"warning: {module.NAME}: {flag} {limit} draws from {len(set(strata))} strata and leaves out "
            f"{len(left_out)} of them: {', '.join(left_out)}",
            file=sys.stderr,
        )
    return chosen


def plan(settings: EvalSettings, prompts: PromptSet) -> tuple[list[Task], dict[str, dict]]:
    """Load data, draw the subsamples and build every item prompt (before any model is loaded)."""
    _check_limit(settings.limit, "--limit")
    _check_limit(settings.cot_limit, "--cot-limit")
    modules = [bench_registry.get(b) for b in settings.benchmarks]
    for cond in settings.conditions:
        if not any(cond in prompts.conditions(b) for b in settings.benchmarks):
            known = sorted({c for b in settings.benchmarks for c in prompts.conditions(b)})
            raise UserError(
                f"unknown condition '{cond}' for benchmarks {','.join(settings.benchmarks)} (known: {', '.join(known)})"
            )
    tasks, samples = [], {}
    for name, module in zip(settings.benchmarks, modules):
        units = _select(module.load(settings.data_dir), module, settings.limit, settings.seed, "--limit")
        cot_units = _select(units, module, settings.cot_limit, settings.seed, "--cot-limit")
        samples[name] = {
            "limit": settings.limit,
            "cot_limit": settings.cot_limit,
            "seed": settings.seed,
            "ids": [u["id"] for u in units],
            "cot_ids": [u["id"] for u in cot_units],
        }
        for cond in settings.conditions:
            if cond not in prompts.conditions(name):
                continue
            is_cot = prompts.condition(name, cond).cot is not None
            chosen = cot_units if is_cot else units
            tasks.append(Task(name, cond, chosen, module.items(chosen, prompts, cond)))
    return tasks, samples


def _prompt_hash(prompts: PromptSet, benchmark: str, condition: str) -> str:
    spec = {
        "condition": prompts.condition(benchmark, condition).model_dump(),
        "readout": prompts.readout(benchmark),
        "candidates": prompts.candidates(benchmark),
        "join": prompts.join,
        "cot_sampling": prompts.cot_sampling.model_dump(),
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _identity(settings: EvalSettings) -> dict:
    """The settings that must match for a rerun to reuse the per-item files (the model by path and by content)."""
    from selfcorrect.evaluate.reward_probe import reward_fingerprint
    from selfcorrect.models import fingerprint

    model = settings.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {
        "model": model,
        "scorer": settings.scorer,
        "model_fingerprint": (reward_fingerprint if settings.scorer == "reward" else fingerprint)(settings.model),
        "dialogue": settings.dialogue.record() if settings.dialogue else None,
        "limit": settings.limit,
        "cot_limit": settings.cot_limit,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "data_dir": str(settings.data_dir.resolve()) if settings.data_dir else None,
        "engine": settings.engine,
    }


# Identity keys added later, with the value every output dir written before them was made with.
RECORDED_BEFORE = {"engine": "hf", "scorer": "policy"}


def _check_output(settings: EvalSettings, prompts: PromptSet, tasks: list[Task]) -> dict:
    """The manifest to continue from (read-only): refuses an output dir written with other settings."""
    out = settings.output
    manifest_path = EvalDir(out).identity
    identity = _identity(settings)
    hashes = {t.key: _prompt_hash(prompts, t.benchmark, t.condition) for t in tasks}
    fresh = {"settings": identity, "prompts": hashes, "complete": []}
    if manifest_path.exists() and not settings.overwrite:
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{manifest_path}: malformed JSON; use another --output or --overwrite") from None
        recorded = {**RECORDED_BEFORE, **manifest.get("settings", {})}
        same_model = recorded.get("model_fingerprint") == identity["model_fingerprint"]  # e.g. a moved run dir
        changed = [k for k, v in identity.items() if recorded.get(k) != v and not (k == "model" and same_model)]
        changed += [k for k, h in hashes.items() if manifest.get("prompts", {}).get(k, h) != h]
        if changed:
            raise UserError(
                f"{manifest_path}: the output dir holds results made with other settings "
                f"({', '.join(changed)}); use another --output or --overwrite"
            )
        for task in tasks:  # a result file that evaluation.json does not account for is never adopted
            path = EvalDir(out).results(task.benchmark, task.condition)
            if path.exists() and task.key not in manifest.get("prompts", {}):
                raise UserError(f"{path}: not recorded in {manifest_path}; use another --output or --overwrite")
        manifest["prompts"].update(hashes)
        return manifest
    if not manifest_path.exists() and out.exists() and any(p.name != LOCK for p in out.iterdir()):  # its lock: ours
        raise UserError(f"{out}: not empty and not a selfcorrect evaluation output; use another --output")
    return fresh


def result_files(out: Path) -> list[Path]:
    """Every file an evaluation has written under its output dir, but evaluation.json: per-item files, samples and
    the metrics table."""
    layout = EvalDir(out)
    files = [layout.metrics]
    for name in bench_registry.BENCHMARK_NAMES:
        files += [*layout.result_files(name), layout.sample(name)]
    return [f for f in files if f.is_file()]


def _write_manifest(settings: EvalSettings, manifest: dict, tasks: list[Task], samples: dict[str, dict]) -> None:
    """Write evaluation.json and the samples (with --overwrite, after discarding every earlier result)."""
    if settings.overwrite:  # all of them: a file of another model or setting must never be adopted later
        for path in result_files(settings.output):
            path.unlink()
    for name, sample in samples.items():
        atomic_write_text(EvalDir(settings.output).sample(name), json.dumps(sample) + "\n")
    atomic_write_text(EvalDir(settings.output).identity, json.dumps(manifest, indent=2) + "\n")


def _holds_every_item(task: Task, output: Path) -> bool:
    return _done_ids(EvalDir(output).results(task.benchmark, task.condition)) >= {it.item_id for it in task.items}


def _done_ids(path: Path) -> set[str]:
    """The items done in a results file and in the part files beside it (:mod:`selfcorrect.evaluate.shards`)."""
    return {
        obj["id"]
        for part in [path, *part_files(path)]
        if part.exists()
        for _, obj in iter_jsonl(part, tolerate_torn_tail=True)
        if "id" in obj
    }


def _fold_parts(path: Path, order: list[str]) -> None:
    """Fold the part files beside a results file into it (atomically, in the plan's item order), then remove them."""
    parts = part_files(path)
    if not parts:
        return
    records: dict[str | None, dict] = {}
    for source in [path, *parts]:
        if source.exists():
            for _, obj in iter_jsonl(source, tolerate_torn_tail=True):
                records.setdefault(obj.get("id"), obj)
    rank: dict[str | None, int] = {item_id: i for i, item_id in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: (rank.get(r.get("id"), len(rank)), str(r.get("id"))))
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    for part in parts:
        part.unlink()


def _groups(tasks: list[Task]) -> list[list[Task]]:
    """Tasks in the order they run: a benchmark's Q-type conditions together (their prompts share the whole
    question, which the scorer then runs once), each CoT condition alone."""
    groups: dict[str, list[Task]] = {}
    for task in tasks:
        groups.setdefault(task.key if task.is_cot else task.benchmark, []).append(task)
    return list(groups.values())


def _run_group(
    tasks: list[Task], scorer, engine: Engine, settings: EvalSettings, prompts: PromptSet, tokenizer, shard: Shard
) -> None:
    """Score every item of ``tasks`` (one CoT task, or Q-type tasks of one benchmark) that is not in its per-item
    file yet, batch by batch; ``engine`` samples the reasoning of a CoT task from the token ids of its first-stage
    prompts (``scorer.encode``). In a launch of several processes, this process's share of the batches, into its
    part files."""
    from selfcorrect.evaluate.scoring import length_batches

    assert settings.dialogue is not None  # evaluate() resolved it
    results = [EvalDir(settings.output).results(t.benchmark, t.condition) for t in tasks]
    done = [_done_ids(p) for p in results]
    paths = results if shard.world == 1 else [part_file(p, shard.rank) for p in results]
    entries = [(k, it) for k, t in enumerate(tasks) for it in t.items]  # (task index, item) across the group
    is_cot = tasks[0].is_cot
    first_stage = [
        render(it.cot_turns() if is_cot else it.scored_turns(), settings.dialogue, tokenizer) for _, it in entries
    ]
    first_ids = [scorer.encode(t) for t in first_stage]
    if is_cot:  # decoding reads every weight once per step whatever the batch: larger batches, by length
        batches = length_batches([len(s) for s in first_ids], settings.gen_batch_size, scorer.max_batch_tokens)
    else:  # prompts that begin alike together: the scorer runs their shared prefixes once
        batches = scorer.batches(first_ids, settings.batch_size)
    extra = prompts.cot_sampling.max_new_tokens if is_cot else 0  # the token work of a batch: prompts (+ reasoning)
    mine = shard.take([sum(len(first_ids[i]) + extra for i in batch) for batch in batches])
    batches = [batch for b, batch in enumerate(batches) if b in mine]
    entries_mine = sorted({i for batch in batches for i in batch})
    todo = sum(entries[i][1].item_id not in done[entries[i][0]] for i in entries_mine)
    already = len(entries_mine) - todo
    start = time.perf_counter()
    cot = prompts.cot_sampling
    stop = list(cot.stop) + ([tokenizer.eos_token] if settings.dialogue.format == "chat_template" else [])
    label = f"{tasks[0].benchmark}/{'+'.join(t.condition for t in tasks)}"
    desc = f"{tasks[0].benchmark} {', '.join(t.condition for t in tasks)}"  # e.g. "bbq q, q_if", "bbq q_if_cot"
    desc = desc if shard.world == 1 else f"{desc} [process {shard.rank}/{shard.world}]"
    with engines.progress_bar(len(entries_mine), desc, initial=already) as bar:
        for batch in batches:
            batch = [i for i in batch if entries[i][1].item_id not in done[entries[i][0]]]
            if not batch:
                continue
            items = [entries[i][1] for i in batch]
            records: list[dict[str, Any]] = [{"id": it.item_id} for it in items]
            texts = [first_stage[i] for i in batch]
            if is_cot:
                key = tasks[0].key
                seeds = [stable_seed(settings.seed, key, r["id"]) for r in records]
                reasoning = engine.generate(
                    [first_ids[i] for i in batch],
                    seeds,
                    max_new_tokens=cot.max_new_tokens,
                    temperature=cot.temperature,
                    top_p=cot.top_p,
                    stop=stop,
                    desc=f"{desc} reasoning",
                )
                texts = [render(it.scored_turns(r), settings.dialogue, tokenizer) for it, r in zip(items, reasoning)]
                for rec, text, seed in zip(records, reasoning, seeds):
                    rec.update(reasoning=text, seed=seed)
            ids = None if is_cot else [first_ids[i] for i in batch]  # a CoT prompt gains its reasoning
            scores = scorer.score_items(items, texts, batch_size=settings.batch_size, token_ids=ids)
            for rec, it, s in zip(records, items, scores):
                rec.update(
                    probs=s.probs,
                    mass=s.mass,
                    prediction=max(range(len(s.probs)), key=s.probs.__getitem__),
                    candidates=list(it.candidates),
                )
                if s.rewards is not None:  # a reward model's preferences: its raw rewards too
                    rec["rewards"] = s.rewards
            with stopping.deferred():  # a stop signal during the write takes effect after it: a written line stays
                for k, path in enumerate(paths):
                    lines = [rec for i, rec in zip(batch, records) if entries[i][0] == k]
                    if lines:
                        append_jsonl(path, lines)
            stopping.after_deferred()
            bar.update(len(batch))
    elapsed = time.perf_counter() - start
    if todo:
        where = "" if shard.world == 1 else f" (process {shard.rank} of {shard.world})"
        print(f"{label}: {todo} items in {elapsed:.1f} s ({todo / elapsed:.2f} items/s){where}", file=sys.stderr)
    shard.barrier()  # every process has ended the group: process 0 folds their part files in
    if shard.main:
        for task, path in zip(tasks, results):
            _fold_parts(path, [it.item_id for it in task.items])


def read_results(path: Path, wanted: set[str]) -> dict[str, dict]:
    """Per-item predictions of the wanted ids from a per-item results file."""
    preds = {}
    for _, obj in iter_jsonl(path, tolerate_torn_tail=True):
        if obj.get("id") in wanted:
            preds[obj["id"]] = {"probs": obj["probs"], "mass": obj.get("mass")}
    return preds


def resolve_dialogue(settings: EvalSettings) -> tuple[DialogueSpec, dict]:
    """The dialogue format to evaluate in, and how it was chosen (for ``evaluation.json``).

    A model trained by selfcorrect is scored in the format its manifest records; ``settings.dialogue`` may only
    repeat it, unless ``override_dialogue`` (then the override is recorded and printed). Any other model is scored
    in ``settings.dialogue``, default ``human_assistant``.
    """
    trained_in = dialogues.recorded(settings.model) if Path(settings.model).expanduser().is_dir() else None
    asked = settings.dialogue
    if trained_in is None:
        return asked or DialogueSpec(), {"source": "given" if asked else "default"}
    if asked is None or asked == trained_in:
        return trained_in, {"source": "recorded"}
    if not settings.override_dialogue:
        raise UserError(
            f"{settings.model}: trained in dialogue {trained_in.describe()}; --dialogue {asked.describe()} "
            "contradicts it (add --override-dialogue to evaluate in it anyway)"
        )
    print(
        f"note: {settings.model} was trained in dialogue {trained_in.describe()}; evaluating in "
        f"{asked.describe()} as asked (--override-dialogue)",
        file=sys.stderr,
    )
    return asked, {"source": "override", "recorded": trained_in.record()}


def evaluate(settings: EvalSettings) -> Path:
    """Run the evaluation and return the path of ``metrics.csv``."""
    from selfcorrect.evaluate.scoring import Scorer
    from selfcorrect.models import check_device, load_model

    shard = Shard.from_env()  # under accelerate launch / torchrun: this process's share (evaluate.shards)
    settings = replace(settings, device=shard.device(settings.device))
    check_device(settings.device)  # before anything is read or loaded: cheap checks first
    engines.check_engine(settings.engine)
    check_writable_dir(settings.output, "--output")
    if settings.seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {settings.seed}")
    spec, how = resolve_dialogue(settings)
    settings = replace(settings, dialogue=spec)
    prompts = load_prompts(settings.prompt_files)
    if settings.scorer == "reward":
        _check_probe(settings, prompts)
    tasks, samples = plan(settings, prompts)
    manifest = _check_output(settings, prompts, tasks)
    manifest["dialogue"] = {**spec.record(), **how}
    manifest["engine"] = engines.engine_record(settings.engine)
    pending = [t for t in tasks if t.key not in manifest["complete"] or not _holds_every_item(t, settings.output)]
    for task in pending:
        if task.key in manifest["complete"]:  # e.g. a torn last line: finish the missing items, never a smaller n
            if shard.main:
                print(f"note: {task.key} is marked complete but its file lacks items; finishing it", file=sys.stderr)
            manifest["complete"].remove(task.key)
    if pending and settings.scorer == "reward":
        scorer, tokenizer, n_parameters = _reward_scorer(settings)
        manifest["model_info"] = {"n_parameters": n_parameters}
        engine: Engine = scorer
        unfit = _unfit(settings, scorer, pending, shard)
        tasks, pending = [t for t in tasks if t.key not in unfit], [t for t in pending if t.key not in unfit]
    elif pending:
        model, tokenizer = load_model(
            settings.model, dtype=settings.dtype, device=settings.device, trust_remote_code=settings.trust_remote_code
        )
        manifest["model_info"] = {"n_parameters": sum(p.numel() for p in model.parameters())}
        scorer = Scorer(model, tokenizer, add_special_tokens=dialogues.add_special_tokens(spec))
        for task in pending:  # colliding candidates fail here, before anything is written
            for item in {it.candidates: it for it in task.items}.values():
                scorer.candidate_ids(item.assistant, item.candidates)
        engine = scorer
        if settings.engine == "vllm" and any(t.is_cot for t in pending):
            shard.connect()  # every process builds its engine now, each on its own device
            engine = engines.vllm_engine(model, tokenizer, _vllm_options(settings, prompts, model))
    shard.barrier()  # every process has read the output dir before process 0 writes it
    if shard.main:
        _write_manifest(settings, manifest, tasks, samples)
        for task in tasks:  # the part files a killed launch left (counted as done above): into the results files
            results = EvalDir(settings.output).results(task.benchmark, task.condition)
            _fold_parts(results, [it.item_id for it in task.items])
    shard.barrier()
    if pending:
        for group in _groups(pending):
            _run_group(group, scorer, engine, settings, prompts, tokenizer, shard)
            manifest["complete"] = sorted({*manifest["complete"], *(t.key for t in group)})
            if shard.main:
                atomic_write_text(EvalDir(settings.output).identity, json.dumps(manifest, indent=2) + "\n")
    if not shard.main:
        return EvalDir(settings.output).metrics
    return write_all_metrics(settings, manifest)


def _check_probe(settings: EvalSettings, prompts: PromptSet) -> None:
    """What a reward-model probe cannot do, as one-line errors: a CoT condition (its reasoning would be a policy's),
    and a chat-template dialogue for a function reward (which reads HH-format text)."""
    for benchmark in settings.benchmarks:
        for condition in settings.conditions:
            if condition in prompts.conditions(benchmark) and prompts.condition(benchmark, condition).cot is not None:
                raise UserError(
                    f"--conditions {condition}: a CoT condition; a reward model scores finished replies, and the "
                    "reasoning would be a policy's (probe the Q-type conditions, e.g. q,q_if)"
                )
    is_function = not Path(settings.model).expanduser().is_dir()
    if is_function and settings.dialogue is not None and settings.dialogue.format == "chat_template":
        raise UserError(
            f"{settings.model}: a function reward reads HH-format text; --dialogue chat_template needs a "
            "reward model with a tokenizer"
        )


def _unfit(settings: EvalSettings, scorer: Any, pending: list[Task], shard: Shard) -> set[str]:
    """The conditions a probe leaves out because some of their exchanges are longer than the reward model's
    ``max_length``: a one-line error, or with ``skip_unfit`` (the pipeline's probe) a note for each."""
    unfit = {t.key: (scorer.too_long(t.items), len(t.items)) for t in pending}
    unfit = {key: counts for key, counts in unfit.items() if counts[0]}
    for key, (n, total) in unfit.items():
        why = (
            f"{key}: {n} of {total} exchanges are longer than the reward model's max_length "
            f"{scorer.reward.max_length} (reward training drops such examples, so it never saw one)"
        )
        if not settings.skip_unfit:
            raise UserError(f"{settings.model}: {why}; leave the benchmark out (--benchmarks) or train the reward "
                            "model with a larger reward.max_length")  # fmt: skip
        if shard.main:
            print(f"note: reward model probe: {why}; left out", file=sys.stderr)
    return set(unfit)


def _reward_scorer(settings: EvalSettings) -> tuple[Any, Any, int]:
    """The reward-model probe's scorer (:mod:`selfcorrect.evaluate.reward_probe`), the reward model's tokenizer (None
    for a function reward) and its parameter count (0 for a function)."""
    from selfcorrect.evaluate.reward_probe import RewardScorer
    from selfcorrect.reward_models.score import RewardModel

    reward = RewardModel.load(settings.model, device=settings.device, dtype=settings.dtype)
    n_parameters = sum(p.numel() for p in reward.model.parameters()) if reward.model is not None else 0
    return RewardScorer(reward, settings.dialogue or DialogueSpec()), reward.tokenizer, n_parameters


def _vllm_options(settings: EvalSettings, prompts: PromptSet, model: Any) -> engines.VLLMOptions:
    """The CoT engine's options (:func:`selfcorrect.memory.vllm_options`): ``gen_batch_size`` sequences of up to
    ``COT_PROMPT_TOKENS`` prompt tokens plus the reasoning, beside the scorer, in the model's dtype."""
    import torch

    from selfcorrect.memory import vllm_options

    device = next(model.parameters()).device
    return vllm_options(
        settings.vllm,
        model,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        sequences=settings.gen_batch_size,
        tokens=COT_PROMPT_TOKENS + prompts.cot_sampling.max_new_tokens,
        training=False,
        device_bytes=torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None,
    )


def read_evaluation(settings: EvalSettings, prompts: PromptSet, output: Path, key: str) -> Evaluation:
    """The evaluated units of a complete ``benchmark/condition`` in an output dir and their predictions."""
    benchmark, condition = key.split("/")
    module = bench_registry.get(benchmark)
    by_id = {u["id"]: u for u in module.load(settings.data_dir)}
    sample = json.loads(EvalDir(output).sample(benchmark).read_text())
    is_cot = prompts.condition(benchmark, condition).cot is not None
    chosen = [by_id[i] for i in sample["cot_ids" if is_cot else "ids"]]
    item_ids = {it.item_id for it in module.items(chosen, prompts, condition)}
    return chosen, read_results(EvalDir(output).results(benchmark, condition), item_ids)


def is_defined(prompts: PromptSet, key: str) -> bool:
    """Whether the loaded prompt files define the condition of a ``benchmark/condition`` key."""
    benchmark, condition = key.split("/")
    return condition in prompts.conditions(benchmark)


def write_all_metrics(settings: EvalSettings, manifest: dict) -> Path:
    """metrics.csv over every complete (benchmark, condition) of the output dir, then the ``<c>_minus_q`` rows."""
    prompts = load_prompts(settings.prompt_files)
    rows: list[MetricRow] = []
    evaluations: dict[str, dict[str, Evaluation]] = {}
    keys = []
    for key in manifest["complete"]:
        if is_defined(prompts, key):
            keys.append(key)
        else:
            print(f"note: {key} is complete but not defined by the loaded prompt files; left out", file=sys.stderr)
    benchmarks = {key.split("/")[0] for key in keys}
    with engines.progress_bar(len(keys) + len(benchmarks), "metrics", unit="table", leave=False) as bar:
        for key in keys:  # the bootstrap over a whole benchmark takes seconds per condition
            benchmark, condition = key.split("/")
            evaluation = read_evaluation(settings, prompts, settings.output, key)
            evaluations.setdefault(benchmark, {})[condition] = evaluation
            module = bench_registry.get(benchmark)
            rows += module.metrics(*evaluation, condition, n_boot=settings.n_boot, seed=settings.seed)
            bar.update()
        for benchmark, by_condition in evaluations.items():
            rows += minus_q_rows(benchmark, by_condition, n_boot=settings.n_boot, seed=settings.seed)
            bar.update()
    return table.write(EvalDir(settings.output).metrics, rows)


def summary(metrics_path: Path) -> str:
    """A short human-readable table of the headline metrics in a metrics.csv (with the ``<c>_minus_q`` rows).

    An empty value or CI reads ``n/a``, and a row with a note (why it is empty) ends with the note in parentheses.
    """

    headline = {m for b in bench_registry.BENCHMARK_NAMES for m in bench_registry.get(b).HEADLINE_METRICS}
    headline.add("candidate_mass")
    rows = [r for r in table.read(metrics_path) if r["subset"] == "all" and r["metric"] in headline]
    by_step = bool(rows) and "step" in rows[0]  # a run's table: one block of lines per checkpoint
    width = max([12, *(len(r["condition"]) for r in rows)])
    header = f"{'benchmark':<11} {'condition':<{width}} {'metric':<20} {'value':>8}  95% CI            n"
    lines = [("step  " if by_step else "") + header]
    for r in rows:
        value = f"{float(r['value']):>+8.3f}" if r["value"] else f"{'n/a':>8}"
        ci = f"[{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}]" if r["ci_low"] else "[n/a]"
        note = r.get("note") or ""
        lines.append(
            (f"{r['step']:>4}  " if by_step else "")
            + f"{r['benchmark']:<11} {r['condition']:<{width}} {r['metric']:<20} {value}  {ci:<17} {r['n']}"
            + (f"  ({note})" if note else "")
        )
    return "\n".join(lines)


def print_summary(metrics_path: Path) -> None:
    """Print the summary table and where the full table is."""
    print(summary(metrics_path))
    print(f"\nmetrics: {metrics_path}", file=sys.stderr)
