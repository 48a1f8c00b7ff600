"""A Trainer callback shared by the SFT and reward-model stages: stop at the first loss that is NaN or infinite."""

from __future__ import annotations

import math

from transformers import TrainerCallback


class NonFiniteLossGuard(TrainerCallback):
    """Stops training as soon as a logged loss is NaN or infinite; ``bad`` holds ``(step, loss)`` of the first one.

    The stage then raises a one-line UserError and leaves no output (a diverged model is never saved as a result).
    """

    def __init__(self) -> None:
        self.bad: tuple[int, float] | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)) and self.bad is None:
            self.bad = (state.global_step, float(loss))
            control.should_training_stop = True
