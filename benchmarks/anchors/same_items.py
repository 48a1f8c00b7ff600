"""selfcorrect's scoring of the very documents lm-eval scored in ``benchmarks/compare_eval.py``, timed.

Runs with selfcorrect's python after lm-eval has finished. The two tools' ``--limit N`` pick different items:
selfcorrect a sample stratified over the whole benchmark (no two items share a context), lm-eval the first N
documents of its split (``Age.jsonl``: each context asked four questions, as everywhere in BBQ). This script takes
lm-eval's documents from its logged samples (``category`` and ``example_id`` of each ``doc``), renders them under
selfcorrect's Q prompt as ``evaluate`` does (dialogue ``human_assistant``, the default for a plain model directory),
loads the model as ``evaluate`` does (fp32, CPU) and times :meth:`Scorer.score` over them at the given batch size:
the scoring part of ``evaluate``, token-tree check included (the counterpart of lm-eval's loglikelihood progress
bar). It also counts the tokens forwarded (each node of a batch's token trie once) against one pass per prompt.

Writes a JSON object to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from selfcorrect import dialogue as dialogues
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.evaluate.benchmarks import bbq
from selfcorrect.evaluate.prefix_tree import tree_tokens
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.scoring import Scorer, forwarded_tokens
from selfcorrect.models import load_model


def lm_eval_ids(samples: Path) -> list[str]:
    """selfcorrect's unit ids (``Category:example_id``) of the documents in lm-eval's samples file, in its order."""
    ids = []
    for line in samples.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)["doc"]
            ids.append(f"{doc['category']}:{doc['example_id']}")
    return ids


def score_same_items(model_dir: str, data_dir: Path, samples: Path, batch_size: int) -> dict[str, Any]:
    """Time selfcorrect's scoring of lm-eval's documents under Q; see the module docstring."""
    ids = lm_eval_ids(samples)
    by_id = {u["id"]: u for u in bbq.load(data_dir)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"same_items: {len(missing)} of lm-eval's documents are not in the local BBQ ({missing[0]})")
    items = bbq.items([by_id[i] for i in ids], load_prompts(), "q")
    spec = DialogueSpec()
    model, tokenizer = load_model(model_dir, dtype="float32", device="cpu")
    scorer = Scorer(model, tokenizer, add_special_tokens=dialogues.add_special_tokens(spec))
    texts = [render(it.scored_turns(), spec, tokenizer) for it in items]
    candidates = [list(it.candidates) for it in items]
    start = time.perf_counter()
    scorer.score(texts, candidates, batch_size=batch_size)
    seconds = time.perf_counter() - start
    seqs = [scorer.encode(t) for t in texts]
    count = tree_tokens if scorer.tree else forwarded_tokens
    batches = scorer.batches(seqs, batch_size)
    forwarded = sum(count([seqs[i] for i in b]) for b in batches)
    return {
        "items": len(items),
        "scoring_s": seconds,
        "token_tree": bool(scorer.tree),
        "batches": len(batches),
        "tokens_per_item_bound": sum(len(s) for s in seqs) / len(seqs),
        "tokens_per_item_forwarded": forwarded / len(seqs),
        "categories": sorted({i.split(":")[0] for i in ids}),
    }


def main() -> None:
    """Score lm-eval's documents and write the figures to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--lm-eval-samples", required=True, type=Path, help="lm-eval's samples_*.jsonl")
    p.add_argument("--batch-size", type=int, required=True, help="selfcorrect evaluate's --batch-size")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    result = score_same_items(args.model, args.data_dir, args.lm_eval_samples, args.batch_size)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
