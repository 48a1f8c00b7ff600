"""Work per item of selfcorrect's scoring against the one-pass-per-item limit, on the full benchmarks.

For each benchmark and Q-type condition it tokenizes every item's scored prompt (the embedded model's tokenizer,
the shipped prompts, the chat-template dialogue) and counts the tokens the model is run on:

* **one pass per item** -- the sum of the prompt lengths: what any scorer that runs each prompt once pays
  (lm-eval pays this once per answer option);
* **left-padded batches** -- selfcorrect before prefix sharing: batches by length, each padded to its longest;
* **one shared prefix** -- the scorer's fallback for models that fail its token-tree check (``prefix_batches``):
  per batch, the tokens every prompt begins with once (through a KV cache), then each prompt's own tokens padded
  to the longest;
* **token trees** -- selfcorrect now (``Scorer.batches``, ``prefix_tree.tree_batches``): per batch, every node of
  the trie of its prompts' tokens once. A benchmark's Q-type conditions are planned together (they share the
  whole question); the ``q+q_if`` row counts that, the per-condition rows each condition alone;
* **trie** -- the bound for any prefix sharing: every node of the trie of all the prompts once (one batch of
  unlimited size).

It needs no model (only its tokenizer, and its hidden size for the planner's attention cost) and takes a few
minutes for the full benchmarks. It asserts nothing and prints what it found::

    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/prefix_work.py
    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/prefix_work.py --limit 200 --batch-size 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selfcorrect.config.evaluation import EvaluationSection
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.evaluate import benchmarks as registry
from selfcorrect.evaluate.prefix_tree import tree_batches, tree_tokens
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.runner import plan
from selfcorrect.evaluate.scoring import forwarded_tokens, length_batches, prefix_batches
from selfcorrect.models import EMBEDDED_DEFAULT, load_tokenizer


def padded_tokens(seqs: list[list[int]], batches: list[list[int]]) -> int:
    """Tokens of left-padded batches: each batch as wide as its longest prompt."""
    return sum(len(b) * max(len(seqs[i]) for i in b) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="items per benchmark (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="the evaluation batch size (default 64)")
    parser.add_argument("--conditions", default="q,q_if", help="Q-type conditions (default q,q_if)")
    parser.add_argument(
        "--hidden-size", type=int, default=576, help="the model's hidden size, for the planner (default 576, SmolLM2)"
    )
    args = parser.parse_args()

    tokenizer = load_tokenizer(EMBEDDED_DEFAULT)
    prompts = load_prompts()
    dialogue = DialogueSpec(format="chat_template")
    conditions = args.conditions.split(",")
    section = EvaluationSection(benchmarks=list(registry.BENCHMARK_NAMES), conditions=conditions, limit=args.limit)
    settings = section.settings(
        Path("unused"), seed=0, dtype=None, trust_remote_code=False, dialogue=dialogue, model=EMBEDDED_DEFAULT
    )
    tasks, _ = plan(settings, prompts)
    header = f"{'benchmark':<11} {'condition':<9} {'items':>7} {'tokens/item':>12} {'padded':>8} {'shared':>8}"
    print(f"{header} {'tree':>8} {'trie':>8}  work vs limit (tree)")
    groups: dict[str, list[list[int]]] = {}
    for task in tasks:
        texts = [render(it.scored_turns(), dialogue, tokenizer) for it in task.items]
        seqs = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        groups.setdefault(task.benchmark, []).extend(seqs)
        row(task.benchmark, task.condition, seqs, args.batch_size, args.hidden_size)
    conditions = args.conditions.split(",")
    for benchmark, seqs in groups.items() if len(conditions) > 1 else ():
        row(benchmark, "+".join(conditions), seqs, args.batch_size, args.hidden_size, joint=True)


def row(
    benchmark: str, condition: str, seqs: list[list[int]], batch_size: int, hidden: int, joint: bool = False
) -> None:
    """Print one line: the work of each way of batching ``seqs``, per item."""
    n, limit = len(seqs), sum(len(s) for s in seqs)
    tree = sum(tree_tokens([seqs[i] for i in b]) for b in tree_batches(seqs, batch_size, hidden))
    if joint:  # padded and one-prefix batching never ran the conditions together
        padded = shared = "-"
    else:
        padded = f"{padded_tokens(seqs, length_batches([len(s) for s in seqs], batch_size, 16384)) / n:.1f}"
        one_prefix = sum(forwarded_tokens([seqs[i] for i in b]) for b in prefix_batches(seqs, batch_size, 16384))
        shared = f"{one_prefix / n:.1f}"
    print(
        f"{benchmark:<11} {condition:<9} {n:>7,} {limit / n:>12.1f} {padded:>8} {shared:>8} {tree / n:>8.1f} "
        f"{tree_tokens(seqs) / n:>8.1f}  "
        f"{tree / limit:.2f}x of one pass per item"
    )


if __name__ == "__main__":
    main()
