"""Prompts packed as a token tree: every prefix that several prompts share runs through the model once.

A batch of prompts is laid out as the trie of their token ids, in depth-first order: one row of unique tokens,
each at the position it has in its prompts (its depth), attending to itself and its ancestors only (a 4D
attention mask). The next-token distribution after a prompt is read at the node of its last token. This is one
forward pass with the work of the token trie, at every level of sharing at once: the law-school preamble, a BBQ
context and its questions, the whole question that Q and Q+IF share. The result equals a plain pass per prompt to
float tolerance (``Scorer`` checks this on the first batch before it relies on it; tests/test_scoring.py).

Batches are planned over the prompts sorted by token ids, so prompts that begin alike are neighbours. A batch
costs its unique tokens, plus the attention over the whole row (every query against every key, masked), plus a
fixed cost per forward call; dynamic programming over the sorted order picks the cuts with the least cost.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BATCH_COST_TOKENS = 16  # what one more forward call costs, in tokens
MAX_TREE_TOKENS = 2048  # unique tokens in one row at most (the mask is this squared)


@dataclass(frozen=True)
class TreePack:
    """The token trie of a batch of prompts, in depth-first order."""

    input_ids: list[int]
    positions: list[int]  # each token's position in its prompts (its depth in the trie)
    parents: list[int]  # index of each token's parent in the row, -1 for a first token
    last: list[int]  # per prompt, in the order given: index of its last token in the row

    def attention_mask(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Additive 4D mask (1, 1, n, n): 0 where a token may attend (itself and its ancestors), else the dtype's
        minimum."""
        n = len(self.input_ids)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                allowed[i] = allowed[parent]
            allowed[i, i] = True
        mask = torch.zeros(n, n, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask.to(device)[None, None]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    return len(os.path.commonprefix([list(a), list(b)]))


def pack(seqs: Sequence[Sequence[int]]) -> TreePack:
    """The trie of ``seqs`` (non-empty token lists). Identical prompts share every node."""
    order = sorted(range(len(seqs)), key=lambda i: (list(seqs[i]), i))
    ids: list[int] = []
    positions: list[int] = []
    parents: list[int] = []
    last = [0] * len(seqs)
    path: list[int] = []  # row index of each token of the previous prompt (in sorted order)
    previous: Sequence[int] = ()
    for i in order:
        seq = seqs[i]
        if not seq:
            raise ValueError("an empty prompt cannot be scored")
        shared = common_prefix(previous, seq)
        path = path[:shared]
        for depth in range(shared, len(seq)):
            parents.append(path[-1] if path else -1)
            path.append(len(ids))
            ids.append(seq[depth])
            positions.append(depth)
        last[i] = path[len(seq) - 1]
        previous = seq
    return TreePack(ids, positions, parents, last)


def tree_tokens(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens the model runs on for one batch: the number of nodes of its trie."""
    rows = sorted(list(s) for s in seqs)
    return sum(len(b) - common_prefix(a, b) for a, b in zip([[]] + rows, rows))


def batch_cost(unique: int, hidden_size: int) -> float:
    """Cost of one batch in tokens: its unique tokens, the attention over the row (per query-key pair about
    ``1 / (6 x hidden_size)`` of a token's matrix products), and the call."""
    return BATCH_COST_TOKENS + unique + unique * unique / (6 * hidden_size)


def tree_batches(
    seqs: Sequence[Sequence[int]], batch_size: int, hidden_size: int, max_tokens: int = MAX_TREE_TOKENS
) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` consecutive prompts in token-id order (and at most
    ``max_tokens`` unique tokens, unless one prompt alone is longer), cut where :func:`batch_cost` sums least.

    The plan depends only on the token ids, so a resumed run rebuilds the same batches.
    """
    order = sorted(range(len(seqs)), key=lambda i: (list(seqs[i]), i))
    rows = [seqs[i] for i in order]
    neighbours = [0] + [common_prefix(a, b) for a, b in zip(rows, rows[1:])]
    best = [0.0] + [math.inf] * len(rows)  # best[j]: least cost of rows[:j]
    start = [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        unique = 0
        for k in range(j - 1, max(j - batch_size, 0) - 1, -1):  # the batch rows[k:j]
            # rows[k] adds the tokens it does not share with rows[k + 1] (sorted order: its nearest relative)
            unique += len(rows[k]) - (neighbours[k + 1] if k + 1 < j else 0)
            if k < j - 1 and unique > max_tokens:
                break
            cost = best[k] + batch_cost(unique, hidden_size)
            if cost < best[j]:
                best[j], start[j] = cost, k
    return cut(order, start)


def cut(order: list[int], start: list[int]) -> list[list[int]]:
    """The batches of a plan over ``order``: ``start[j]`` is where the batch that ends before ``j`` begins."""
    batches: list[list[int]] = []
    j = len(order)
    while j > 0:
        batches.append(order[start[j] : j])
        j = start[j]
    return batches[::-1]
