"""Tasks and splits: the held-out set is a fixed partition that no stage's data ever touches."""

from __future__ import annotations

import json

import pytest

from rlsubnet.errors import UsageError
from rlsubnet.lab.tasks import MIN_HELDOUT, TASKS, get_task, ordered


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_partition_the_problem_space(name):
    task = get_task(name)
    splits = {k: {p.prompt for p in v} for k, v in task.splits.items()}
    assert len(splits["heldout"]) >= MIN_HELDOUT
    assert not splits["heldout"] & splits["train"]
    assert not splits["heldout"] & splits["validation"]
    assert not splits["validation"] & splits["train"]
    assert set().union(*splits.values()) == {p.prompt for p in task.problems}
    assert sum(len(v) for v in task.splits.values()) == len(task.problems)  # no duplicates anywhere


def test_answers_are_right():
    for p in get_task("add").problems[:50]:
        a, b = p.prompt.rstrip("=").split("+")
        assert p.answer == str(int(a) + int(b))
    for p in get_task("sub").problems[:50]:
        a, b = p.prompt.rstrip("=").split("-")
        assert int(p.answer) == int(a) - int(b) >= 0


def test_split_is_fixed_and_digest_is_stable():
    import hashlib

    t = get_task("add")
    # Pinned: the held-out split is recorded with every result, so it may only change on purpose (then every
    # recorded accuracy is on another split). The digest is the documented recipe over the split's prompts.
    assert t.split_digest("heldout") == "d19a4b30753c37c9"
    assert [p.prompt for p in t.split("heldout")[:3]] == ["90+77=", "4+69=", "24+64="]
    recipe = hashlib.sha256("\n".join(p.prompt for p in t.split("heldout")).encode()).hexdigest()[:16]
    assert t.split_digest("heldout") == recipe
    assert t.split_digest("heldout") != t.split_digest("train")
    assert len(t.split("heldout")) == 2000  # 20% of 10,000: fixed by the task, not by any seed


def test_ordered_is_deterministic_and_seeded():
    pool = list(range(10))
    a, b, c = ordered(pool, 25, 1), ordered(pool, 25, 1), ordered(pool, 25, 2)
    assert a == b and a != c and len(a) == 25
    assert sorted(a[:10]) == pool and sorted(a[10:20]) == pool  # whole epochs before any repeat
    with pytest.raises(ValueError):
        ordered([], 3, 0)


def test_unknown_task():
    with pytest.raises(UsageError, match="unknown task 'mul'"):
        get_task("mul")


def test_stage_and_pretraining_data_stay_in_the_training_split():
    from rlsubnet.lab.config import StageSpec
    from rlsubnet.lab.data import stage_rows
    from rlsubnet.lab.pretrain import PretrainSpec, pretrain_rows

    heldout = {p.prompt for t in TASKS.values() for p in t.split("heldout") + t.split("validation")}
    rows = pretrain_rows(PretrainSpec(size="micro", tasks=("add", "sub"), max_steps=400, batch_size=64))
    assert len(rows) == 400 * 64 and not {r["prompt"] for r in rows} & heldout
    for task in TASKS:
        for data, algo in (("prompts", "grpo"), ("gold", "sft")):
            spec = StageSpec("s", algo, task=task, data=data, learning_rate=1e-6, steps=300, batch_size=32)
            rows, rec = stage_rows(spec)
            assert rec["rows"] == 9600 and not {r["prompt"] for r in rows} & heldout


def test_own_samples_from_outside_the_training_split_are_refused():
    from rlsubnet.lab.config import StageSpec
    from rlsubnet.lab.data import stage_rows

    held = get_task("add").split("heldout")[0]
    samples = [{"prompt": held.prompt, "answer": held.answer, "completions": [held.answer, "0"],
                "correct": [True, False], "terminated": [True, True]}]
    spec = StageSpec("d", "dpo", task="add", data="own-pairs", learning_rate=1e-6, steps=1, batch_size=1)
    with pytest.raises(UsageError, match="outside the training split"):
        stage_rows(spec, samples)


def test_dpo_pairs_and_rft_examples_from_own_samples():
    from rlsubnet.lab.data import own_correct_examples, own_pairs

    samples = [
        {"prompt": "1+1=", "answer": "2", "completions": ["3", "21", "2", "2"], "correct": [False, False, True, True],
         "terminated": [False, True, True, True]},
        {"prompt": "1+2=", "answer": "3", "completions": ["3", "3"], "correct": [True, True], "terminated": [True, True]},
        {"prompt": "1+3=", "answer": "4", "completions": ["5", "6"], "correct": [False, False], "terminated": [True, True]},
    ]
    assert own_pairs(samples) == [{"prompt": "1+1=", "chosen": "2", "rejected": "21"}]  # a terminated wrong answer first
    assert own_correct_examples(samples) == [{"prompt": "1+1=", "completion": "2"}, {"prompt": "1+2=", "completion": "3"}]


def test_demo_never_trains_on_heldout(micro_demo):
    out, results = micro_demo
    heldout = {p.prompt for t in TASKS.values() for p in t.split("heldout")}
    seen = set()
    for stage in (out / "stages").iterdir():
        data = stage / "data.jsonl"
        if data.is_file():
            seen |= {json.loads(line)["prompt"] for line in data.read_text().splitlines()}
    seen |= {json.loads(line)["prompt"] for line in (out / "stages" / "samples" / "samples.jsonl").read_text().splitlines()}
    assert seen and not seen & heldout
    for name, st in results["stages"].items():
        for task, acc in st["accuracy"].items():
            assert acc["heldout_digest"] == get_task(task).split_digest("heldout")
            assert acc["bf16"]["n"] == len(get_task(task).split("heldout"))


@pytest.mark.parametrize("name", ["../up", "a/b", "..", "", "x\ny"])
def test_stage_names_are_plain_file_names(name):
    """A stage's name names its folder and its mask files."""
    from rlsubnet.lab.stages import StageSpec

    with pytest.raises(UsageError, match="stage name: .* is not a plain file name"):
        StageSpec(name, "sft", task="add", data="gold", learning_rate=1e-6, steps=1, batch_size=1)
