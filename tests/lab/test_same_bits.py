"""What makes the demo faster changes no number: prefilling each distinct prompt once, the per-step tracker on one
flat vector, pretraining's validation checks handed to another process, and the optimizer field of a spec that
leaves an AdamW stage's fingerprint as it was. Micro models built from a config; seconds."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from rlsubnet.lab import prefill  # noqa: E402
from rlsubnet.lab.config import StageSpec  # noqa: E402
from rlsubnet.lab.evaluate import generate  # noqa: E402
from rlsubnet.lab.model import build_model, unique_state  # noqa: E402
from rlsubnet.lab.tasks import get_task  # noqa: E402
from rlsubnet.lab.tokenizer import build_tokenizer  # noqa: E402


@pytest.fixture
def micro():
    tok = build_tokenizer()
    return build_model("micro", tok, 0), tok


def _sample(model, tok, n=24, k=4):
    prompts = [p.prompt for p in get_task("add").split("train")[:n]]
    return generate(model, tok, prompts, 4, sample=True, num_return_sequences=k, generator_seed=7)


def test_prefill_once_per_prompt_gives_the_same_samples(micro, monkeypatch):
    model, tok = micro
    monkeypatch.setattr(prefill, "_verified", {})
    plain = _sample(model, tok)
    calls = []
    real = prefill._run_distinct
    monkeypatch.setattr(prefill, "_run_distinct", lambda *a: calls.append(1) or real(*a))
    prefill.dedupe_prefill(model)
    first = _sample(model, tok)  # checks the shortcut against the full prefill, returns the full one
    assert list(prefill._verified.values()) == [True] and len(calls) == 1
    again = _sample(model, tok)  # now takes it
    assert len(calls) == 2
    assert plain == first == again


def test_prefill_shortcut_is_dropped_where_it_would_change_a_bit(micro, monkeypatch):
    model, tok = micro
    monkeypatch.setattr(prefill, "_verified", {})
    plain = _sample(model, tok)
    monkeypatch.setattr(prefill, "_same", lambda *a: False)  # as if the BLAS rounded a row differently
    prefill.dedupe_prefill(model)
    calls = []
    real = prefill._run_distinct
    monkeypatch.setattr(prefill, "_run_distinct", lambda *a: calls.append(1) or real(*a))
    assert _sample(model, tok) == plain and _sample(model, tok) == plain
    assert list(prefill._verified.values()) == [False] and len(calls) == 1  # tried once, then never again


def test_prefill_shortcut_leaves_distinct_prompts_and_training_alone(micro, monkeypatch):
    model, tok = micro
    monkeypatch.setattr(prefill, "_verified", {})
    prefill.dedupe_prefill(model)
    prompts = [p.prompt for p in get_task("add").split("heldout")[:16]]
    generate(model, tok, prompts, 4)  # greedy, every prompt once: nothing to share
    enc = tok(["1+1=", "1+1="], return_tensors="pt")
    model(**enc).logits.sum().backward()  # a forward with gradients is never touched
    assert prefill._verified == {}


def test_flat_step_tracker_counts_as_the_per_tensor_test(micro, tmp_path):
    from rlsubnet.diff.changed import changed_masks
    from rlsubnet.diff.dynamics import DecompositionTracker
    from rlsubnet.lab.stages import STEP_ATOLS, make_callbacks

    model, _ = micro
    base = unique_state(model, torch.bfloat16)
    _, tracker, _ = make_callbacks(model, base, snapshot_dir=tmp_path, snapshot_every=10, total_steps=5)
    reference = DecompositionTracker(base, STEP_ATOLS)
    prev = base
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():  # some entries cross a bf16 step, some cross back
                p.add_(torch.randn(p.shape, generator=gen) * 2e-3 * (-1) ** step)
        tracker.on_step_end(None, SimpleNamespace(global_step=step), None)
        cur = unique_state(model, torch.bfloat16)
        want = [sum(int(m.sum()) for n in base for m in [changed_masks(prev[n], cur[n], STEP_ATOLS)[k]])
                for k in range(len(STEP_ATOLS))]
        got = tracker.records[-1]["changed_vs_previous_step"]
        assert [got[repr(a)] for a in STEP_ATOLS] == want and want[0] > 0
        reference.update(cur)
        prev = cur
    assert [c.to_record() for c in tracker.decomposition.counts()] == [c.to_record() for c in reference.counts()]
    assert reference.counts()[0].returned > 0


class _LateFuture:
    """Done only after being asked a few times: training runs on past the checked step meanwhile."""

    def __init__(self, value, lag: int) -> None:
        self.value, self.lag = value, lag

    def done(self) -> bool:
        self.lag -= 1
        return self.lag < 0

    def result(self):
        return self.value

    def cancel(self) -> bool:
        return True


class _LateExecutor:
    def __init__(self, lag: int) -> None:
        self.lag = lag

    def submit(self, fn, *args):
        return _LateFuture(fn(*args), self.lag)


@pytest.mark.parametrize("max_steps", [30, 12])  # the check comes back during training / at its last step
def test_pretraining_checks_elsewhere_give_the_same_theta0(tmp_path, max_steps):
    from rlsubnet.lab.pretrain import PretrainSpec, run_pretrain

    spec = PretrainSpec(size="micro", tasks=("add",), max_steps=max_steps, eval_every=10, target_accuracy=0.0,
                        batch_size=16, learning_rate=5e-3, warmup_steps=2)
    inline = run_pretrain(spec, tmp_path / "inline", progress=False)
    late = run_pretrain(spec, tmp_path / "late", progress=False, pool=_LateExecutor(lag=3))
    assert inline.record["steps_done"] == late.record["steps_done"] == 10 == late.record["reached_at_step"]
    assert inline.record["curve"] == late.record["curve"]
    assert inline.record["accuracy"] == late.record["accuracy"]
    for f in ("master-fp32.safetensors", "model/model.safetensors"):
        assert (tmp_path / "inline" / f).read_bytes() == (tmp_path / "late" / f).read_bytes()


def test_pretraining_runs_on_its_own_thread_count(tmp_path):
    """The thread count of pretraining is part of its spec (it can change the reduction order, hence θ0): in the
    fingerprint and the settings line, set for the training and restored after; the demo's hook runs once, just
    before the first step."""
    from rlsubnet.errors import UsageError
    from rlsubnet.lab.config import DemoConfig
    from rlsubnet.lab.pipeline import pretrain_spec
    from rlsubnet.lab.pretrain import PretrainSpec, run_pretrain
    from rlsubnet.lab.stages import fingerprint

    assert pretrain_spec(DemoConfig().resolved()).threads == 2  # the small model's pretraining uses both cores
    assert pretrain_spec(DemoConfig(size="micro").resolved()).threads == 1
    assert pretrain_spec(DemoConfig(pretrain_threads=3).resolved()).threads == 3
    one = PretrainSpec(size="micro", tasks=("add",), max_steps=3, eval_every=10, batch_size=8, warmup_steps=1)
    two = dataclasses.replace(one, threads=2)
    assert one.to_json()["threads"] == 1 and two.to_json()["threads"] == 2
    assert fingerprint({"pretrain": one.to_json()}) != fingerprint({"pretrain": two.to_json()})
    assert "2 torch threads" in two.settings_line() and "1 torch thread" in one.settings_line()
    with pytest.raises(UsageError, match="threads must be positive"):
        dataclasses.replace(one, threads=0)
    seen = []
    before = torch.get_num_threads()
    res = run_pretrain(two, tmp_path / "p", progress=False, before_training=lambda: seen.append(torch.get_num_threads()))
    assert seen == [2] and torch.get_num_threads() == before
    assert res.record["spec"]["threads"] == 2 and res.record["versions"]["torch_threads"] == 2


def test_optimizer_field_keeps_adamw_fingerprints():
    from rlsubnet.lab.stages import stage_fingerprint

    # the fingerprints these specs had before a stage could choose its optimizer: finished stages stay reusable
    # (GRPO's changed since with its loss pass, which now runs each prompt once: tests/lab/test_shared_prompts.py)
    assert stage_fingerprint(StageSpec("grpo", "grpo"), "0" * 16, None) == "3db0852340726c20"
    assert stage_fingerprint(StageSpec("sft", "sft", learning_rate=1e-5), "0" * 16, None) == "81ff3e443230f6e6"
    sgd = StageSpec("grpo", "grpo", optimizer="sgd")
    assert "optimizer" not in StageSpec("grpo", "grpo").to_json() and sgd.to_json()["optimizer"] == "sgd"
    assert stage_fingerprint(sgd, "0" * 16, None) != "3db0852340726c20"
    assert "optimizer sgd" in sgd.settings_line()
    json.dumps(sgd.to_json())


def test_sgd_trainer_is_plain_sgd(micro, tmp_path):
    from rlsubnet.errors import UsageError
    from rlsubnet.lab.data import stage_rows
    from rlsubnet.lab.trainers import build_trainer

    model, tok = micro
    spec = StageSpec("s", "sft", data="gold", optimizer="sgd", learning_rate=0.1, steps=2, batch_size=4)
    rows, _ = stage_rows(spec)
    trainer = build_trainer(spec, model, tok, rows, base_dir=tmp_path, output_dir=tmp_path / "t")
    opt = trainer.optimizer
    assert type(opt) is torch.optim.SGD
    assert all(g["momentum"] == 0 and g["lr"] == 0.1 and not g["nesterov"] for g in opt.param_groups)
    with pytest.raises(UsageError, match="--optimizer sgd"):
        build_trainer(spec, model, tok, rows, base_dir=tmp_path, output_dir=tmp_path / "u",
                      optimizer_factory=lambda m, a: None)
