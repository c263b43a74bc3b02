"""Live sync through a real transformers Trainer on a micro Llama: patches every K steps, anchors every M."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from rlsubnet.patch import PatchError, WrongBaseError, apply_patch_, model_tensors  # noqa: E402
from rlsubnet.patch.chain import record_cursor  # noqa: E402
from rlsubnet.patch.format import PatchFile  # noqa: E402
from rlsubnet.patch.sync import SparseSyncCallback, sync_receive  # noqa: E402

K, M, STEPS = 2, 2, 6


@pytest.fixture(autouse=True)
def pipeline():
    """Once, not once per pipeline mode (conftest): the tests share the module-scoped training run and its
    receiver, and advance the receiver."""
    return "default"


def micro_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def bits_of(model_or_sd) -> dict[str, torch.Tensor]:
    return {n: t.detach().to(torch.bfloat16).view(torch.int16).clone() for n, t in model_tensors(model_or_sd).items()}


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


class Recorder(TrainerCallback):
    """The trainer's weights rounded to bf16 after every optimizer step (the ground truth)."""

    def __init__(self):
        self.states = {}

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.states[state.global_step] = bits_of(model)

    def on_step_end(self, args, state, control, model=None, **kw):
        self.states[state.global_step] = bits_of(model)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sync")
    model = micro_llama(0)
    receiver = copy.deepcopy(model).to(torch.bfloat16)  # an inference worker holding the starting weights
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 64, (16,), generator=g)), "labels": ids} for _ in range(64)]
    args = TrainingArguments(
        output_dir=str(tmp / "trainer"), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=3e-5,
        lr_scheduler_type="constant", weight_decay=0.0, logging_strategy="no", save_strategy="no",
        report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    recorder = Recorder()
    sync = SparseSyncCallback(tmp / "sync", every_steps=K, anchor_every=M)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder, sync]).train()
    index = json.loads((tmp / "sync" / "sync.json").read_text())
    return tmp / "sync", index["entries"], recorder.states, receiver


def test_chain_layout(run):
    _, entries, states, _ = run
    assert [(e["step"], e["kind"]) for e in entries] == [
        (0, "anchor"), (2, "delta"), (4, "delta"), (4, "anchor"), (6, "delta")
    ]
    deltas = [e for e in entries if e["kind"] == "delta"]
    assert deltas[0]["base"] == entries[0]["target"]
    assert all(b["base"] == a["target"] for a, b in zip(deltas, deltas[1:]))
    assert entries[3]["target"] == entries[2]["target"]  # the anchor holds the same state as the patch
    assert sorted(states) == list(range(STEPS + 1))


def test_patches_accumulate_all_k_steps(run):
    sync_dir, entries, states, _ = run
    distinguishes = False
    for e in (e for e in entries if e["kind"] == "delta"):
        p = PatchFile.open(sync_dir / e["file"])
        assert "lm_head.weight" not in p.entries()  # tied to the embedding: listed once
        s, prev = e["step"], e["step"] - K
        for name, entry in p.entries().items():
            want = torch.nonzero((states[s][name] != states[prev][name]).reshape(-1)).reshape(-1)
            last_step_only = torch.nonzero((states[s][name] != states[s - 1][name]).reshape(-1)).reshape(-1)
            got, _ = record_cursor(p, name, 2).take(0, entry["numel"])
            assert torch.equal(torch.from_numpy(got), want), (s, name)
            distinguishes |= not torch.equal(want, last_step_only)
        assert p.manifest["totals"]["changed"] > 0
    assert distinguishes  # the set over K steps is not the set of the last step: the check above can fail


def test_receiver_follows_bit_for_bit(run):
    sync_dir, entries, states, receiver = run
    assert same_bits(bits_of(receiver), states[0])
    later = next(e for e in entries if e["step"] == 4 and e["kind"] == "delta")
    before = bits_of(receiver)
    with pytest.raises(WrongBaseError, match="does not hold the base"):
        apply_patch_(receiver, sync_dir / later["file"])
    assert same_bits(bits_of(receiver), before)  # refused before anything changed
    for e in (e for e in entries if e["kind"] == "delta"):
        new_hash = apply_patch_(receiver, sync_dir / e["file"])
        assert new_hash == e["target"]
        assert same_bits(bits_of(receiver), states[e["step"]]), e["step"]
    assert receiver.lm_head.weight.data_ptr() == receiver.model.embed_tokens.weight.data_ptr()


def test_late_joiner_resyncs_from_the_latest_anchor(run):
    sync_dir, entries, states, _ = run
    fresh = micro_llama(7).to(torch.bfloat16)
    state = sync_receive(fresh, sync_dir)
    assert state.step == STEPS and state.hash == entries[-1]["target"]
    assert same_bits(bits_of(fresh), states[STEPS])
    assert sync_receive(fresh, sync_dir, state) == state  # already up to date: nothing to do


def test_failed_target_check_restores_the_model(run):
    sync_dir, entries, states, _ = run
    model = micro_llama(0).to(torch.bfloat16)
    first = entries[1]
    p = PatchFile.open(sync_dir / first["file"])
    bad = copy.deepcopy(p.manifest)
    changed = [t for t in bad["tensors"] if t["op"] == "delta"]
    assert len(changed) >= 2
    changed[1]["target_hash"] = "0" * 32
    before = bits_of(model)
    with pytest.raises(PatchError, match="did not come out with its target hash; model restored"):
        apply_patch_(model, PatchFile(p.path, bad, p.manifest_sha256, p.nbytes))
    assert same_bits(bits_of(model), before)


def test_patch_between_modules_with_tied_weights():
    base = micro_llama(3).to(torch.bfloat16)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.embed_tokens.weight[5, :4] += 1  # tied: lm_head changes with it
        tuned.model.layers[1].mlp.down_proj.weight.view(torch.int16)[0, ::3] ^= 1
    import tempfile
    from pathlib import Path

    from rlsubnet.patch import create_patch

    with tempfile.TemporaryDirectory() as d:
        p = create_patch(base, tuned, Path(d) / "m.rlpatch")
        assert "lm_head.weight" not in {e["name"] for e in p.manifest["tensors"]}
        receiver = copy.deepcopy(base)
        apply_patch_(receiver, p.path)
    assert same_bits(bits_of(receiver), bits_of(tuned))


def test_rebuilt_folder_loads_with_from_pretrained(tmp_path):
    base = micro_llama(4).to(torch.bfloat16)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.view(torch.int16)[::5, ::3] += 1
    tuned.generation_config.do_sample, tuned.generation_config.temperature = True, 0.6
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    from rlsubnet.patch import apply_patches, create_patch

    p = create_patch(tmp_path / "base", tmp_path / "tuned", tmp_path / "t.rlpatch")
    assert {f["name"]: f["source"] for f in p.manifest["files"]} == {"config.json": "base", "generation_config.json": "patch"}
    apply_patches(tmp_path / "base", [p.path], tmp_path / "out")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert same_bits(bits_of(loaded), bits_of(tuned))
    assert loaded.generation_config.temperature == 0.6
