"""The scoring engine on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from selfcorrect.config import data_dir
from selfcorrect.errors import UserError
from selfcorrect.evaluate import prefix_tree
from selfcorrect.evaluate.benchmarks import bbq, law_school, winogender
from selfcorrect.evaluate.prefix_tree import tree_tokens
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.scoring import (
    SHARED_PREFIX_MIN,
    Scorer,
    forwarded_tokens,
    length_batches,
    prefix_batches,
    shared_prefix_length,
)
from selfcorrect.models import load_model


@pytest.fixture(scope="module")
def scorer(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    return Scorer(model, tokenizer)


@pytest.fixture(scope="module")
def bbq_items():
    units = [u for u in bbq.load(data_dir()) if u["category"] == "Religion"][:40]
    return bbq.items(units, load_prompts(), "q_if")


def reference_probs(scorer: Scorer, text: str, candidates) -> tuple[list[float], float]:
    """Independent computation: unpadded forward pass on the whole text, full softmax, pick candidates."""
    ids = torch.tensor([scorer.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = scorer.model(input_ids=ids).logits[0, -1].double()
    p = torch.softmax(logits, -1)
    raw = [float(p[scorer.tokenizer(c, add_special_tokens=False)["input_ids"][0]]) for c in candidates]
    return [r / sum(raw) for r in raw], sum(raw)


def test_letters_are_single_tokens_after_the_readout(scorer):
    ids = scorer.candidate_ids("\n\nAssistant: The answer is (", ["a", "b", "c"])
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == 3


def test_scores_equal_an_unbatched_reference(scorer, bbq_items):
    texts = [render(it.scored_turns()) for it in bbq_items[:6]]
    got = scorer.score(texts, [it.candidates for it in bbq_items[:6]], batch_size=6)
    for text, it, s in zip(texts, bbq_items, got):
        probs, mass = reference_probs(scorer, text, it.candidates)
        assert s.probs == pytest.approx(probs, abs=1e-5)
        assert s.mass == pytest.approx(mass, rel=1e-4)
        assert sum(s.probs) == pytest.approx(1.0)


def test_batch_size_1_and_32_agree(scorer, bbq_items):
    texts = [render(it.scored_turns()) for it in bbq_items]
    cands = [it.candidates for it in bbq_items]
    one = scorer.score(texts, cands, batch_size=1)
    many = scorer.score(texts, cands, batch_size=32)
    for a, b in zip(one, many):
        assert a.probs == pytest.approx(b.probs, abs=1e-5)
        assert a.mass == pytest.approx(b.mass, rel=1e-4)


def test_winogender_and_law_candidates(scorer):
    prompts = load_prompts()
    wino = winogender.items(winogender.load(data_dir())[:5], prompts, "q")
    law = law_school.items(law_school.load(data_dir())[:2], prompts, "q")
    for it in wino + law:
        ids = scorer.candidate_ids(render(it.scored_turns()), it.candidates)
        assert all(len(i) == 1 for i in ids), (it.item_id, it.candidates, ids)
    got = scorer.score([render(it.scored_turns()) for it in law], [it.candidates for it in law])
    assert all(len(s.probs) == 2 and 0 < s.mass <= 1 for s in got)


def test_multi_token_candidates_use_summed_logprob(scorer):
    text = "\n\nHuman: Who?\n\nAssistant: It was the"
    cands = [" grandfather", " grandson", " unknown person"]
    ids = scorer.candidate_ids(text, cands)
    assert any(len(i) > 1 for i in ids)
    (s,) = scorer.score([text], [cands])
    prompt = scorer.tokenizer(text)["input_ids"]
    logp = []
    for cand in ids:
        full = torch.tensor([prompt + list(cand)])
        with torch.no_grad():
            lp = torch.log_softmax(scorer.model(input_ids=full).logits[0].double(), -1)
        logp.append(sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(cand)))
    raw = torch.tensor(logp).exp()
    assert s.probs == pytest.approx((raw / raw.sum()).tolist(), abs=1e-5)


def test_colliding_candidates_are_an_error(scorer):
    with pytest.raises(UserError, match="same token"):
        scorer.candidate_ids("The answer is (", ["a", "a"])


def test_generation_is_per_item_seeded_and_respects_stop(scorer, bbq_items):
    prompts = [
        scorer.encode(render(it.cot_turns()))
        for it in bbq.items([u for u in bbq.load(data_dir()) if u["category"] == "Age"][:3], load_prompts(), "q_if_cot")
    ]
    alone = scorer.generate(prompts[:1], [11], max_new_tokens=12)
    batched = scorer.generate(prompts, [11, 12, 13], max_new_tokens=12)
    assert alone[0] == batched[0]
    assert batched[0] != batched[1]
    again = scorer.generate(prompts, [11, 12, 13], max_new_tokens=12)
    assert again == batched
    stopped = scorer.generate(prompts, [11, 12, 13], max_new_tokens=40, stop=["e"])
    assert all("e" not in t for t in stopped)


def test_length_batches_plan():
    lengths = [5, 9, 9, 3, 7, 1]
    plan = length_batches(lengths, batch_size=2)
    assert plan == [[1, 2], [4, 0], [3, 5]]
    assert length_batches(lengths, batch_size=4, max_tokens=20) == [[1, 2], [4, 0], [3, 5]]
    assert sorted(i for b in length_batches(lengths, 3) for i in b) == list(range(6))


def test_prefix_batches_plan():
    seqs = [[5, 1], [1, 2, 3], [1, 2], [9], [1, 2, 4, 4], [5, 0]]
    # token-id order: [1,2] [1,2,3] [1,2,4,4] [5,0] [5,1] [9]; short prompts share nothing worth a prefix pass,
    # so each batch costs BATCH_COST_TOKENS + rows x longest: 16 + 3 x 4 and 16 + 3 x 2 beat every other cut
    assert prefix_batches(seqs, batch_size=3) == [[2, 1, 4], [5, 0, 3]]
    plan = prefix_batches(seqs, batch_size=3, max_tokens=8)
    assert all(len(b) * max(len(seqs[i]) for i in b) <= 8 for b in plan)
    assert sorted(i for b in prefix_batches(seqs, 2) for i in b) == list(range(6))
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 4]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2, 3]]) == 1  # each keeps a token of its own
    # two groups of four prompts, each group sharing 40 tokens: one batch each (shared prefix computed once),
    # not one batch of eight that shares nothing: 2 x (16 + 40 + 4 x 2) tokens against 16 + 8 x 42
    groups = [[g] * 40 + [t, t] for g in (7, 8) for t in range(4)]
    assert prefix_batches(groups, batch_size=8) == [[0, 1, 2, 3], [4, 5, 6, 7]]


class TokenCounter:
    """Counts the input tokens the real model is run on (a forward pre-hook)."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        self.tokens += kwargs["input_ids"].numel()


@pytest.mark.parametrize("tree", [True, False], ids=["token-tree", "kv-cache"])
def test_shared_prefixes_run_once_and_score_as_a_plain_pass(scorer, tree):
    """Law-school prompts share their preamble: it runs once per batch, and every probability equals a plain pass
    (and the independent unbatched reference). Both ways of sharing: one row holding the prompts' token tree, and
    (for models that fail the tree check) the common prefix's KV cache repeated over the batch."""
    items = law_school.items(law_school.load(data_dir())[:8], load_prompts(), "q_if")
    texts = [render(it.scored_turns()) for it in items]
    seqs = [scorer.encode(t) for t in texts]
    shared = shared_prefix_length(seqs)
    assert shared >= SHARED_PREFIX_MIN
    scorer = Scorer(scorer.model, scorer.tokenizer)
    scorer.tree = tree  # decided, so no check pass is counted
    counter = TokenCounter(scorer.model)
    try:
        got = scorer.score(texts, [it.candidates for it in items], batch_size=8)
    finally:
        counter.handle.remove()
    if tree:  # per batch: each node of the prompts' token trie once
        expected = sum(tree_tokens([seqs[i] for i in b]) for b in scorer.batches(seqs, 8))
    else:  # per batch: the shared tokens once, then each prompt's own tokens, left-padded to the longest
        expected = 0
        for batch in prefix_batches(seqs, batch_size=8, max_tokens=scorer.max_batch_tokens):
            rows = [seqs[i] for i in batch]
            common = shared_prefix_length(rows)
            expected += common + len(rows) * max(len(r) - common for r in rows)
        assert expected == sum(
            forwarded_tokens([seqs[i] for i in b]) for b in prefix_batches(seqs, 8, scorer.max_batch_tokens)
        )
    assert counter.tokens == expected
    assert counter.tokens < sum(len(b) * max(len(seqs[i]) for i in b) for b in prefix_batches(seqs, 8))
    plain = scorer._last_logprobs(seqs, share_prefix=False)
    prefixed = scorer._last_logprobs(seqs, share_prefix=True)
    assert torch.allclose(plain.exp(), prefixed.exp(), atol=1e-5)
    for text, it, s in zip(texts, items, got):
        probs, mass = reference_probs(scorer, text, it.candidates)
        assert s.probs == pytest.approx(probs, abs=1e-5)
        assert s.mass == pytest.approx(mass, rel=1e-4)


def test_token_tree_layout():
    """Hand-built trie of four prompts: depth-first rows, positions restart per branch, masks see ancestors only."""
    seqs = [[1, 2, 3], [1, 2, 4, 5], [7], [1, 2, 3]]
    tree = prefix_tree.pack(seqs)
    # sorted: [1,2,3] [1,2,3] [1,2,4,5] [7] -> nodes 1 2 3 | 4 5 | 7
    assert tree.input_ids == [1, 2, 3, 4, 5, 7]
    assert tree.positions == [0, 1, 2, 2, 3, 0]
    assert tree.parents == [-1, 0, 1, 1, 3, -1]
    assert tree.last == [2, 4, 5, 2]  # the duplicate prompt reads the same node
    visible = tree.attention_mask(torch.float32, "cpu")[0, 0] == 0
    assert visible.tolist() == [
        [True, False, False, False, False, False],
        [True, True, False, False, False, False],
        [True, True, True, False, False, False],
        [True, True, False, True, False, False],  # token 4 sees 1, 2 and itself, not its sibling 3
        [True, True, False, True, True, False],
        [False, False, False, False, False, True],
    ]
    assert prefix_tree.tree_tokens(seqs) == 6
    # two groups of four prompts, each sharing 40 tokens (48 unique tokens per group). A batch costs 16 + unique +
    # unique^2 / (6 x hidden): at hidden 64 one batch of both (16 + 96 + 24 = 136) beats a batch per group
    # (2 x (16 + 48 + 6) = 140); at hidden 8 attention costs more, and a batch per group wins (2 x 112 < 304)
    groups = [[g] * 40 + [t, t] for g in (7, 8) for t in range(4)]
    assert prefix_tree.batch_cost(96, 64) == 136 and prefix_tree.batch_cost(48, 64) == 70
    assert prefix_tree.tree_batches(groups, batch_size=8, hidden_size=64) == [list(range(8))]
    assert prefix_tree.tree_batches(groups, batch_size=8, hidden_size=8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    pairs = prefix_tree.tree_batches(groups, batch_size=3, hidden_size=64, max_tokens=44)
    assert pairs == [[0, 1], [2, 3], [4, 5], [6, 7]]  # 42 + 2 = 44 unique tokens for two prompts, 46 for three


def test_a_model_that_fails_the_tree_check_is_scored_through_the_kv_cache(tiny_model_dir, capsys):
    """A sliding-window Mistral: its own masks cut attention at 8 tokens back, the tree's mask does not, so the check
    fails, the scorer says so and shares prefixes through the KV cache, and scores still equal a plain pass."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_llama(tokenizer, family=(MistralConfig, MistralForCausalLM), sliding_window=8).eval()
    model.config._attn_implementation = "sdpa"
    windowed = Scorer(model, tokenizer)
    items = law_school.items(law_school.load(data_dir())[:4], load_prompts(), "q")
    texts = [render(it.scored_turns()) for it in items]
    got = windowed.score(texts, [it.candidates for it in items], batch_size=8)
    assert windowed.tree is False
    assert "does not score a token-tree row as a plain pass" in capsys.readouterr().err
    for text, it, s in zip(texts, items, got):
        probs, _ = reference_probs(windowed, text, it.candidates)
        assert s.probs == pytest.approx(probs, abs=1e-5)
    model.config.sliding_window = None  # the same weights without the window pass the check
    plain = Scorer(model, tokenizer)
    plain.score(texts[:2], [it.candidates for it in items[:2]])
    assert plain.tree is True


def test_bbq_contexts_share_a_batch(scorer, bbq_items):
    """The two questions of a BBQ context begin alike: token-id order puts them in one batch, scored as before."""
    texts = [render(it.scored_turns()) for it in bbq_items]
    seqs = [scorer.encode(t) for t in texts]
    batches = prefix_batches(seqs, batch_size=4)
    assert max(shared_prefix_length([seqs[i] for i in b]) for b in batches) >= SHARED_PREFIX_MIN
    cands = [it.candidates for it in bbq_items]
    one = scorer.score(texts, cands, batch_size=1)
    four = scorer.score(texts, cands, batch_size=4)
    for a, b in zip(one, four):
        assert a.probs == pytest.approx(b.probs, abs=1e-5)


def test_prompts_longer_than_a_sliding_window_are_never_scored_as_a_tree(tiny_model_dir):
    """A Mistral with a 48-token window passes the tree check on short prompts; law-school prompts are longer than
    its window, so they go through the KV-cache batches and score as a plain (windowed) pass."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_llama(tokenizer, family=(MistralConfig, MistralForCausalLM), sliding_window=48).eval()
    model.config._attn_implementation = "sdpa"
    windowed = Scorer(model, tokenizer)
    short = ["The answer is (", "The answer is not (", "Is the answer (", "No answer is ("]
    windowed.score(short, [("a", "b")] * 4)
    assert windowed.tree is True
    items = law_school.items(law_school.load(data_dir())[:4], load_prompts(), "q")
    texts = [render(it.scored_turns()) for it in items]
    assert min(len(windowed.encode(t)) for t in texts) > 48
    got = windowed.score(texts, [it.candidates for it in items], batch_size=8)
    for text, it, s in zip(texts, items, got):
        probs, _ = reference_probs(windowed, text, it.candidates)
        assert s.probs == pytest.approx(probs, abs=1e-5)
