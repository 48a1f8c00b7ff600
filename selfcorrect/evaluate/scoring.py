"""Batched next-token option probabilities, and two-stage CoT generation.

Scoring (Q-type conditions): one forward pass per item. The prompt ends with the assistant prefix; the
next-token distribution is read at its last position and restricted to the first token of each
candidate (the letters, pronouns or yes/no), then renormalised. The raw probability mass on the
candidates is kept so format failures show. A candidate that the tokenizer splits into several tokens is
scored by the summed log-probability of all its tokens (PROTOCOL section 1.3), which costs one extra
forward pass for that item only.

Shared prefixes are computed once. Items are batched in the order of their token ids, so prompts that begin
alike (the law-school preamble, a BBQ context asked two questions, one question under Q and Q+IF) share a batch.
A batch runs as one row holding the trie of its prompts' tokens (:mod:`selfcorrect.evaluate.prefix_tree`), so
every shared prefix, at every level, goes through the model once. A model whose outputs on such a row differ from
a plain pass (checked on the first batch) is scored the older way instead (:func:`prefix_batches`): the tokens
that every prompt of a batch begins with run once, and their KV cache, repeated over the batch, serves the rest
of each prompt (left-padded after the prefix). Either way the probabilities equal those of a plain pass to float
tolerance (tests/test_scoring.py).

Generation (CoT): a sampling loop with a KV cache and one ``torch.Generator`` per item, so an item's
reasoning depends on its own seed, not on which other items share its batch. It stops at EOS or at a
stop string (``"\\n\\nHuman:"``), which is cut from the returned text. Given a ``desc``, a progress bar counts the
items as they finish (items/s, ETA) and shows the decoding step, where stderr is a terminal
(:func:`selfcorrect.engines.progress_bar`).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from selfcorrect.engines import eos_ids, progress_bar, reply_text
from selfcorrect.errors import UserError
from selfcorrect.evaluate import prefix_tree


@dataclass(frozen=True)
class Score:
    """Renormalised candidate probabilities and the raw mass the model put on the candidates (None where it has no
    meaning: a reward model's preferences, which also keep its raw ``rewards``)."""

    probs: list[float]
    mass: float | None
    rewards: list[float] | None = None


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), at most ``batch_size`` each.

    ``max_tokens`` additionally caps ``batch_len x longest`` so long prompts get smaller batches. The plan
    depends only on the lengths, so a resumed run rebuilds the same batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else []
        fits = bool(cur) and len(cur) < batch_size
        if fits and max_tokens is not None:
            fits = (len(cur) + 1) * lengths[cur[0]] <= max_tokens
        if fits:
            cur.append(i)
        else:
            batches.append([i])
    return batches


SHARED_PREFIX_MIN = 16  # shared tokens below which a batch is run as one plain pass
BATCH_COST_TOKENS = 16  # what one more batch (two more forward calls) costs, in tokens, when batches are planned


def shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all ``seqs`` share, leaving each at least one token of its own."""
    return min(len(os.path.commonprefix([list(s) for s in seqs])), min(len(s) for s in seqs) - 1)


def forwarded_tokens(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens the model runs on to score one batch: the shared prefix once (when it is long enough to be shared),
    then each prompt's own tokens, left-padded to the longest."""
    shared = shared_prefix_length(seqs) if len(seqs) > 1 else 0
    shared = shared if shared >= SHARED_PREFIX_MIN else 0
    return shared + len(seqs) * max(len(s) - shared for s in seqs)


def prefix_batches(seqs: Sequence[Sequence[int]], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` consecutive items in token-id order, cut where the
    tokens the model runs on are fewest.

    Sorting by token ids puts prompts that begin alike next to each other (the questions of one BBQ context, the
    prompts after the law-school preamble). A batch costs its shared prefix once plus each prompt's own tokens
    padded to the longest (see :meth:`Scorer._last_logprobs`), plus ``BATCH_COST_TOKENS``; the cuts minimise the
    sum (dynamic programming over the sorted order). ``max_tokens`` caps ``batch_len x longest``. The plan depends
    only on the token ids, so a resumed run rebuilds the same batches.
    """
    order = sorted(range(len(seqs)), key=lambda i: (list(seqs[i]), i))
    rows = [seqs[i] for i in order]
    # the prefix a sorted range shares is the smallest prefix shared by neighbours inside it
    neighbours = [0] + [prefix_tree.common_prefix(a, b) for a, b in zip(rows, rows[1:])]
    best = [0.0] + [math.inf] * len(rows)  # best[j]: least cost of rows[:j]
    start = [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        longest, shortest, common = 0, math.inf, math.inf
        for k in range(j - 1, max(j - batch_size, 0) - 1, -1):  # the batch rows[k:j]
            longest, shortest = max(longest, len(rows[k])), min(shortest, len(rows[k]))
            n = j - k
            if max_tokens is not None and n > 1 and n * longest > max_tokens:
                break
            if n > 1:
                common = min(common, neighbours[k + 1])
            shared = min(common, shortest - 1) if n > 1 else 0
            shared = shared if shared >= SHARED_PREFIX_MIN else 0
            cost = best[k] + BATCH_COST_TOKENS + shared + n * (longest - shared)
            if cost < best[j]:
                best[j], start[j] = cost, k
    return prefix_tree.cut(order, start)


def _l1(logp_a: torch.Tensor, logp_b: torch.Tensor) -> float:
    """The largest L1 distance between two rows of next-token distributions, given as log-probabilities."""
    return float((logp_a.exp() - logp_b.exp()).abs().sum(-1).max())


class Scorer:
    """Scores candidate continuations and samples CoT reasoning with one causal LM."""

    def __init__(self, model, tokenizer, *, add_special_tokens: bool = True, max_batch_tokens: int = 16384):
        self.model = model
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.max_batch_tokens = max_batch_tokens
        if tokenizer.pad_token_id is None:
            raise UserError("the tokenizer has neither a pad nor an EOS token")
        self._candidate_ids = lru_cache(maxsize=65536)(self._candidate_ids_uncached)
        self.tree: bool | None = None  # whether a token-tree row scores as a plain pass (checked on first use)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---- tokenization -------------------------------------------------------------------------
    def encode(self, text: str, special: bool | None = None) -> list[int]:
        special = self.add_special_tokens if special is None else special
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def _candidate_ids_uncached(self, tail: str, candidate: str) -> tuple[int, ...]:
        """Token ids of ``candidate`` as it continues text ending in ``tail``.

        Taken from the joint tokenization when that extends the tail's own tokens, so merges at the
        boundary are seen; else from the candidate alone.
        """
        base = self.encode(tail, special=False)
        joint = self.encode(tail + candidate, special=False)
        if joint[: len(base)] == base and len(joint) > len(base):
            return tuple(joint[len(base) :])
        return tuple(self.encode(candidate, special=False))

    def candidate_ids(self, text: str, candidates: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids per candidate; candidates that tokenize identically are a UserError."""
        ids = [self._candidate_ids(text[-24:], c) for c in candidates]
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                if ids[a] == ids[b] or (len(ids[a]) == 1 and len(ids[b]) == 1 and ids[a][0] == ids[b][0]):
                    raise UserError(
                        f"the tokenizer maps candidates {candidates[a]!r} and {candidates[b]!r} to the same "
                        f"token(s) {list(ids[a])}: their probabilities cannot be told apart"
                    )
        return ids

    # ---- batches ------------------------------------------------------------------------------
    def batches(self, seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
        """The batches :meth:`score` runs ``seqs`` (token ids) in: token trees where the model scores them as a
        plain pass, else batches that share one prefix through a KV cache."""
        if self._tree_works(seqs) and self._tree_fits(seqs):
            hidden = getattr(self.model.config, "hidden_size", 1024)
            return prefix_tree.tree_batches(seqs, batch_size, hidden)
        return prefix_batches(seqs, batch_size, self.max_batch_tokens)

    def _tree_fits(self, seqs: Sequence[Sequence[int]]) -> bool:
        """Whether every prompt fits the model's sliding attention window, if it has one: a tree row's mask lets a
        token see all its ancestors, which a plain pass of a longer prompt would not (the check above only saw
        four prompts)."""
        config = self.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        window = getattr(config, "sliding_window", None)
        return not isinstance(window, int) or window <= 0 or max(len(s) for s in seqs) <= window

    def _tree_works(self, seqs: Sequence[Sequence[int]]) -> bool:
        """Decided once, on the first four prompts in token-id order (at least two are needed): are the token-tree
        row's next-token distributions as close to a plain padded pass as plain passes are to each other?

        Closeness is the L1 distance of the distributions. The tree row passes within three times the distance
        between the padded pass and one pass per prompt, and at least within 1e-4 (2e-2 in 16-bit)."""
        if self.tree is None and len(seqs) > 1:
            probe = [list(s) for s in sorted(list(s) for s in seqs)[:4]]
            padded = self._last_logprobs(probe, share_prefix=False)
            alone = torch.cat([self._last_logprobs([s], share_prefix=False) for s in probe])
            tol = max(1e-4 if self.model.dtype == torch.float32 else 2e-2, 3 * _l1(alone, padded))
            try:
                gap = _l1(self._tree_logprobs(probe), padded)
            except (RuntimeError, TypeError, ValueError) as exc:  # e.g. an attention kernel without 4D masks
                gap, why = math.inf, f"{type(exc).__name__}: {exc}".splitlines()[0]
            else:
                why = f"L1 distance {gap:.2g} from a plain pass, tolerance {tol:.2g}"
            self.tree = gap <= tol
            if not self.tree:
                print(
                    f"note: this model does not score a token-tree row as a plain pass ({why}); scoring batches "
                    "that share one prefix through a KV cache instead",
                    file=sys.stderr,
                )
        return bool(self.tree)

    # ---- forward passes -----------------------------------------------------------------------
    def _pad_left(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    @staticmethod
    def _positions(mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    @torch.inference_mode()
    def _last_logprobs(self, seqs: list[list[int]], share_prefix: bool = True) -> torch.Tensor:
        """Log-softmax of the next-token logits after each sequence (float32, on CPU).

        With ``share_prefix``, shared prefixes run once: as a token tree where :meth:`batches` found that it works,
        else the tokens all sequences begin with run once and their KV cache serves the rest.
        """
        if share_prefix and len(seqs) > 1 and self.tree and self._tree_fits(seqs):
            return self._tree_logprobs(seqs)
        shared = shared_prefix_length(seqs) if share_prefix and len(seqs) > 1 else 0
        cache: Any = None
        if shared >= SHARED_PREFIX_MIN:  # as forwarded_tokens counts it
            prefix = torch.tensor([seqs[0][:shared]], device=self.device)
            cache = self.model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
        if not hasattr(cache, "batch_repeat_interleave"):  # nothing shared, or a model without a transformers Cache
            ids, mask = self._pad_left(seqs)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=self._positions(mask), logits_to_keep=1)
            return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
        cache.batch_repeat_interleave(len(seqs))
        ids, mask = self._pad_left([s[shared:] for s in seqs])  # [prefix][pad...][rest of the prompt]
        out = self.model(
            input_ids=ids,
            attention_mask=torch.cat([torch.ones_like(mask[:, :1]).expand(-1, shared), mask], dim=1),
            position_ids=shared + self._positions(mask),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()

    @torch.inference_mode()
    def _tree_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        """Log-softmax of the next-token logits after each sequence, from one row holding their token trie."""
        tree = prefix_tree.pack(seqs)
        out = self.model(
            input_ids=torch.tensor([tree.input_ids], device=self.device),
            position_ids=torch.tensor([tree.positions], device=self.device),
            attention_mask=tree.attention_mask(self.model.dtype, self.device),
            logits_to_keep=torch.tensor(tree.last, device=self.device),
            use_cache=False,
        )
        return torch.log_softmax(out.logits[0].float(), dim=-1).cpu()

    @torch.inference_mode()
    def _continuation_logprob(self, prompt: list[int], cont: tuple[int, ...]) -> float:
        """Summed log-probability of a multi-token continuation (one forward pass)."""
        ids = torch.tensor([prompt + list(cont)], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1)
        return float(logp[torch.arange(len(cont)), torch.tensor(cont, device=logp.device)].sum())

    def score(
        self,
        texts: Sequence[str],
        candidates: Sequence[Sequence[str]],
        batch_size: int = 16,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[Score]:
        """Candidate probabilities for each text (the prompt ending in the assistant prefix); ``token_ids``: the texts'
        :meth:`encode`, where the caller has it already."""
        if token_ids is not None and len(token_ids) != len(texts):
            raise ValueError(f"{len(token_ids)} token-id lists for {len(texts)} texts")
        seqs = [list(ids) for ids in token_ids] if token_ids is not None else [self.encode(t) for t in texts]
        cand_ids = [self.candidate_ids(t, c) for t, c in zip(texts, candidates)]
        results: list[Score | None] = [None] * len(texts)
        for batch in self.batches(seqs, batch_size):
            logprobs = self._last_logprobs([seqs[i] for i in batch])
            for row, i in enumerate(batch):
                lp = []
                for ids in cand_ids[i]:
                    if len(ids) == 1:
                        lp.append(float(logprobs[row, ids[0]]))
                    else:
                        lp.append(self._continuation_logprob(seqs[i], ids))
                raw = torch.tensor(lp, dtype=torch.float64).exp()
                mass = float(raw.sum())
                probs = (raw / mass).tolist() if mass > 0 else [1.0 / len(lp)] * len(lp)
                results[i] = Score(probs=probs, mass=mass)
        return results  # type: ignore[return-value]

    def score_items(
        self,
        items: Sequence[Any],
        texts: Sequence[str],
        batch_size: int = 16,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[Score]:
        """:meth:`score` of evaluation items (``ItemPrompt``), given their rendered ``texts``: what the runner asks of
        a scorer (a reward model answers it too: :class:`selfcorrect.evaluate.reward_probe.RewardScorer`)."""
        return self.score(texts, [it.candidates for it in items], batch_size=batch_size, token_ids=token_ids)

    # ---- generation ---------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        token_ids: Sequence[Sequence[int]],
        seeds: Sequence[int],
        *,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = ("\n\nHuman:",),
        batch_size: int | None = None,
        desc: str | None = None,
    ) -> list[str]:
        """Sample one continuation per prompt (token ids, e.g. :meth:`encode`'s) with its own seed; stop at EOS or a
        stop string. The ``hf`` engine (:mod:`selfcorrect.engines`); ``batch_size`` None: one batch (within
        ``max_batch_tokens``); ``desc``: the label of a progress bar over the prompts (None: no bar)."""
        seqs = [list(ids) for ids in token_ids]
        outputs: list[str] = [""] * len(seqs)
        with progress_bar(len(seqs), desc, leave=False) as bar:
            for batch in length_batches([len(s) for s in seqs], batch_size or len(seqs), self.max_batch_tokens):
                texts_out = self._generate_batch(
                    [seqs[i] for i in batch], [seeds[i] for i in batch], max_new_tokens, temperature, top_p, stop, bar
                )
                for i, text in zip(batch, texts_out):
                    outputs[i] = text
        return outputs

    @staticmethod
    def _sample(logits: torch.Tensor, gens: list[torch.Generator], temperature: float, top_p: float) -> list[int]:
        """One token per row by inverse-CDF sampling, each row drawing its uniform from its own generator."""
        probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
        order = None
        if top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True)
            probs = probs * (probs.cumsum(-1) - probs < top_p)
        cdf = probs.cumsum(-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).float()
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
        if order is not None:
            picked = order.gather(-1, picked)
        return picked.squeeze(-1).tolist()

    def _generate_batch(self, seqs, seeds, max_new_tokens, temperature, top_p, stop, bar) -> list[str]:
        """One batch of :meth:`generate`; ``bar`` counts each item as it ends and shows the decoding step."""
        from transformers import DynamicCache

        ends = eos_ids(self.tokenizer)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        ids, mask = self._pad_left(seqs)
        positions = self._positions(mask)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        new: list[list[int]] = [[] for _ in seqs]
        done = [False] * len(seqs)
        finished = 0
        for t in range(max_new_tokens):
            sampled = self._sample(out.logits[:, -1], gens, temperature, top_p)
            step = []
            for row, token in enumerate(sampled):
                if done[row]:
                    step.append(self.tokenizer.pad_token_id)
                    continue
                new[row].append(token)
                step.append(token)
                if token in ends or any(s in self.tokenizer.decode(new[row][-16:]) for s in stop):
                    done[row] = True
            bar.set_postfix_str(f"token {t + 1}/{max_new_tokens}")  # drawn every token: a token takes milliseconds
            bar.update(sum(done) - finished)
            finished = sum(done)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=torch.tensor(step, device=self.device)[:, None],
                attention_mask=mask,
                position_ids=positions,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        bar.update(len(seqs) - finished)  # the items cut at max_new_tokens
        return [reply_text(self.tokenizer, tokens, stop) for tokens in new]
