"""Greedy accuracy and sampling for the lab models (batched ``generate`` with left padding)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlsubnet.lab.rewards import is_correct
from rlsubnet.lab.tasks import Problem


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    sample: bool = False,
    num_return_sequences: int = 1,
    generator_seed: int | None = None,
    batch_size: int = 512,
) -> list[str]:
    """Completions (decoded, special tokens kept so that the reward can cut at <eos>), prompt-major order."""
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            if generator_seed is not None:
                torch.manual_seed(generator_seed)
            for start in range(0, len(prompts), batch_size):
                batch = list(prompts[start : start + batch_size])
                enc = tokenizer(batch, return_tensors="pt", padding=True)
                kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_return_sequences,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **kwargs,
                )
                completions = ids[:, enc["input_ids"].shape[1] :]
                out.extend(tokenizer.batch_decode(completions, skip_special_tokens=False))
    finally:
        model.train(was_training)
    return out


def greedy_accuracy(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int) -> dict:
    """Share of problems whose greedy completion is exactly the answer (the reward the trainers optimise)."""
    completions = generate(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    correct = sum(is_correct(c, p.answer) for c, p in zip(completions, problems))
    return {"n": len(problems), "correct": correct, "accuracy": correct / len(problems) if problems else 0.0}
