"""The exact-match reward GRPO optimises and the evaluator counts."""

from __future__ import annotations

import pytest

from rlsubnet.lab.rewards import exact_match_reward, is_correct, normalise_completion


@pytest.mark.parametrize(
    "completion, correct",
    [
        ("46", True),
        ("46<eos>", True),
        ("46<eos><pad><pad>", True),
        (" 46 ", True),
        ("46<eos>7", True),  # nothing after <eos> is part of the answer
        ("046", False),
        ("4", False),
        ("461", False),
        ("46 1", False),
        ("", False),
        ("<eos>46", False),
        ("4<unk>6", False),
    ],
)
def test_exact_match(completion, correct):
    assert is_correct(completion, "46") is correct
    assert exact_match_reward([completion], answer=["46"]) == [1.0 if correct else 0.0]


def test_batch_and_extra_columns():
    # TRL passes every dataset column as a keyword; only `answer` matters
    r = exact_match_reward(["3", "4<eos>", "10"], answer=["3", "5", "10"], prompts=["1+2=", "2+2=", "5+5="])
    assert r == [1.0, 0.0, 1.0]
    assert exact_match_reward.__name__ == "exact_match"


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError):
        exact_match_reward(["1", "2"], answer=["1"])


def test_normalise():
    assert normalise_completion("12<eos>99") == "12"
    assert normalise_completion("<pad>7 ") == "7"
