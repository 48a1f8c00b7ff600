"""Throughput of BBQ ``q`` scoring: ``selfcorrect``'s batched Scorer against a naive per-option scorer.

What it measures, on the same seeded stratified BBQ sample, in the same process and thread count:

* **naive** -- the comparison baseline, written here on purpose the way a straightforward per-option
  log-likelihood scorer (lm-eval-harness style) works: for every item and every answer letter, one
  unbatched forward pass over ``prompt + letter`` (tokenized as one string), the default Hugging Face
  forward (logits at every position), the log-probabilities of the letter token(s) summed, and a
  softmax over the three options.
* **selfcorrect** -- :meth:`selfcorrect.evaluate.scoring.Scorer.score`: batches of prompts that begin alike, each
  run as one row holding the trie of its prompts' tokens (or, for a model that fails the tree check, one shared
  prefix through a KV cache), with the LM head applied at each prompt's last position only.

It prints items/s of both and their ratio, checks that both give the same answers (argmax agreement
and the largest absolute difference of the renormalised probabilities), times a large square fp32
matmul as the machine's practical peak, and reports each scorer's achieved GFLOP/s as a fraction of
that peak. The FLOP estimate counts the dense weights only (attention score FLOPs are left out):
``2 x non-embedding params x tokens run through the model`` plus ``2 x LM-head params`` per position at which
the LM head is applied (every position for the naive scorer, the last one per item for ours).

``--profile`` also runs our scorer once more under ``torch.profiler`` and prints where its time goes: matrix
multiplication, attention, and the rest (normalisation, rotary embedding, activations, copies), with the
operators that take most of it.

Run from the repository root (the first run converts the embedded model once, about 30 s more)::

    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/eval_throughput.py
    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/eval_throughput.py --items 128 --json out/t.json
    SELFCORRECT_DATA_DIR=../shared/data .venv/bin/python benchmarks/eval_throughput.py --items 200 --profile

This is a benchmark script, not a test: it asserts nothing and always prints what it found.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from selfcorrect.config import data_dir as resolve_data_dir
from selfcorrect.evaluate.benchmarks import bbq
from selfcorrect.evaluate.metrics import stratified_sample
from selfcorrect.evaluate.prefix_tree import tree_tokens
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.scoring import Scorer, forwarded_tokens
from selfcorrect.models import EMBEDDED_DEFAULT, load_model

CONDITION = "q"
SEED = 0
WARMUP_ITEMS = 2
MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
TARGET_SPEEDUP = 10.0
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}  # the first three do the work
TOP_OPS = 8


@dataclass
class RunStats:
    """What one scorer did on the sample: probabilities, tokens processed and LM-head positions."""

    probs: list[list[float]]
    tokens: int  # real (non-pad) tokens run through the transformer body
    head_positions: int  # positions at which the LM head (vocab projection) was applied


# ---- the naive baseline ------------------------------------------------------------------------
class NaiveScorer:
    """The comparison baseline: one unbatched full-logits forward pass per (item, option).

    Deliberately simple, like a per-option log-likelihood scorer: ``prompt + letter`` is tokenized as
    one string, the model returns logits at every position (no ``logits_to_keep``), and the letter's
    log-probability is the sum over its token(s). The options' log-probabilities are softmaxed.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return next(self.model.parameters()).device

    def _option_logprob(self, text: str, option: str) -> tuple[float, int]:
        """Summed log-probability of ``option`` after ``text``, and the number of tokens processed."""
        prompt_ids = self.tokenizer(text)["input_ids"]
        ids = self.tokenizer(text + option)["input_ids"]
        start = 0  # the continuation starts where the joint tokenization stops matching the prompt's
        while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
            start += 1
        start = max(start, 1)  # the first token has no prediction
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].float()
        logp = torch.log_softmax(logits[start - 1 : -1], dim=-1)
        targets = torch.tensor(ids[start:], device=logp.device)
        return float(logp[torch.arange(len(targets), device=logp.device), targets].sum()), len(ids)

    @torch.inference_mode()
    def score(self, texts: Sequence[str], candidates: Sequence[Sequence[str]]) -> RunStats:
        """Renormalised option probabilities per text, one forward pass per option."""
        probs, tokens = [], 0
        for text, options in zip(texts, candidates):
            logps = []
            for option in options:
                logp, n = self._option_logprob(text, option)
                logps.append(logp)
                tokens += n
            probs.append(torch.softmax(torch.tensor(logps, dtype=torch.float64), dim=0).tolist())
        return RunStats(probs=probs, tokens=tokens, head_positions=tokens)


# ---- ours ---------------------------------------------------------------------------------------
def score_ours(scorer: Scorer, texts: Sequence[str], candidates: Sequence[Sequence[str]], batch_size: int) -> RunStats:
    """``Scorer.score`` on the texts (the timed part); token counts are filled in by :func:`ours_token_counts`."""
    with torch.inference_mode():
        scores = scorer.score(texts, candidates, batch_size=batch_size)
    return RunStats(probs=[s.probs for s in scores], tokens=0, head_positions=0)


def ours_token_counts(
    scorer: Scorer, texts: Sequence[str], candidates: Sequence[Sequence[str]], batch_size: int
) -> tuple[int, int]:
    """(tokens run through the model, LM-head positions) of ``Scorer.score``, counted outside the timed region.

    Each batch's token trie once (``prefix_tree.tree_tokens``), or its shared prefix once plus the padded rest
    where the scorer fell back to KV-cache batches; the LM head at each prompt's last position. A candidate of
    several tokens costs one extra full-logits pass over the prompt plus that candidate (see
    ``Scorer._continuation_logprob``).
    """
    seqs = [scorer.encode(t) for t in texts]
    count = tree_tokens if scorer.tree else forwarded_tokens
    tokens = sum(count([seqs[i] for i in batch]) for batch in scorer.batches(seqs, batch_size))
    head = len(seqs)
    for text, seq, options in zip(texts, seqs, candidates):
        for ids in scorer.candidate_ids(text, options):
            if len(ids) > 1:
                tokens += len(seq) + len(ids)
                head += len(seq) + len(ids)
    return tokens, head


def profile_ours(scorer: Scorer, texts: Sequence[str], candidates: Sequence[Sequence[str]], batch_size: int) -> None:
    """Print where one run of our scorer spends its time: matmul, attention and the rest, by operator self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        score_ours(scorer, texts, candidates, batch_size)
    ops = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(t for _, t in ops)
    groups = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, t in ops:
        groups["matmul" if name in MATMUL_OPS else "attention" if "scaled_dot_product" in name else "other"] += t
    print(f"profile of one scoring run ({total:.1f} s of operator self time):")
    print("  " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in groups.items()))
    for name, t in sorted(ops, key=lambda o: -o[1])[:TOP_OPS]:
        print(f"  {name:<50} {t:>7.2f} s  {100 * t / total:>5.1f}%")


# ---- measurement helpers ------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], RunStats], repeats: int, device: torch.device) -> tuple[RunStats, list[float]]:
    """Run ``fn`` ``repeats`` times; the last result and every wall-clock time in seconds."""
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    assert result is not None
    return result, times


def matmul_peak_gflops(device: torch.device, size: int = MATMUL_SIZE, repeats: int = MATMUL_REPEATS) -> float:
    """Best GFLOP/s of a ``size x size`` fp32 matmul (after two warm-up products)."""
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    with torch.inference_mode():
        for _ in range(2):
            torch.mm(a, b)
        synchronize(device)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(non-embedding params, LM-head params); tied input/output embeddings are counted once."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    non_embedding = total - embed.numel() - (0 if head is embed else head.numel())
    return non_embedding, head.numel()


def sample_items(data_dir: Path | None, n_items: int) -> tuple[list[str], list[list[str]], list[str]]:
    """Texts, candidates and ids of a seeded BBQ sample stratified as the evaluation runner does it."""
    units = bbq.load(data_dir)
    keep = set(stratified_sample([u["id"] for u in units], [bbq.stratum(u) for u in units], n_items, SEED))
    chosen = [u for u in units if u["id"] in keep]
    items = bbq.items(chosen, load_prompts(), CONDITION)
    texts = [render(it.scored_turns()) for it in items]
    return texts, [list(it.candidates) for it in items], [it.item_id for it in items]


def agreement(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> tuple[int, float]:
    """(items whose argmax agrees, largest absolute difference of any probability)."""

    def argmax(p: Sequence[float]) -> int:
        return max(range(len(p)), key=p.__getitem__)

    same = sum(int(argmax(p) == argmax(q)) for p, q in zip(a, b))
    diff = max(abs(x - y) for p, q in zip(a, b) for x, y in zip(p, q))
    return same, diff


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Items/s of BBQ q scoring: selfcorrect's batched Scorer vs a naive per-option scorer."
    )
    parser.add_argument("--model", default=EMBEDDED_DEFAULT, help="model reference (default: %(default)s)")
    parser.add_argument("--items", type=int, default=64, help="BBQ items, seeded stratified sample (default: 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of our scorer (default: 16)")
    parser.add_argument("--data-dir", default=None, help="benchmark data directory (default: $SELFCORRECT_DATA_DIR)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (default: auto)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per scorer; the best counts (default: 1)")
    parser.add_argument("--profile", action="store_true", help="also profile one run of our scorer by operator")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    for flag in ("items", "batch_size", "repeats"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table (and write the JSON file if asked)."""
    args = parse_args(argv)
    texts, candidates, _ = sample_items(resolve_data_dir(args.data_dir), args.items)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    scorer, naive = Scorer(model, tokenizer), NaiveScorer(model, tokenizer)

    # Warm-up (not timed): both code paths once on a couple of items.
    naive.score(texts[:WARMUP_ITEMS], candidates[:WARMUP_ITEMS])
    score_ours(scorer, texts[:WARMUP_ITEMS], candidates[:WARMUP_ITEMS], args.batch_size)

    naive_run, naive_times = timed(lambda: naive.score(texts, candidates), args.repeats, device)
    ours_run, ours_times = timed(lambda: score_ours(scorer, texts, candidates, args.batch_size), args.repeats, device)
    ours_run.tokens, ours_run.head_positions = ours_token_counts(scorer, texts, candidates, args.batch_size)
    peak = matmul_peak_gflops(device)

    non_embedding, head_params = parameter_counts(model)
    n = len(texts)
    prompt_tokens = [len(scorer.encode(t)) for t in texts]
    rows = []
    for name, run, times in (
        ("naive (per option, bs 1)", naive_run, naive_times),
        (f"selfcorrect (bs {args.batch_size})", ours_run, ours_times),
    ):
        best = min(times)
        flops = 2 * non_embedding * run.tokens + 2 * head_params * run.head_positions
        gflops = flops / best / 1e9
        rows.append(
            {
                "scorer": name,
                "seconds": best,
                "seconds_all": times,
                "items_per_s": n / best,
                "tokens": run.tokens,
                "lm_head_positions": run.head_positions,
                "gflop": flops / 1e9,
                "gflops": gflops,
                "fraction_of_matmul_peak": gflops / peak,
            }
        )
    speedup = rows[1]["items_per_s"] / rows[0]["items_per_s"]
    same, max_diff = agreement(naive_run.probs, ours_run.probs)

    best_of = f", best of {args.repeats}" if args.repeats > 1 else ""
    print(
        f"device {device.type}, dtype {dtype}, threads {torch.get_num_threads()}, items {n}, "
        f"mean prompt tokens {statistics.mean(prompt_tokens):.1f}{best_of}"
    )
    print(f"{'scorer':<26} {'items/s':>8} {'seconds':>8} {'GFLOP/s':>8} {'% of matmul peak':>17}")
    for row in rows:
        print(
            f"{row['scorer']:<26} {row['items_per_s']:>8.2f} {row['seconds']:>8.2f} {row['gflops']:>8.1f} "
            f"{100 * row['fraction_of_matmul_peak']:>16.1f}%"
        )
    print(f"speed-up: {speedup:.1f}x   (target >= {TARGET_SPEEDUP:.0f}x)")
    print(f"matmul peak fp32 ({MATMUL_SIZE}x{MATMUL_SIZE}): {peak:.0f} GFLOP/s")
    print(f"agreement: {same}/{n} argmax equal, max |dp| = {max_diff:.1e}")
    print(
        f"params: {non_embedding / 1e6:.1f}M non-embedding, {head_params / 1e6:.1f}M LM head "
        "(attention-score FLOPs not counted)"
    )
    print(f"selfcorrect: {ours_run.tokens / n:.1f} tokens through the model per item (one pass: the prompt's)")
    if args.profile:
        profile_ours(scorer, texts, candidates, args.batch_size)

    if args.json is not None:
        figures = {
            "model": args.model,
            "device": str(device),
            "dtype": dtype,
            "threads": torch.get_num_threads(),
            "items": n,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "mean_prompt_tokens": statistics.mean(prompt_tokens),
            "non_embedding_params": non_embedding,
            "lm_head_params": head_params,
            "matmul_peak_gflops": peak,
            "speedup": speedup,
            "argmax_agree": same,
            "max_abs_prob_diff": max_diff,
            "scorers": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
