"""`rlsubnet train {grpo,dpo,sft} --mask M` on a lab micro model (built offline from a config)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")
lab_model = pytest.importorskip("rlsubnet.lab.model")
lab_tokenizer = pytest.importorskip("rlsubnet.lab.tokenizer")

from rlsubnet.checkpoint import open_checkpoint  # noqa: E402
from rlsubnet.cli.main import main  # noqa: E402
from rlsubnet.masks import Mask, random_mask  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lab") / "base"
    tok = lab_tokenizer.build_tokenizer()
    lab_model.save_model(lab_model.build_model("micro", tok, 0), d, torch.bfloat16, tokenizer=tok)
    return d


def _mask_file(base, path, **kw):
    ck = open_checkpoint(base)
    m = random_mask({n: ck.infos[n].shape for n in ck.names()}, density=0.3, seed=2, **kw)
    t = {n: m.tensor(n) for n in m.names()}
    for n in t:
        if "norm" in n:
            t[n][:] = False
    return Mask.from_bool(t, {"kind": "changed", "atol": 1e-5, "dtype": "bf16"}).save(path)


@pytest.mark.parametrize("state", ["sparse", "dense"])
def test_masked_sft_stage(base, tmp_path, capsys, state):
    mask_path = _mask_file(base, tmp_path / "m.safetensors")
    out = tmp_path / "sub"
    rc = main(["train", "sft", "--base", str(base), "--out", str(out), "--mask", str(mask_path), "--lr", "1e-3",
               "--steps", "2", "--batch-size", "8", "--weight-decay", "0.1", "-q", "--optimizer-state", state])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "0 of" in text and "entries moved" in text
    report = json.loads((out / "mask.json").read_text())
    assert report["check"]["frozen_entries_moved"] == 0 and report["check"]["frozen_entries_checked"] > 0
    assert report["optimizer"]["steps"] == 2
    assert ("state_bytes" in report["optimizer"]) == (state == "sparse")
    stage = json.loads((out / "stage.json").read_text())
    assert stage["extra"]["mask"]["optimizer_state"] == state
    assert stage["extra"]["mask"]["bits_sha256"] == Mask.load(mask_path).bits_sha256()
    # trained inside the mask, bit-identical outside (fp32 masters against θ0 upcast)
    mask = Mask.load(mask_path)
    b, m = open_checkpoint(base), open_checkpoint(out / "master-fp32.safetensors")
    inside = outside = 0
    for name in m.names():
        diff = b.read(name).float().view(torch.int32) != m.read(name).view(torch.int32)
        t = mask.tensor(name)
        inside += int((diff & t).sum())
        outside += int((diff & ~t).sum())
    assert outside == 0 and inside > 0.5 * mask.changed


def test_a_mask_for_another_model_fails_cleanly(base, tmp_path, capsys):
    bad = Mask.from_bool({"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)}).save(tmp_path / "bad.safetensors")
    out = tmp_path / "sub"
    rc = main(["train", "sft", "--base", str(base), "--out", str(out), "--mask", str(bad), "--steps", "1",
               "--batch-size", "4", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "rlsubnet: error:" in err and "does not fit this model" in err
    assert not out.exists()  # no half-written stage


def test_model_options_do_not_apply_to_a_lab_stage(base, tmp_path, capsys):
    rc = main(["train", "grpo", "--base", str(base), "--out", str(tmp_path / "x"), "--reward", "m:f", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "--reward applies to --model" in err and len(err.strip().splitlines()) == 1


def test_train_needs_samples_for_own_data(base, tmp_path, capsys):
    rc = main(["train", "dpo", "--base", str(base), "--out", str(tmp_path / "x"), "-q"])
    assert rc == 2 and "--samples" in capsys.readouterr().err


def _train_namespace(argv):
    import argparse

    from rlsubnet.cli import train

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_stage_flags_come_from_the_stage_spec():
    """Every StageSpec field the command line may set is a flag with the spec's default; the per-algorithm data and
    β are filled in by the spec itself, so a spec built from flags fingerprints like one built in Python."""
    import dataclasses

    from rlsubnet.cli.config_args import from_args
    from rlsubnet.lab.config import StageSpec
    from rlsubnet.lab.stages import stage_fingerprint

    ns = _train_namespace(["dpo", "--base", "b", "--out", "o"])
    spec = from_args(StageSpec, ns, name="dpo")
    assert spec == StageSpec("dpo", "dpo")
    assert (spec.data, spec.beta, spec.learning_rate, spec.steps, spec.task) == ("own-pairs", 0.1, 1e-6, 100, "add")
    assert stage_fingerprint(spec, "b", None) == stage_fingerprint(
        StageSpec("dpo", "dpo", task="add", data="own-pairs", learning_rate=1e-6, steps=100, beta=0.1), "b", None)
    on_cli = {f.name for f in dataclasses.fields(StageSpec) if f.metadata.get("cli") is not False} - {"name"}
    assert on_cli <= set(vars(ns))
    spec = from_args(StageSpec, _train_namespace(["grpo", "--base", "b", "--out", "o", "--lr", "1e-3", "--beta", "0.04"]),
                     name="g")
    assert (spec.learning_rate, spec.beta, spec.data) == (1e-3, 0.04, "prompts")


@pytest.mark.parametrize("args, message", [
    (["--compare-dtype", "fp16"], "unknown --compare-mode 'fp16' (choose from bf16, fp32, native)"),
    (["--task", "mul"], "unknown --task 'mul'"),
    (["--eval-task", "add", "--eval-task", "div"], "unknown --eval-task 'div'"),
    (["--data", "gold"], "--data 'gold' does not fit grpo"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "0"], "--lr must be a finite, positive number"),
])
def test_bad_stage_options(base, tmp_path, capsys, args, message):
    out = tmp_path / "x"
    rc = main(["train", "grpo", "--base", str(base), "--out", str(out), "-q", *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
