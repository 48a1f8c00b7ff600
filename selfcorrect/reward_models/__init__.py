"""Reward models: training (pairwise or InstructGPT K-wise loss on TRL's RewardTrainer) and scoring.

* :mod:`selfcorrect.reward_models.train` -- ``RewardSection``, ``kwise_loss``, ``KWiseRewardTrainer``, ``run_reward``.
* :mod:`selfcorrect.reward_models.score` -- ``RewardModel`` (a saved reward model or a ``module:function`` reward).
"""
