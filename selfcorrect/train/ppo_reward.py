"""Step 2 of an RLHF step, the score: the reward of each (prompt, response) of a rollout, as the reward was trained to
give it.

The bridge between PPO's episodes and :mod:`selfcorrect.reward_models.score`: a trained reward model scores token ids
(the rollout's own where it shares the policy's vocabulary, else the exchange re-tokenized with its tokenizer), a
function reward gets prompt messages or HH-format prompt strings and the reply texts. What comes back is checked there
(one finite number per response); the trainer turns it into PPO's sequence-level score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from selfcorrect import dialogue as dialogues
from selfcorrect.dialogue import DialogueSpec
from selfcorrect.errors import UserError
from selfcorrect.reward_models.score import RewardModel, call_reward, checked_scores, hh_prompt

if TYPE_CHECKING:
    from selfcorrect.train.ppo_rollout import Rollout

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]


class RolloutReward:
    """The reward of a rollout's episodes.

    ``reward_fn`` is a :class:`~selfcorrect.reward_models.score.RewardModel` (a trained model, or the function a
    reward directory names) or any callable ``f(prompt_messages, reply_texts) -> rewards``; ``name``: how errors name
    it (the config's words). A reward model must share the run's ``dialogue`` format and take ``longest`` tokens
    (prompt + response), checked here: a one-line UserError before anything is sampled.
    """

    def __init__(self, reward_fn: RewardModel | RewardFn, name: str, tokenizer, dialogue: DialogueSpec, longest: int):
        self.reward_fn = reward_fn
        self.name = name
        self.tokenizer = tokenizer
        self.dialogue = dialogue
        self.ids_match = self._check(longest)  # it scores the rollout's token ids as they are

    def _check(self, longest: int) -> bool:
        """A reward model must share the run's dialogue format and fit prompt + response; returns whether it shares
        the policy's vocabulary (then it scores the rollout's token ids as they are)."""
        reward = self.reward_fn
        if not isinstance(reward, RewardModel) or reward.model is None:
            return False
        if reward.dialogue is not None and reward.dialogue != self.dialogue:
            raise UserError(
                f"{reward.source}: the reward model was trained in dialogue {reward.dialogue.describe()}, but this run "
                f"uses {self.dialogue.describe()}"
            )
        if reward.max_length and reward.max_length < longest:
            raise UserError(
                f"ppo: max_prompt_length + max_new_tokens = {longest} tokens is more than the reward model's "
                f"max_length ({reward.max_length}, {reward.source}), which reward training drops; raise "
                "reward.max_length or lower ppo.max_prompt_length / ppo.max_new_tokens"
            )
        return reward.tokenizer.get_vocab() == self.tokenizer.get_vocab()

    def scores(self, roll: Rollout, step: int) -> torch.Tensor:
        """The reward of each (prompt, response) of ``roll``, at RLHF step ``step`` (1-based, for the errors).

        A reward model scores ``prompt ids + reply ids + [EOS]`` in the run's dialogue format, EOS only where the
        policy ended its turn: the rollout's own ids when it shares the policy's vocabulary, else the same exchange
        re-tokenized with its tokenizer. A function reward gets HH-format prompt strings and the reply texts.

        Checked at this boundary: a function's result must be one finite number per response, and a model's scores
        finite; anything else, or an exception inside the reward, is a one-line UserError naming the reward and the
        RLHF step, raised before anything of this step is saved.
        """
        reward, name = self.reward_fn, self.name
        if not isinstance(reward, RewardModel):
            return call_reward(reward, roll.prompts, roll.responses, name, step)
        if reward.model is None:
            assert reward.function is not None  # RewardModel holds a model or a function
            prompts = [hh_prompt(p) for p in roll.prompts]
            return call_reward(reward.function, prompts, list(roll.responses), name, step) + reward.bias
        assert roll.has_eos is not None  # set by the sampler
        eos = [[self.tokenizer.eos_token_id] if ended else [] for ended in roll.has_eos.tolist()]
        if self.ids_match:
            sequences = [p + r + e for p, r, e in zip(roll.prompt_ids, roll.reply_ids, eos)]
        else:
            rm_tok, rm_eos = reward.tokenizer, [reward.tokenizer.eos_token_id]
            sequences = [
                dialogues.prompt_ids(rm_tok, p, self.dialogue)
                + dialogues.reply_ids(rm_tok, text, self.dialogue)
                + (rm_eos if ended else [])
                for p, text, ended in zip(roll.prompts, roll.responses, roll.has_eos.tolist())
            ]
        scores = reward.score_ids(sequences) + reward.bias
        return checked_scores(scores, name, step, dtype=next(reward.model.parameters()).dtype)
