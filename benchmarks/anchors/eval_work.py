"""Work per item of the two BBQ evaluations of ``benchmarks/compare_eval.py``, from their outputs (no model run).

Runs with selfcorrect's python after both evaluations have finished; only tokenizes.

* **selfcorrect**: the items of ``<sc-output>/bbq/sample.json`` under condition ``q``, rendered as ``evaluate`` renders
  them (dialogue ``human_assistant``, the default for a plain model directory), tokenized, and grouped into the
  batches ``evaluate`` forms for a model that passes the scorer's token-tree check, as the embedded model does
  (``prefix_tree.tree_batches`` with the same batch size and the model's hidden size). Reports the real prompt
  tokens (one pass over each item's prompt), the tokens actually forwarded (each node of a batch's token trie
  once), and the extra passes for answer letters of more than one token.
* **lm-eval**: the requests logged with ``--log_samples`` (one ``(context, continuation)`` pair per answer option),
  tokenized with the same tokenizer: tokens of context + continuation minus the last one per request, no padding
  counted. An estimate of lm-eval's forwarded tokens (its batching pads too, and it may cut long inputs).

Writes a JSON object to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from selfcorrect import dialogue as dialogues
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.evaluate.benchmarks import bbq
from selfcorrect.evaluate.prefix_tree import tree_batches, tree_tokens
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.scoring import Scorer


def selfcorrect_work(output: Path, data_dir: Path, tokenizer: Any, batch_size: int, hidden_size: int) -> dict[str, Any]:
    """Tokens and forward passes of ``selfcorrect evaluate`` on BBQ ``q`` (see the module docstring)."""
    spec = DialogueSpec()
    ids = set(json.loads((output / "bbq" / "sample.json").read_text())["ids"])
    units = [u for u in bbq.load(data_dir) if u["id"] in ids]
    items = bbq.items(units, load_prompts(), "q")
    scorer = Scorer(None, tokenizer, add_special_tokens=dialogues.add_special_tokens(spec))
    texts = [render(it.scored_turns(), spec, tokenizer) for it in items]
    seqs = [scorer.encode(t) for t in texts]
    lengths = [len(s) for s in seqs]
    batches = tree_batches(seqs, batch_size, hidden_size)
    forwarded = sum(tree_tokens([seqs[i] for i in b]) for b in batches)
    extra_passes = extra_tokens = 0
    for it, text, n in zip(items, texts, lengths):
        for cand in scorer.candidate_ids(text, list(it.candidates)):
            if len(cand) > 1:
                extra_passes += 1
                extra_tokens += n + len(cand)
    n_items = len(items)
    return {
        "items": n_items,
        "forward_rows": n_items + extra_passes,
        "batches": len(batches),
        "prompt_tokens": sum(lengths),
        "forwarded_tokens": forwarded + extra_tokens,
        "tokens_per_item_bound": sum(lengths) / n_items,
        "tokens_per_item_forwarded": (forwarded + extra_tokens) / n_items,
        "lm_head_positions_per_item": (n_items + extra_tokens) / n_items,
    }


def lm_eval_work(samples: Path, tokenizer: Any) -> dict[str, Any]:
    """Requests and (estimated, unpadded) tokens of lm-eval's logged BBQ requests."""
    docs = requests = tokens = 0
    categories: dict[str, int] = {}
    for line in samples.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        docs += 1
        category = record.get("doc", {}).get("category", "?")
        categories[category] = categories.get(category, 0) + 1
        arguments = record["arguments"]
        pairs = arguments.values() if isinstance(arguments, dict) else arguments
        for pair in pairs:
            context, continuation = (pair["arg_0"], pair["arg_1"]) if isinstance(pair, dict) else pair[:2]
            n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            n += len(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            requests += 1
            tokens += n - 1
    return {
        "items": docs,
        "requests": requests,
        "requests_per_item": requests / docs if docs else None,
        "tokens_unpadded_estimate": tokens,
        "tokens_per_item_estimate": tokens / docs if docs else None,
        "lm_head_positions_per_item": tokens / docs if docs else None,  # lm-eval takes logits at every position
        "categories": categories,
    }


def main() -> None:
    """Compute the work figures and write them to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (its tokenizer is used)")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--sc-output", required=True, type=Path, help="selfcorrect evaluate's output directory")
    p.add_argument("--batch-size", type=int, required=True, help="selfcorrect evaluate's --batch-size")
    p.add_argument("--lm-eval-samples", type=Path, default=None, help="lm-eval's samples_*.jsonl")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    hidden_size = AutoConfig.from_pretrained(args.model).hidden_size
    result = {"selfcorrect": selfcorrect_work(args.sc_output, args.data_dir, tokenizer, args.batch_size, hidden_size)}
    if args.lm_eval_samples is not None:
        result["lm_eval"] = lm_eval_work(args.lm_eval_samples, tokenizer)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
