"""Rewards checked at the boundary (issue 22, point 3): a reward's result must be one finite number per response;
anything else, or an exception inside the reward, is a one-line error naming the reward, the RLHF step and what came
back, and nothing after the last good step is kept (a rerun with the reward fixed resumes from ``last/``)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_ppo_trainer
from test_ppo import checkpoint_steps, write_config

from selfcorrect.cli import main
from selfcorrect.errors import UserError
from selfcorrect.reward_models.score import (
    RewardModel,
    call_reward,
    checked_rewards,
    checked_scores,
    reward_label,
)

# The runs' reward: good for its first GOOD_CALLS calls in this process, then FAULT (None: fixed). The tests set
# these module attributes; the function reads them at every call.
FAULTY = """
import math
import torch

FAULT, GOOD_CALLS, CALLS = None, 0, 0


def reward(prompts, responses):
    global CALLS
    CALLS += 1
    n = len(responses)
    if FAULT is None or CALLS <= GOOD_CALLS:
        return [0.1 * i for i in range(n)]
    if FAULT == "raises":
        raise RuntimeError("reward server unreachable\\nwhile posting the responses")
    if FAULT == "wrong_length":
        return [0.5] * (n - 1)
    if FAULT == "string":
        return "0.5"
    if FAULT == "none":
        return None
    if FAULT == "nan":
        return [0.0, math.nan] + [0.0] * (n - 2)
    if FAULT == "inf":
        values = torch.zeros(n)
        values[2] = math.inf
        return values
    if FAULT == "two_d":
        return torch.zeros(n, 1)
    if FAULT == "element":
        return [0.1, 0.2, "high"] + [0.4] * (n - 3)
    if FAULT == "bools":
        return [True] * n
"""
SPEC = "faulty_reward:reward"
FAULTS = {  # fault: what the error says came back (rollout_batch_size 4: 4 responses per step)
    "raises": "raised at RLHF step 2: RuntimeError: reward server unreachable",
    "wrong_length": "at RLHF step 2: returned 3 values for 4 responses",
    "string": "at RLHF step 2: returned a str ('0.5')",
    "none": "at RLHF step 2: returned None",
    "nan": "at RLHF step 2: returned NaN at index 1",
    "inf": "at RLHF step 2: returned inf at index 2",
    "two_d": "at RLHF step 2: returned a 2-D tensor of shape (4, 1)",
    "element": "at RLHF step 2: returned a str ('high') at index 2",
    "bools": "at RLHF step 2: returned a bool (True) at index 0",
}
# 3 short RLHF steps, every one kept; last/ only every 10 steps, so the last/ at step 1 that the failed run leaves is
# the one saved when its reward failed (packing off: its check is not what these tests are about).
STEPS = {"steps": 3, "save_at_steps": [0, 1, 2, 3], "save_last_every": 10, "max_new_tokens": 2, "packing": False}


def the_error(err: str) -> str:
    """The error line: the last line of stderr, and the only one of the CLI's (anything above it is the run's log)."""
    lines = err.strip().splitlines()
    assert [line for line in lines if line.startswith("selfcorrect:")] == lines[-1:], err
    return lines[-1]


def last_step(out: Path) -> int:
    return json.loads((out / "ppo" / "last" / "state.json").read_text())["state"]["step"]


def assert_kept_up_to_step_1(out: Path) -> None:
    """Nothing after the last good step (1): kept checkpoints 0 and 1, ``last/`` at step 1, no temporary leftovers."""
    assert checkpoint_steps(out) == ["step-000000", "step-000001"]
    assert last_step(out) == 1
    assert [p.name for p in (out / "ppo").iterdir() if p.name.startswith(".") or "tmp" in p.name] == []


@pytest.fixture(scope="module")
def faulty_reward(tmp_path_factory):
    """The module ``faulty_reward`` (in a directory of its own, on ``sys.path`` while this test module runs)."""
    where = tmp_path_factory.mktemp("faulty-reward")
    (where / "faulty_reward.py").write_text(FAULTY)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(where))
        yield importlib.import_module("faulty_reward")
    sys.modules.pop("faulty_reward", None)


def set_fault(module, fault: str | None, good_calls: int = 0) -> None:
    module.FAULT, module.GOOD_CALLS, module.CALLS = fault, good_calls, 0


@pytest.fixture(scope="module")
def failed_at_step_2(peaked_policy_dir, tmp_path_factory, faulty_reward) -> tuple[Path, str]:
    """A run whose reward raised at RLHF step 2 (step 1 good): its output directory and its stderr."""
    where = tmp_path_factory.mktemp("failed-at-step-2")
    out = where / "run"
    config = write_config(where, peaked_policy_dir, out, reward_model=SPEC, **STEPS)
    set_fault(faulty_reward, "raises", good_calls=1)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["ppo", str(config)]) == 2
    assert faulty_reward.CALLS == 2
    return out, err.getvalue()


def rerun_copy(failed: Path, tmp_path: Path, policy: Path) -> tuple[Path, Path]:
    """A copy of the failed run (output directory and config), to rerun: it resumes from its ``last/``."""
    out = tmp_path / "run"
    shutil.copytree(failed, out)
    return write_config(tmp_path, policy, out, reward_model=SPEC, **STEPS), out


def test_a_reward_raising_at_step_2_is_one_line_and_step_1_is_kept(failed_at_step_2):
    out, err = failed_at_step_2
    assert the_error(err) == f"selfcorrect: error: reward {SPEC}: {FAULTS['raises']}"  # its first line only
    assert_kept_up_to_step_1(out)


@pytest.mark.parametrize("fault", sorted(set(FAULTS) - {"raises"}))
def test_a_bad_reward_is_one_line_naming_it_and_the_step(
    failed_at_step_2, faulty_reward, peaked_policy_dir, tmp_path, capsys, fault
):
    """The failed run rerun (resumed after step 1) with a reward that goes wrong at once, at step 2, in another way."""
    config, out = rerun_copy(failed_at_step_2[0], tmp_path, peaked_policy_dir)
    set_fault(faulty_reward, fault)
    assert main(["ppo", str(config)]) == 2
    assert faulty_reward.CALLS == 1
    error = the_error(capsys.readouterr().err)
    assert error.startswith(f"selfcorrect: error: reward {SPEC}: ") and FAULTS[fault] in error, error
    assert len(error) < 200, error  # long reprs are cut short
    assert_kept_up_to_step_1(out)


def test_a_rerun_with_the_reward_fixed_resumes_from_the_last_good_step(
    failed_at_step_2, faulty_reward, peaked_policy_dir, tmp_path
):
    config, out = rerun_copy(failed_at_step_2[0], tmp_path, peaked_policy_dir)
    set_fault(faulty_reward, None)
    assert main(["ppo", str(config)]) == 0
    assert faulty_reward.CALLS == 2  # steps 2 and 3 only: resumed from last/, not started again
    assert checkpoint_steps(out) == ["step-000000", "step-000001", "step-000002", "step-000003"]
    state = json.loads((out / "ppo" / "last" / "state.json").read_text())["state"]
    assert state["step"] == 3 and len(state["history"]) == 3 and state["episodes"] == 12


def test_a_reward_model_scoring_nan_names_the_model_and_the_step(peaked_policy_dir, tmp_path):
    """A reward model's scores are checked too (NaN or inf: a 16-bit overflow, typically)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(peaked_policy_dir)
    model = AutoModelForSequenceClassification.from_pretrained(peaked_policy_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    reward = RewardModel(model, tok, source="runs/x/reward")
    trainer = make_ppo_trainer(peaked_policy_dir, tmp_path / "run", reward, steps=1, save_at_steps=[])
    with pytest.raises(UserError) as caught:
        trainer.train()
    assert str(caught.value) == (
        "reward model runs/x/reward: at RLHF step 1: scored NaN at index 0 (its weights in torch.float32)"
    )
    assert not (tmp_path / "run" / "last").exists() and not (tmp_path / "run" / "checkpoints").exists()


# ---- the checking function ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        [1, 0, -2],
        (1.0, 0.0, -2.0),
        [np.float32(1), np.int64(0), -2.0],
        [torch.tensor(1.0), torch.tensor(0), np.array(-2.0)],
        np.array([1, 0, -2]),
        np.array([1.0, 0.0, -2.0]),
        torch.tensor([1.0, 0.0, -2.0], dtype=torch.float16),
        torch.tensor([1, 0, -2]),
        torch.tensor([1.0, 0.0, -2.0], requires_grad=True),
    ],
    ids=lambda v: type(v).__name__,
)
def test_accepted_rewards(values):
    rewards = checked_rewards(values, 3, "m:f", 1)
    assert rewards.dtype == torch.float32 and rewards.shape == (3,) and rewards.tolist() == [1.0, 0.0, -2.0]
    assert not rewards.requires_grad


@pytest.mark.parametrize(
    ("values", "said"),
    [
        (None, "returned None"),
        ("0.5", "returned a str ('0.5')"),
        (b"0.5", "returned a bytes (b'0.5')"),
        ("x" * 500, "returned a str ('xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...)"),
        (0.5, "returned a float (0.5)"),
        ({"a": 1.0}, "returned a dict ({'a': 1.0})"),
        ((x for x in [1.0]), "returned a generator"),
        ([1.0], "returned 1 value for 2 responses"),
        ([1.0, 2.0, 3.0], "returned 3 values for 2 responses"),
        ([1.0, None], "returned None at index 1"),
        ([[1.0], [2.0]], "returned a list ([1.0]) at index 0"),
        ([1.0, True], "returned a bool (True) at index 1"),
        ([1.0, np.bool_(False)], "returned a bool (np.False_) at index 1"),
        ([1.0, 1j], "returned a complex (1j) at index 1"),
        ([1.0, "x\ny" * 40], "returned a str ('x\\nyx\\nyx\\ny"),  # one line, cut short
        ([1.0, float("-inf")], "returned -inf at index 1"),
        ([1.0, 1e300], "returned 1e+300 at index 1: beyond float32's range"),
        ([1.0, 10**400], "returned 1000000000000000000000000000000000000... at index 1: beyond float range"),
        (torch.tensor(1.0), "returned a 0-D tensor of shape ()"),
        (np.zeros((2, 1)), "returned a 2-D array of shape (2, 1)"),
        (torch.tensor([True, False]), "returned a tensor of dtype torch.bool"),
        (np.array(["1", "2"]), "returned an array of dtype <U1"),
        (np.array([1.0, np.nan]), "returned NaN at index 1"),
    ],
)
def test_refused_rewards(values, said):
    with pytest.raises(UserError) as caught:
        checked_rewards(values, 2, "m:f", 4)
    message = str(caught.value)
    assert message.startswith("reward m:f: at RLHF step 4: " + said), message
    assert "\n" not in message and len(message) < 200


def test_an_exception_inside_the_reward_is_reported_with_its_own_message():
    def boom(prompts, responses):
        raise ValueError("bad token 'x'\nsecond line")

    with pytest.raises(UserError) as caught:
        call_reward(boom, ["p"], ["r"], "m:boom", 7)
    assert str(caught.value) == "reward m:boom: raised at RLHF step 7: ValueError: bad token 'x'"
    assert isinstance(caught.value.__cause__, ValueError)
    with pytest.raises(UserError, match=r"^reward m:f: raised: KeyError: 'k'$"):
        call_reward(lambda p, r: {}["k"], ["p"], ["r"], "m:f")
    with pytest.raises(UserError, match=r"^reward m:f: raised: RuntimeError$"):
        call_reward(lambda p, r: (_ for _ in ()).throw(RuntimeError()), ["p"], ["r"], "m:f")
    assert call_reward(lambda p, r: [len(x) for x in r], ["p", "q"], ["ab", "c"], "m:f").tolist() == [2.0, 1.0]


def test_reward_model_scores_and_labels():
    assert checked_scores(torch.tensor([0.5, -1.0]), "rm", 2) is not None
    with pytest.raises(UserError, match=r"^reward model rm: at RLHF step 2: scored inf at index 1 \(its weights in "):
        checked_scores(torch.tensor([0.5, float("inf")], dtype=torch.bfloat16), "rm", 2, torch.bfloat16)

    def my_reward(prompts, responses):
        return [0.0] * len(responses)

    assert reward_label(my_reward) == f"{__name__}:test_reward_model_scores_and_labels.<locals>.my_reward"
    assert reward_label(RewardModel(function=my_reward, source="mod:fn")) == "mod:fn"


def test_the_recipe_names_the_reward_as_the_config_does(peaked_policy_dir, tmp_path, faulty_reward):
    """``module:function`` as written; a reward directory by its path, with the function its manifest names."""
    from types import SimpleNamespace

    from selfcorrect.config.run import load_run_config
    from selfcorrect.recipes.ppo import PPORecipe
    from selfcorrect.rundir import REWARD_MANIFEST

    reward_dir = tmp_path / "reward"
    reward_dir.mkdir()
    (reward_dir / REWARD_MANIFEST).write_text(json.dumps({"function": SPEC, "bias": 0.0}))
    function = SimpleNamespace(function=faulty_reward.reward)
    for ref, name in [(SPEC, SPEC), (str(reward_dir), f"{reward_dir} ({SPEC})")]:
        config = write_config(tmp_path, peaked_policy_dir, tmp_path / "run", reward_model=ref, **STEPS)
        assert PPORecipe(load_run_config(config), config)._reward_name(function) == name
    assert PPORecipe(load_run_config(config), config)._reward_name(SimpleNamespace(function=None)) == str(reward_dir)
