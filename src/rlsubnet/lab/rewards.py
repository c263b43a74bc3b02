"""Exact-match reward for the synthetic tasks, in the signature TRL's GRPOTrainer calls.

A completion is correct when, after dropping the end-of-sequence token and surrounding spaces, it equals the
reference answer exactly: "46" for "12+34=" earns 1.0; "046", "46 " followed by more digits, "4" or an
unfinished completion earn 0.0. No partial credit, no parsing of the first number: the reward is verifiable.
"""

from __future__ import annotations

from collections.abc import Sequence

from rlsubnet.lab.tokenizer import EOS, PAD


def normalise_completion(text: str) -> str:
    """The answer part of a decoded completion: text up to the first <eos>, without pads and outer spaces."""
    text = text.split(EOS, 1)[0]
    return text.replace(PAD, "").strip()


def is_correct(completion: str, answer: str) -> bool:
    return normalise_completion(completion) == answer


def exact_match_reward(completions: Sequence[str], answer: Sequence[str], **_) -> list[float | None]:
    """GRPO reward function: 1.0 for an exact answer, else 0.0 (``answer`` is the dataset column).

    The return type is TRL's for a reward function, where None means "no reward for this completion"; this one
    scores every completion."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answer)]


exact_match_reward.__name__ = "exact_match"  # the name TRL logs the reward under
