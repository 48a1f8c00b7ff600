"""selfcorrect: how does RLHF training change a language model's capacity to morally self-correct?"""

__version__ = "0.1.0"
