"""A finetuning stage's training rows: drawn from a task's training split, or from θ0's own samples, in an order
that depends only on the stage's data seed (so a re-run sees the same rows in the same order).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from rlsubnet.errors import UsageError
from rlsubnet.lab.config import StageSpec
from rlsubnet.lab.tasks import Problem, get_task, ordered


def _digest_rows(rows: Sequence[dict]) -> str:
    return hashlib.sha256("\n".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()[:16]


def load_samples(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def own_correct_examples(samples: Sequence[dict]) -> list[dict]:
    """Rejection sampling: for every prompt θ0 solved at least once, its first correct sample."""
    out = []
    for s in samples:
        good = [c for c, ok in zip(s["completions"], s["correct"]) if ok]
        if good:
            out.append({"prompt": s["prompt"], "completion": good[0]})
    return out


def own_pairs(samples: Sequence[dict]) -> list[dict]:
    """DPO pairs from θ0's own samples: a correct one (chosen) against an incorrect one (rejected).

    Among incorrect samples, one the policy ended itself (with <eos>) is preferred: DPO appends <eos> to both
    responses, so a truncated sample would become a sequence the policy did not produce.
    """
    out = []
    for s in samples:
        good = [c for c, ok in zip(s["completions"], s["correct"]) if ok]
        bad = [(c, t) for c, ok, t in zip(s["completions"], s["correct"], s["terminated"]) if not ok]
        if good and bad:
            bad.sort(key=lambda ct: not ct[1])  # stable: terminated first, then sampling order
            out.append({"prompt": s["prompt"], "chosen": good[0], "rejected": bad[0][0]})
    return out


def stage_rows(spec: StageSpec, samples: Sequence[dict] | None = None) -> tuple[list[dict], dict]:
    """The stage's training rows in training order, and a record of where they came from.

    Rows are drawn from the task's *training* split only (θ0's samples were taken on training prompts too);
    the order is :func:`rlsubnet.lab.tasks.ordered` under ``data_seed``, so it is the same for every re-run.
    """
    task = get_task(spec.task)
    n = spec.steps * spec.batch_size
    train = task.split("train")
    if spec.data in ("prompts", "gold"):
        pool: list = list(train)
    else:
        if samples is None:
            raise UsageError(f"stage {spec.name}: needs θ0's own samples ({spec.data})")
        train_prompts = {p.prompt for p in train}
        foreign = [s["prompt"] for s in samples if s["prompt"] not in train_prompts]
        if foreign:
            raise UsageError(
                f"stage {spec.name}: samples include prompts outside the training split, e.g. {foreign[0]!r}"
            )
        pool = own_correct_examples(samples) if spec.data == "own-correct" else own_pairs(samples)
        if not pool:
            what = (
                "correct samples"
                if spec.data == "own-correct"
                else "prompts with both a correct and an incorrect sample"
            )
            raise UsageError(
                f"stage {spec.name}: θ0 produced no {what} on the {spec.task} training prompts; "
                "pretrain further (raise --pretrain-target or --pretrain-max-steps)"
            )
    chosen = ordered(pool, n, spec.effective_data_seed)
    rows = []
    for item in chosen:
        if isinstance(item, Problem):
            rows.append(
                {"prompt": item.prompt, "answer": item.answer}
                if spec.data == "prompts"
                else {"prompt": item.prompt, "completion": item.answer}
            )
        else:
            rows.append(dict(item))
    record = {
        "source": spec.data,
        "split": "train",
        "rows": len(rows),
        "pool": len(pool),
        "unique_prompts": len({r["prompt"] for r in rows}),
        "epochs": len(rows) / len(pool),
        "digest": _digest_rows(rows),
    }
    return rows, record


def sft_features(rows: Sequence[dict], tokenizer) -> dict[str, list]:
    """Pre-tokenised SFT examples with the loss on the completion (and <eos>) only.

    Tokenising here rather than in SFTTrainer keeps a 100k-row pretraining set from spending most of the demo's
    time in ``datasets.map``; the trainer's collator, loss and loop are TRL's own.
    """
    prompts = _encode([r["prompt"] for r in rows], tokenizer, True)
    completions = _encode([r["completion"] + tokenizer.eos_token for r in rows], tokenizer, False)
    input_ids = [p + c for p, c in zip(prompts, completions)]
    labels = [[-100] * len(p) + c for p, c in zip(prompts, completions)]
    return {"input_ids": input_ids, "labels": labels}


def _encode(texts: Sequence[str], tokenizer, special: bool) -> list[list[int]]:
    """Token ids of every text, each distinct text encoded once: pretraining's 128k rows repeat ~10k problems, and
    encoding them all took ~7 s of the time before its first step."""
    distinct = list(dict.fromkeys(texts))
    ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=special)["input_ids"]))
    return [list(ids[t]) for t in texts]
