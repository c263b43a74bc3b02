"""GRPO's loss runs each prompt once for all its completions: the same numbers as the full pass up to float rounding,
only for the calls that look like the loss's, and part of a GRPO stage's fingerprint."""

from __future__ import annotations

import pytest
import torch

from rlsubnet.lab.config import StageSpec
from rlsubnet.lab.model import build_model
from rlsubnet.lab.shared_prompts import _plan, share_prompts
from rlsubnet.lab.stages import stage_fingerprint
from rlsubnet.lab.tokenizer import build_tokenizer

PROMPTS, GENERATIONS, PROMPT_LEN, COMPLETION = 8, 8, 7, 4


def _batch(same_prompts: bool = False, same_first_tokens: bool = False):
    """GRPO's layout: 8 left-padded prompts, each repeated for its 8 completions, then the completions; optionally
    two prompts equal to each other, or every completion starting with the same 2 tokens."""
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, len(tok), (PROMPTS, PROMPT_LEN), generator=g)
    prompts[:3, :2] = tok.pad_token_id  # shorter prompts, padded on the left
    prompts[3, 0] = tok.pad_token_id
    if same_prompts:
        prompts[5] = prompts[6]
    pmask = (prompts != tok.pad_token_id).long()
    comp = torch.randint(3, len(tok), (PROMPTS * GENERATIONS, COMPLETION), generator=g)
    if same_first_tokens:
        comp[:, :2] = comp[0, :2]
    cmask = torch.ones_like(comp)
    cmask[::5, -1] = 0  # some completions end early (right padding)
    ids = torch.cat([prompts.repeat_interleave(GENERATIONS, 0), comp], 1)
    mask = torch.cat([pmask.repeat_interleave(GENERATIONS, 0), cmask], 1)
    return tok, ids, mask


@pytest.fixture()
def batch():
    return _batch()


def _loss_pass(model, ids, mask):
    """The backbone as TRL's fused loss calls it; a loss on the positions that score completion tokens."""
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    scored = hidden[:, PROMPT_LEN - 1 : -1]
    loss = (scored * torch.linspace(-1, 1, scored.shape[-1])).sum(-1).tanh().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return scored.detach(), grads


@pytest.mark.parametrize("case, cut, groups", [
    ("prompts", PROMPT_LEN, PROMPTS),
    ("two prompts alike", PROMPT_LEN, PROMPTS - 1),
    ("completions alike at first", PROMPT_LEN + 2, PROMPTS),
])
def test_shared_prompts_give_the_full_pass_up_to_rounding(monkeypatch, case, cut, groups):
    from rlsubnet.lab import shared_prompts

    tok, ids, mask = _batch(same_prompts=case == "two prompts alike", same_first_tokens=case == "completions alike at first")
    model = build_model("micro", tok, seed=0)
    plan = _plan({"input_ids": ids, "attention_mask": mask, "use_cache": False})
    assert plan is not None
    assert plan[0] == cut and len(plan[1]) == groups  # the longest prefix worth sharing, one run per distinct one
    first, inverse = plan[1], plan[2]
    assert torch.equal(ids[first][inverse, :cut], ids[:, :cut]) and torch.equal(mask[first][inverse, :cut], mask[:, :cut])
    full, full_grads = _loss_pass(model, ids, mask)
    share_prompts(model)
    wrapped = model.model.forward
    share_prompts(model)  # wrapping twice wraps once
    assert model.model.forward is wrapped
    runs = []
    run_shared = shared_prompts._run_shared
    monkeypatch.setattr(shared_prompts, "_run_shared", lambda *a: runs.append(a[2]) or run_shared(*a))
    shared, shared_grads = _loss_pass(model, ids, mask)
    assert runs == [cut]
    assert torch.allclose(shared, full, rtol=1e-5, atol=1e-5)
    for name, g in full_grads.items():
        assert torch.allclose(shared_grads[name], g, rtol=1e-3, atol=1e-6), name
    # with gradient checkpointing the prefix keeps no cache: the full pass, untouched
    model.gradient_checkpointing_enable()
    again, _ = _loss_pass(model, ids, mask)
    assert runs == [cut] and torch.allclose(again, full, rtol=1e-5, atol=1e-5)


def test_a_grpo_stage_runs_its_loss_this_way(micro_demo, tmp_path, monkeypatch):
    """Through TRL's own loss call (its fused LM head calls the backbone): every step of a GRPO stage shares."""
    import dataclasses
    import json

    from rlsubnet.lab import shared_prompts
    from rlsubnet.lab.stages import run_stage

    out, results = micro_demo
    torch.set_num_threads(results["config"]["threads"])
    spec = StageSpec(**json.loads((out / "stages" / "grpo" / "stage.json").read_text())["spec"])
    runs = []
    run_shared = shared_prompts._run_shared
    monkeypatch.setattr(shared_prompts, "_run_shared", lambda *a: runs.append(a[2]) or run_shared(*a))
    res = run_stage(dataclasses.replace(spec, steps=2), base_dir=out / "stages" / "pretrain" / "model",
                    out_dir=tmp_path / "grpo", eval_tasks=["add"], progress=False)
    assert res.record["train_summary"] and len(runs) == 2 and all(c >= 2 for c in runs)


def test_only_the_loss_calls_are_shared(batch):
    tok, ids, mask = batch
    model = build_model("micro", tok, seed=0)
    share_prompts(model)
    # generation asks for a cache; distinct rows have nothing to share; position ids are left alone
    assert _plan({"input_ids": ids, "attention_mask": mask, "use_cache": True}) is None
    assert _plan({"input_ids": ids, "attention_mask": mask}) is None
    # rows that share at most their first token (3 distinct ones): sharing would save 61 token rows, under the 64
    # it takes to pay
    rows = torch.arange(64)
    distinct = torch.stack([rows // len(tok), rows % len(tok), *([rows % 5] * 3)], 1)
    assert _plan({"input_ids": distinct, "attention_mask": torch.ones_like(distinct), "use_cache": False}) is None
    assert _plan({"input_ids": ids, "attention_mask": mask, "use_cache": False, "output_router_logits": True}) is None
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    assert _plan({"input_ids": ids, "attention_mask": mask, "use_cache": False, "position_ids": pos}) is None
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.cache is not None and out.last_hidden_state.shape == (*ids.shape, model.config.hidden_size)


def test_grpo_fingerprints_name_the_shared_loss_pass():
    base = "0" * 16
    grpo, sft = StageSpec("grpo", "grpo"), StageSpec("sft", "sft", learning_rate=1e-5)
    from rlsubnet.lab.stages import GRPO_LOSS_FORWARD, fingerprint

    plain = lambda s: fingerprint({"spec": s.to_json(), "base": base, "samples": None, "extra": {}})  # noqa: E731
    assert stage_fingerprint(grpo, base, None) == fingerprint(
        {"spec": grpo.to_json(), "base": base, "samples": None, "extra": {}, **GRPO_LOSS_FORWARD})
    assert stage_fingerprint(grpo, base, None) != plain(grpo)  # a GRPO stage of the full pass is not reused
    assert stage_fingerprint(sft, base, None) == plain(sft)
