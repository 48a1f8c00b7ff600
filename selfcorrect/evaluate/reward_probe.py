"""The reward-model probe: a benchmark's answer candidates scored by a reward model instead of read from a policy.

``selfcorrect probe REWARD --output DIR`` runs the evaluation of :mod:`selfcorrect.evaluate.runner` with a
:class:`RewardScorer` in place of the policy's :class:`~selfcorrect.evaluate.scoring.Scorer`. For each item of a
Q-type condition the reward model sees one finished exchange per answer candidate:

* the prompt: the item's Human turn under the condition (the same text the policy is asked), in the reward
  model's recorded dialogue format;
* the reply: the condition's assistant prefix followed by the candidate, e.g. ``The answer is (a`` for BBQ --
  exactly the text whose next token the policy's readout reads -- then the end-of-turn (EOS) token, as in reward
  training (:func:`selfcorrect.dialogue.example_ids`).

The candidates' rewards r_1..r_k, softmaxed, stand where the policy's renormalised probabilities stand: under a
Bradley-Terry reward model, exp(r_i) / sum_j exp(r_j) is the probability that it prefers reply i to the others.
The benchmark's own metrics follow unchanged (BBQ bias scores of the preferred answer, Winogender's correlation of
the female-pronoun preference with the BLS share, law school's parity difference of the preference for "yes"),
and so do the paired ``q_if_minus_q`` rows. The softmax is invariant to the reward model's normalising bias, so
the bias plays no part. Each item's raw rewards are kept in its results line (``rewards``); the candidates' raw
probability mass has no meaning here, so ``candidate_mass`` is not reported. CoT conditions do not apply: the
reasoning would be a policy's.

A reward is a ``selfcorrect reward`` output directory (a scalar-head sequence classifier) or a ``module:function``
reward (:mod:`selfcorrect.reward_models.score`), which receives the HH-format prompt and the reply text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Sequence
from pathlib import Path

from selfcorrect import dialogue as dialogues
from selfcorrect.config.reward import FUNCTION_SPEC
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.evaluate.prompts import ItemPrompt
from selfcorrect.evaluate.scoring import Score
from selfcorrect.reward_models.score import RewardModel
from selfcorrect.rundir import REWARD_MANIFEST


def reward_fingerprint(spec: str) -> str:
    """A content identity of a reward: a reward-model directory as :func:`selfcorrect.models.fingerprint` (plus its
    manifest), a ``module:function`` reward by its name and its module's source."""
    from selfcorrect.models import fingerprint

    path = Path(spec).expanduser()
    digest = hashlib.sha256()
    if path.is_dir():
        digest.update(fingerprint(str(path)).encode())
        manifest = path / REWARD_MANIFEST
        if manifest.is_file():
            digest.update(manifest.read_bytes())
        return digest.hexdigest()[:16]
    digest.update(f"function:{spec}".encode())
    if FUNCTION_SPEC.match(spec):
        module = importlib.util.find_spec(spec.split(":")[0])
        if module is not None and module.origin and Path(module.origin).is_file():
            digest.update(Path(module.origin).read_bytes())
    return digest.hexdigest()[:16]


def softmax(rewards: Sequence[float]) -> list[float]:
    """Preference probabilities of candidates with these rewards (exp(r_i) / sum_j exp(r_j), computed stably)."""
    top = max(rewards)
    weights = [math.exp(r - top) for r in rewards]
    total = sum(weights)
    return [w / total for w in weights]


class RewardScorer:
    """What the evaluation runner asks of a scorer, answered by a reward model: token ids of a rendered prompt (for
    batching and for sharing work out), batches, and a :class:`Score` per item."""

    max_batch_tokens = None

    def __init__(self, reward: RewardModel, dialogue: DialogueSpec):
        self.reward = reward
        self.dialogue = dialogue

    def encode(self, text: str) -> list[int]:
        """Token ids of a rendered prompt in the reward model's tokenizer (a function reward: one per character)."""
        if self.reward.tokenizer is None:
            return [0] * len(text)
        return dialogues.encode(self.reward.tokenizer, text, self.dialogue)

    def candidate_ids(self, text: str, candidates: Sequence[str]) -> list[tuple[int, ...]]:
        """Nothing to check: a reward model reads whole replies, so candidates need not be single tokens."""
        return []

    def batches(self, seqs: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
        """Items in order, ``batch_size`` at a time (each item is one exchange per candidate)."""
        return [list(range(i, min(i + batch_size, len(seqs)))) for i in range(0, len(seqs), batch_size)]

    def too_long(self, items: Sequence[ItemPrompt]) -> int:
        """How many of ``items`` have an exchange longer than the reward model's ``max_length`` (reward training drops
        such examples, so it never saw one; they are not scored). 0 for a function reward."""
        reward = self.reward
        if reward.tokenizer is None or not reward.max_length:
            return 0
        count = 0
        for item in items:
            reply = item.assistant + max(item.candidates, key=len)
            prompt = [{"role": "user", "content": item.human}]
            ids, _ = dialogues.example_ids(reward.tokenizer, prompt, reply, self.dialogue)
            count += len(ids) > reward.max_length
        return count

    def score_items(
        self, items: Sequence[ItemPrompt], texts: Sequence[str], batch_size: int, token_ids=None
    ) -> list[Score]:
        """Each item's candidates as finished replies, scored by the reward; their softmax, and the raw rewards."""
        prompts, replies = [], []
        for item in items:
            for candidate in item.candidates:
                prompts.append([{"role": "user", "content": item.human}])
                replies.append(item.assistant + candidate)
        rewards = self.reward.score(prompts, replies, batch_size=batch_size, dialogue=self.dialogue).tolist()
        scores, start = [], 0
        for item in items:
            mine = [float(r) for r in rewards[start : start + len(item.candidates)]]
            start += len(item.candidates)
            scores.append(Score(probs=softmax(mine), mass=None, rewards=mine))
        return scores
