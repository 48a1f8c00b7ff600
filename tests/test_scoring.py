"""The scoring engine on a tiny random Llama with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch

from selfcorrect.config import data_dir
from selfcorrect.errors import UserError
from selfcorrect.evaluate.benchmarks import bbq, law_school, winogender
from selfcorrect.evaluate.prompts import load_prompts, render
from selfcorrect.evaluate.scoring import Scorer, length_batches
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
