"""Reward functions for the `rlsubnet train --reward MODULE:FUNCTION` tests (a module the CLI imports by name)."""


def count_ones(completions, **kwargs):
    """TRL's reward signature: one float per completion."""
    return [float(c.count("1")) for c in completions]


def exact(completions, answer, **kwargs):
    """Uses a dataset column (``answer``), as TRL passes every extra column by name."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def positional_only(completions, /):
    return [0.0 for _ in completions]


def no_kwargs(completions, prompts):
    return [0.0 for _ in completions]


NOT_A_FUNCTION = 3
