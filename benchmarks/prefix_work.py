"""Work per item of selfcorrect's scoring against the one-pass-per-item limit, on the full benchmarks.

For each benchmark and Q-type condition it tokenizes every item's scored prompt (the embedded model's tokenizer,
the shipped prompts, the chat-template dialogue) and counts the tokens the model is run on:

* **one pass per item** -- the sum of the prompt lengths: what any scorer that runs each prompt once pays
  (lm-eval pays this once per answer option);
* **left-padded batches** -- selfcorrect before prefix sharing: batches by length, each padded to its longest;
* **shared prefixes** -- selfcorrect now (``prefix_batches`` and ``Scorer._last_logprobs``): per batch, the
  tokens every prompt begins with once, then each prompt's own tokens padded to the longest.

It needs no model and takes about a minute for the full BBQ. It asserts nothing and prints what it found::

    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/prefix_work.py
    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/prefix_work.py --limit 200 --batch-size 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selfcorrect.config import data_dir
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.evaluate import benchmarks as registry
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.runner import EvalSettings, plan
from selfcorrect.evaluate.scoring import forwarded_tokens, length_batches, prefix_batches
from selfcorrect.models import EMBEDDED_DEFAULT, load_tokenizer


def padded_tokens(seqs: list[list[int]], batches: list[list[int]]) -> int:
    """Tokens of left-padded batches: each batch as wide as its longest prompt."""
    return sum(len(b) * max(len(seqs[i]) for i in b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="items per benchmark (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="the evaluation batch size (default 16)")
    parser.add_argument("--conditions", default="q,q_if", help="Q-type conditions (default q,q_if)")
    args = parser.parse_args()

    tokenizer = load_tokenizer(EMBEDDED_DEFAULT)
    prompts = load_prompts()
    dialogue = DialogueSpec(format="chat_template")
    settings = EvalSettings(
        model=EMBEDDED_DEFAULT,
        output=Path("unused"),
        benchmarks=list(registry.BENCHMARK_NAMES),
        conditions=args.conditions.split(","),
        limit=args.limit,
        data_dir=data_dir(),
        dialogue=dialogue,
    )
    tasks, _ = plan(settings, prompts)
    header = f"{'benchmark':<11} {'condition':<9} {'items':>7} {'tokens/item':>12} {'padded':>8} {'shared':>8}"
    print(f"{header}  work vs limit")
    for task in tasks:
        texts = [render(it.scored_turns(), dialogue, tokenizer) for it in task.items]
        seqs = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        n, limit = len(seqs), sum(len(s) for s in seqs)
        padded = padded_tokens(seqs, length_batches([len(s) for s in seqs], args.batch_size, 16384))
        shared = sum(forwarded_tokens([seqs[i] for i in b]) for b in prefix_batches(seqs, args.batch_size, 16384))
        print(
            f"{task.benchmark:<11} {task.condition:<9} {n:>7,} {limit / n:>12.1f} {padded / n:>8.1f} "
            f"{shared / n:>8.1f}  {shared / limit:.2f}x of one pass per item"
        )


if __name__ == "__main__":
    main()
