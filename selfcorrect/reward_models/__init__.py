"""Reward models at inference: scoring (prompt, response) pairs with a saved reward model or a reward function.

* :mod:`selfcorrect.reward_models.score` -- ``RewardModel`` (a saved reward model or a ``module:function`` reward).

Training them is :mod:`selfcorrect.train.reward`; this package imports nothing from :mod:`selfcorrect.train`.
"""
