"""The demo's subnetwork phase: masked re-runs keep frozen masters bit-identical, results.json's identity
and overlap sections agree with a recomputation from the files, and worker processes change no number."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.masks import Mask, build_mask, identity, overlap, random_mask


def _read(path):
    with open_checkpoint(str(path)) as ck:
        return {n: ck.read(n) for n in ck.names()}


def _theta0(out):
    return out / "stages" / "pretrain" / "model"


@pytest.mark.parametrize("run, mask_file", [("grpo-subnet", "grpo"), ("grpo-random", "random-like-grpo"),
                                            ("dpo-subnet", "dpo"), ("dpo-random", "random-like-dpo"),
                                            ("grpo-predicted", "predicted-grpo")])
def test_demo_reruns_leave_frozen_masters_bit_identical(micro_demo, run, mask_file):
    """Outside the mask it trained on, every fp32 master of a re-run is θ0's bf16 value, bit for bit (checked here
    directly, not with the pipeline's checker), and the pipeline reported the same count."""
    out, results = micro_demo
    mask = Mask.load(out / "masks" / f"{mask_file}.mask.safetensors")
    base = _read(_theta0(out) / "model.safetensors")
    master = _read(out / "stages" / run / "master-fp32.safetensors")
    frozen_total = moved_inside = 0
    for name, b in base.items():
        frozen = ~mask.tensor(name)
        m = master[name]
        assert m.dtype == torch.float32
        same = b.to(torch.float32).view(torch.int32) == m.view(torch.int32)
        assert bool(same[frozen].all()), f"{run}: {name} moved outside the mask"
        frozen_total += int(frozen.sum())
        moved_inside += int((~same & ~frozen).sum())
    assert moved_inside > 0  # the run did train inside its mask
    alg = run.split("-")[0]
    row = next(r for r in results["subnetwork"]["reruns"][alg]["rows"] if r["run"] == run)
    assert row["frozen_masters"]["frozen_entries_checked"] == frozen_total == mask.numel - mask.changed
    assert row["frozen_masters"]["frozen_entries_moved"] == 0
    rec = json.loads((out / "stages" / run / "stage.json").read_text())
    assert rec["extra"]["mask"]["bits_sha256"] == mask.bits_sha256()
    assert rec["after_train"]["mask"]["trainable"] == mask.changed and rec["after_train"]["mask"]["steps"] == 4


def test_masked_stage_with_weight_decay_keeps_frozen_masters(micro_demo, tmp_path):
    """A unit check of the re-run path itself, with weight decay (which would move frozen fp32 weights if it were not
    masked) and a random half mask: frozen masters bit-identical, trained ones moved."""
    import dataclasses

    from rlsubnet.lab.config import DemoConfig
    from rlsubnet.lab.pipeline import finetune_specs
    from rlsubnet.lab.subnet import run_masked_stage
    from rlsubnet.train import check_frozen_masters

    out, results = micro_demo
    spec = {s.name: s for s in finetune_specs(DemoConfig(**results["config"]))}["sft"]
    spec = dataclasses.replace(spec, steps=2, weight_decay=0.1, learning_rate=1e-3)
    shapes = Mask.load(out / "masks" / "grpo.mask.safetensors").shapes
    mask = random_mask(shapes, density=0.5, seed=3)
    mask.meta["dtype"] = "bf16"
    path = mask.save(tmp_path / "half.mask.safetensors")
    res = run_masked_stage(spec, mask_path=path, mask_sha256=mask.bits_sha256(), base_dir=_theta0(out),
                           out_dir=tmp_path / "stage", progress=False)
    check = check_frozen_masters(mask, _theta0(out), res.master_path)
    assert check["frozen_entries_moved"] == 0 and check["frozen_entries_checked"] == mask.numel - mask.changed
    assert check["trainable_entries_moved"] > 0.5 * check["trainable_entries"]
    assert res.record["after_train"]["mask"]["weight_decay"] == "applied inside the mask only"
    with pytest.raises(Exception, match="not the mask"):
        run_masked_stage(spec, mask_path=path, mask_sha256="0" * 64, base_dir=_theta0(out), out_dir=tmp_path / "x",
                         progress=False)


def test_identity_section_matches_a_recomputation(micro_demo):
    out, results = micro_demo
    theta0 = _theta0(out)
    for alg, sec in results["subnetwork"]["reruns"].items():
        full = out / "stages" / sec["full"]
        mask = build_mask(theta0, full / "model", atol=1e-5)
        assert mask.changed == sec["mask"]["changed"] and mask.density == sec["mask"]["density"]
        assert mask.same_bits(Mask.load(out / "masks" / f"{alg}.mask.safetensors"))
        assert [r["role"] for r in sec["rows"]][:2] == ["subnetwork re-run", "random-mask re-run"]
        for row in sec["rows"]:
            again = identity(full / "model", out / "stages" / row["run"] / "model", atols=(0.0, 1e-5, 1e-4), inside=mask)
            assert row["identity"] == again
            # identity at an atol is 1 − the density of the mask of differences between the two models
            for rec in row["identity"]:
                diff = build_mask(full / "model", out / "stages" / row["run"] / "model", atol=rec["atol"], hash_content=False)
                assert rec["identical"] == diff.numel - diff.changed
                assert rec["identical_in_mask"] == mask.changed - diff.intersection_count(mask)
            acc = json.loads((out / "stages" / row["run"] / "stage.json").read_text())["accuracy"]
            assert row["accuracy"] == acc
        sub_row = sec["rows"][0]
        # identity grows with the tolerance; outside M the re-run is θ0 and θ_full within 1e-5 of it (M's own test),
        # so from atol 1e-5 on every entry outside M counts as identical (at atol 0 not: changes ≤ 1e-5 are outside M)
        vals = [r["identity"] for r in sub_row["identity"]]
        assert vals == sorted(vals)
        for rec in sub_row["identity"][1:]:
            assert rec["identical"] - rec["identical_in_mask"] == mask.numel - mask.changed


def test_overlap_section_matches_a_recomputation(micro_demo):
    out, results = micro_demo
    ov = results["subnetwork"]["overlap"]
    files = {"random (grpo's density)": "random-like-grpo"}
    theta0 = _theta0(out) / "model.safetensors"
    for row in ov["comparisons"]:
        a = Mask.load(out / "masks" / f"{files.get(row['a'], row['a'])}.mask.safetensors")
        b = Mask.load(out / "masks" / f"{files.get(row['b'], row['b'])}.mask.safetensors")
        p = overlap(a, b, base=theta0)
        for k in ("o1", "o2", "jaccard", "chance_o1", "chance_o2", "magnitude_chance_o1", "magnitude_chance_o2"):
            assert row[k] == pytest.approx(p.figures[k], rel=1e-12, abs=1e-15), (row["a"], row["b"], k)
        assert row["chance_o1"] == b.density and row["chance_o2"] == a.density  # the paper's baseline
        assert row["o1"] == a.intersection_count(b) / a.changed
    # the matrix: o1 of (row, column) is the pair's o1 or, transposed, its o2
    labels = ov["labels"]
    for pr in ov["pairs"]:
        i, j = labels.index(pr["a"]), labels.index(pr["b"])
        assert ov["matrix"]["o1"][i][j] == pr["o1"] and ov["matrix"]["o1"][j][i] == pr["o2"]
        assert sum(m["intersection"] for m in pr["modules"]) == pr["intersection"]
    groups = {r["group"] for r in ov["comparisons"]}
    assert groups == {"seeds", "data", "algorithm", "control"}
    assert {(r["a"], r["b"]) for r in ov["comparisons"] if r["group"] == "seeds"} == {
        ("grpo", "grpo-seed1"), ("grpo", "grpo-seed2"), ("grpo-seed1", "grpo-seed2"), ("dpo", "dpo-seed1")}


def test_worker_processes_give_the_same_bits(micro_demo, micro_args, tmp_path):
    """--jobs 2 redoes some stages (and θ0's samples) in spawned workers, in parallel, which also measure them and
    draw part of the figures: the same bytes and the same tables as --jobs 1."""
    from rlsubnet.cli.main import main

    src, first = micro_demo
    out = tmp_path / "run"
    shutil.copytree(src, out)
    redo = ["samples", "dpo", "grpo-subnet", "dpo-seed1", "sft"]  # dpo's re-runs are then re-planned from the new dpo
    for name in redo:
        shutil.rmtree(out / "stages" / name)
    args = [a for a in micro_args if a not in ("--jobs", "1")]
    assert main(["demo", "--out", str(out), *args, "--jobs", "2"]) == 0
    again = json.loads((out / "results.json").read_text())
    ran = {k for k, t in again["timings"].items() if "worker_pid" in t}
    assert ran == set(redo)
    assert len({again["timings"][k]["worker_pid"] for k in ran}) >= 1
    for name in [n for n in redo if n != "samples"] + ["dpo-subnet", "dpo-random"]:
        for f in ("master-fp32.safetensors", "model/model.safetensors"):
            assert (out / "stages" / name / f).read_bytes() == (src / "stages" / name / f).read_bytes(), (name, f)
    assert again["subnetwork"]["reruns"] == first["subnetwork"]["reruns"]
    drop = lambda ov: {k: v for k, v in ov.items() if k != "settings"}  # noqa: E731 - settings name the folders
    assert drop(again["subnetwork"]["overlap"]) == drop(first["subnetwork"]["overlap"])
    assert (out / "stages" / "samples" / "samples.jsonl").read_bytes() == (src / "stages" / "samples" / "samples.jsonl").read_bytes()
    assert set(again["timings"]["measure"]["in_workers"]) == {"dpo", "sft"}
    for name in ("dpo", "sft"):
        for key in ("sparsity", "bf16", "fp32", "spectral", "decomposition_every_step", "magnitude_bf16"):
            paths = ("base", "tuned")  # the compare records name the files they read
            a, b = (r["stages"][name][key] for r in (again, first))
            if isinstance(a, dict):
                a, b = ({k: v for k, v in d.items() if k not in paths} for d in (a, b))
            assert a == b, (name, key)
    for f in first["figures"]:
        assert (out / "figures" / f).read_bytes() == (src / "figures" / f).read_bytes(), f
    # the workers scored dpo's and sft's predictions: the same figures as the main process made
    for name in ("dpo", "sft"):
        a, b = (r["prediction"]["stages"][name] for r in (again, first))
        assert {k: v for k, v in a.items() if k not in ("cpu_s", "calibration")} == {
            k: v for k, v in b.items() if k not in ("cpu_s", "calibration")}, name
        if "calibration" in b:  # its record names the files it read, which moved
            assert (a["calibration"]["weights"], a["calibration"]["fit"]) == (b["calibration"]["weights"],
                                                                              b["calibration"]["fit"])
        assert "prediction" not in again["stages"][name]


def test_empty_subnetwork_is_skipped_not_an_error(micro_demo, tmp_path):
    """A full run that changed no bf16 entry has no subnetwork: its re-runs are skipped with the reason, and
    what needs a skipped stage is skipped too."""
    from rlsubnet.lab.config import DemoConfig
    from rlsubnet.lab.pipeline import finetune_specs, plan_rerun
    from rlsubnet.lab.scheduler import PlannedStage, StageContext
    from rlsubnet.lab.stages import StageResult
    from rlsubnet.lab.subnet import MaskStore

    out, results = micro_demo
    specs = {s.name: s for s in finetune_specs(DemoConfig(**results["config"]))}
    store = MaskStore(tmp_path, _theta0(out), 0)
    theta0_as_stage = StageResult(name="grpo", dir=out / "stages" / "pretrain", record={})  # its model is θ0 itself
    why = plan_rerun(store, specs, "grpo", "subnet", {"grpo": theta0_as_stage})
    assert isinstance(why, str) and "subnetwork is empty" in why

    ctx = StageContext(folder=None, theta0=_theta0(out), base_digest="", samples_path=None, samples_digest="",
                       eval_tasks=["add"], theta0_accuracy={}, timings={}, progress=False)
    plan = [PlannedStage("a", job="no subnetwork"), PlannedStage("b", needs=("a",), prepare=lambda done: pytest.fail())]
    done, skipped = ctx.run_plan(plan, first_number=1, total=2)
    assert done == {} and skipped == {"a": "no subnetwork", "b": "needs a, which did not run"}
