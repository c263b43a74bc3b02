"""End to end: `rlsubnet demo --size micro` with a few steps per stage, then re-runs, resumes and refusals."""

from __future__ import annotations

import json
import os

import pytest

from rlsubnet.cli.main import main
from rlsubnet.lab.config import DemoConfig
from rlsubnet.lab.pipeline import stage_order
from rlsubnet.lab.runfolder import RunFolder

STAGES = ["grpo", "grpo-kl", "grpo-noclip", "grpo-sftlr", "dpo", "sft", "sft-matched", "rft", "rft-matched", "grpo-sgd",
          "sft-sgd", "grpo-task-sub"]
EXTRA = ["grpo-seed1", "grpo-seed2", "dpo-seed1", "grpo-subnet", "grpo-random", "grpo-predicted", "dpo-subnet",
         "dpo-random"]
FIGURES = ["sparsity_vs_paper", "sft_vs_rl", "sparsity_vs_step", "sparsity_vs_atol", "p_changed_vs_magnitude",
           "dynamics", "bf16_vs_fp32", "accuracy", "pretrain", "heatmap_grpo", "subnetwork_identity", "overlap_o1",
           "overlap_o1_over_chance", "overlap_o1_over_magnitude_chance", "where_the_update_points"]
# every finetuning stage's mask (the predictions are scored against each), the extra seeds', the baselines'
MASKS = [*STAGES, "grpo-seed1", "grpo-seed2", "dpo-seed1", "random-like-grpo", "random-like-dpo", "predicted-grpo"]


def _order(results):
    return stage_order(DemoConfig(**results["config"]))


def test_outputs(micro_demo):
    out, results = micro_demo
    assert list(results["stages"]) == STAGES
    assert sorted(results["subnetwork"]["runs"]) == sorted(EXTRA) and not results["subnetwork"]["skipped"]
    assert sorted(_order(results)) == sorted(STAGES + EXTRA)
    for name in ["pretrain", "samples", *STAGES, *EXTRA]:
        assert (out / "stages" / name / "stage.json").is_file()
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(f"{m}.mask.safetensors" for m in MASKS)
    for name in STAGES + EXTRA:
        d = out / "stages" / name
        assert (d / "model" / "model.safetensors").is_file() and (d / "master-fp32.safetensors").is_file()
        rec = json.loads((d / "stage.json").read_text())
        assert rec["steps_done"] == 4
        assert [s["step"] for s in rec["snapshots"]] == [2, 4]  # every 2 steps; the last is the final model
    for f in FIGURES:
        png = (out / "figures" / f"{f}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and b"rlsubnet" in png  # provenance in the PNG text chunks
    report = (out / "report.md").read_text()
    assert "## The paper's claims, checked" in report and "figures/sparsity_vs_paper.png" in report
    assert "## Subnetwork re-runs (the paper's Table 3)" in report and "## Subnetwork overlap (the paper's Table 4)" in report
    assert "## The optimizer as a cause" in report and "## Where the update points" in report
    assert "## Predicting the subnetwork" in report
    assert not list(out.rglob("*.tmp"))  # nothing half-written left behind


def test_sgd_stages_and_spectra(micro_demo):
    """The SGD stages train with torch's plain SGD at the configured lr; every stage's spectral record is
    spectral_stats on its bf16 matrices, as `compare --spectral` takes them."""
    from safetensors.torch import load_file

    from rlsubnet.diff.spectral import spectral_stats

    out, results = micro_demo
    st = results["stages"]
    for name in ("grpo-sgd", "sft-sgd"):
        assert st[name]["optimizer"]["class"] == "torch.optim.sgd.SGD"
        assert st[name]["spec"]["optimizer"] == "sgd" and st[name]["spec"]["learning_rate"] == results["config"]["sgd_lr"]
    assert st["grpo"]["optimizer"]["class"] == "torch.optim.adamw.AdamW" and "optimizer" not in st["grpo"]["spec"]
    w0 = load_file(out / "stages" / "pretrain" / "model" / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    for stage in ("grpo-sftlr", "sft", "sft-sgd"):
        spec = st[stage]["spectral"]
        rec = next(r for r in spec["matrices"] if r["name"] == name)
        w1 = load_file(out / "stages" / stage / "model" / "model.safetensors")[name]
        want = spectral_stats(w0[name], w1, (w1 - w0[name]).float(), spec["top_k"], name=name).to_record()
        assert rec == want
        assert spec["overall"]["matrices"] == len(spec["matrices"]) == 2 * 7 + 1  # 2 blocks × 7, the embedding
    ids = {c["id"] for c in results["claims"]}
    assert {"sgd-sparser", "pnt-rotation", "pnt-drift", "pnt-off-principal", "effective-low-rank"} <= ids
    assert results["spectral_reference"]["random_delta"]["overall"]["matrices"] == 15


def test_every_sparsity_comes_from_the_engine(micro_demo):
    """The report's numbers are the compare engine's, and the dynamics agree with them to the entry."""
    import rlsubnet

    out, results = micro_demo
    theta0 = out / "stages" / "pretrain" / "model"
    for name in ("grpo", "sft", "dpo"):
        st = results["stages"][name]
        r = rlsubnet.compare(theta0, out / "stages" / name / "model", atol=(0.0, 1e-5))
        assert st["sparsity"]["bf16"]["1e-05"] == r.sparsity(1e-5)
        assert st["sparsity"]["bf16"]["0.0"] == r.sparsity(0.0)
        r32 = rlsubnet.compare(theta0, out / "stages" / name / "master-fp32.safetensors", atol=0.0, dtype="fp32")
        assert st["sparsity"]["fp32"]["0.0"] == r32.sparsity(0.0)
        for dec in (st["decomposition_snapshots"], st["decomposition_every_step"]):
            for d in dec:
                assert d["never"] + d["returned"] + d["final"] == r.numel
                assert d["final"] == r.changed(d["atol"])
        assert st["sparsity_vs_step"][-1]["sparsity"]["1e-05"] == r.sparsity(1e-5)
        assert len(st["step_to_step"]) == 4
    # SFT at the usual SFT learning rate moves weights in this run; fp32 masters are never sparser than bf16
    sft = results["stages"]["sft"]
    assert sft["sparsity"]["fp32"]["0.0"] < 1.0
    for st in results["stages"].values():
        assert st["sparsity"]["fp32"]["0.0"] <= st["sparsity"]["bf16"]["0.0"] + 1e-12
        mono = [st["sparsity"]["bf16"][k] for k in ("0.0", "1e-08", "1e-07", "1e-06", "1e-05", "0.0001", "0.001")]
        assert mono == sorted(mono)  # sparsity can only grow with the tolerance


def test_results_json_is_strict_json_with_claims(micro_demo):
    out, results = micro_demo
    text = (out / "results.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    ids = {c["id"] for c in results["claims"]}
    assert {"rl-sparse", "sft-dense", "lr-confound", "kl-little-effect", "clip-little-effect", "in-distribution",
            "decomposition", "precision", "subnetwork-suffices", "subnetwork-beats-baselines", "overlap",
            "overlap-magnitude"} <= ids
    assert not any(c["verdict"] == "not measured" for c in results["claims"])
    assert set(results["figures"]) >= {f"{f}.png" for f in FIGURES}
    assert results["config"]["threads"] == 1 and results["config"]["steps"] == 4


def test_rerun_reuses_every_stage_and_gives_the_same_numbers(micro_demo, micro_args):
    out, results = micro_demo
    assert main(["demo", "--out", str(out), *micro_args]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(t.get("reused") for k, t in again["timings"].items()
               if k not in ("measure", "subnetwork", "prediction", "report", "total", "finetuning_phase"))
    assert {k for k, t in again["timings"].items() if t.get("reused")} == {"pretrain", "samples", *STAGES, *EXTRA}
    for name in STAGES:
        assert again["stages"][name]["sparsity"] == results["stages"][name]["sparsity"]
        assert again["stages"][name]["accuracy"] == results["stages"][name]["accuracy"]
    assert again["subnetwork"]["reruns"] == results["subnetwork"]["reruns"]
    assert again["subnetwork"]["overlap"] == results["subnetwork"]["overlap"]

    def scores(res):  # the predictions are made again from the same files: the same figures, bit for bit
        return {n: {k: v for k, v in row.items() if k != "cpu_s"} for n, row in res["prediction"]["stages"].items()}

    assert scores(again) == scores(results)


def test_another_configuration_is_refused(micro_demo, micro_args, capsys):
    out, _ = micro_demo
    rc = main(["demo", "--out", str(out), *micro_args, "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "another configuration" in err and "seed: 0 -> 1" in err and "--fresh" in err


def test_foreign_folder_is_refused(tmp_path, micro_args, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    rc = main(["demo", "--out", str(tmp_path), *micro_args, "--fresh"])
    assert rc == 2 and "holds no demo run" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("args, message", [
    (["--size", "huge"], "unknown --size 'huge'"),
    (["--task", "mul"], "unknown --task 'mul'"),
    (["--second-task", "div"], "unknown --second-task 'div'"),
    (["--task", "add", "--second-task", "add"], "must differ"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--pretrain-target", "1.5"], "--pretrain-target must be in [0, 1]"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--pretrain-threads", "0"], "--pretrain-threads must be at least 1"),
    (["--pretrain-threads", "4096"], "--pretrain-threads"),
    (["--jobs", "0"], "--jobs must be at least 1"),
])
def test_bad_options(tmp_path, capsys, args, message):
    rc = main(["demo", "--out", str(tmp_path / "x"), "-q", *args])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_fresh_replaces_our_files_only(tmp_path):
    cfg = DemoConfig(size="micro", steps=2)
    out = tmp_path / "run"
    with RunFolder(out, cfg, fresh=False):
        (out / "stages" / "grpo").mkdir()
        (out / "report.md").write_text("old")
    (out / "keep.txt").write_text("user file")
    with RunFolder(out, DemoConfig(size="micro", steps=3), fresh=True):
        pass
    assert not (out / "report.md").exists() and not (out / "stages" / "grpo").exists()
    assert (out / "keep.txt").read_text() == "user file"
    assert json.loads((out / "run.json").read_text())["config"]["steps"] == 3


def test_two_demos_cannot_share_a_folder(tmp_path):
    from rlsubnet.errors import OutputBusyError

    cfg = DemoConfig(size="micro", steps=2)
    with RunFolder(tmp_path / "run", cfg, fresh=False):
        with pytest.raises(OutputBusyError, match=rf"another rlsubnet run is writing this output \(pid {os.getpid()}"):
            with RunFolder(tmp_path / "run", cfg, fresh=False):
                pass


def test_interrupted_run_resumes_from_the_last_finished_stage(micro_demo, micro_args, tmp_path, monkeypatch):
    """Resume a run that stopped after 4 finetuning stages, interrupt it inside the 2nd stage it runs, then resume
    again: finished stages are kept, the interrupted one leaves nothing behind, and only what is missing is redone."""
    import shutil

    import transformers

    import rlsubnet.lab.stages as stages_mod

    src, first = micro_demo
    order = _order(first)
    out = tmp_path / "run"
    shutil.copytree(src, out)
    for name in order[4:]:
        shutil.rmtree(out / "stages" / name)
    for name in ("report.md", "results.json"):
        (out / name).unlink()
    args = ["demo", "--out", str(out), *micro_args]
    real = stages_mod.run_stage
    calls = []

    class Boom(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            raise KeyboardInterrupt

    def flaky(spec, **kw):
        calls.append(spec.name)
        if len(calls) == 2:
            kw["callbacks"] = [*kw.get("callbacks", ()), Boom()]
        return real(spec, **kw)

    monkeypatch.setattr(stages_mod, "run_stage", flaky)
    assert main(args) == 130  # the CLI reports the interruption
    assert calls == order[4:6]
    done = {p.name for p in (out / "stages").iterdir()}
    assert done == {"pretrain", "samples", *order[:5]}  # the interrupted stage left no folder, not even a temporary one
    assert not list(out.rglob("*.tmp")) and not (out / "report.md").exists()

    monkeypatch.setattr(stages_mod, "run_stage", real)
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    reused = {k for k, t in results["timings"].items() if t.get("reused")}
    assert reused == {"pretrain", "samples", *order[:5]}
    assert list(results["stages"]) == STAGES
    for name in STAGES:  # resuming changes nothing: same numbers as the uninterrupted run
        assert results["stages"][name]["sparsity"] == first["stages"][name]["sparsity"]
    assert results["subnetwork"]["reruns"] == first["subnetwork"]["reruns"]


def _demo_namespace(argv):
    import argparse

    from rlsubnet.cli import demo

    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    return parser.parse_args(["demo", *argv])


def test_every_config_field_is_a_flag_with_the_configs_default():
    """The options are generated from DemoConfig / DemoOptions: no flag without a field, no field without a flag,
    and parsing nothing gives the dataclasses' own defaults."""
    import dataclasses

    from rlsubnet.cli.config_args import from_args
    from rlsubnet.lab.config import DemoOptions

    ns = _demo_namespace([])
    fields = {f.name for cls in (DemoConfig, DemoOptions) for f in dataclasses.fields(cls)}
    assert set(vars(ns)) - {"run"} == fields
    assert from_args(DemoConfig, ns) == DemoConfig() and from_args(DemoOptions, ns) == DemoOptions()
    cfg = from_args(DemoConfig, _demo_namespace(["--task", "sub", "--pretrain-lr", "0.01", "--dpo-beta", "0.2"]))
    assert (cfg.task, cfg.second_task, cfg.pretrain_lr, cfg.dpo_beta) == ("sub", "add", 0.01, 0.2)
    assert from_args(DemoConfig, _demo_namespace(["--second-task", "none"])).second_task is None
    assert DemoConfig().second_task == "sub" and DemoConfig(task="sub").second_task == "add"  # "the other task"


def test_help_builds_without_torch():
    import subprocess
    import sys

    code = ("import sys; from rlsubnet.cli.main import build_parser; build_parser().parse_args(['demo', '-q']); "
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_workers_keep_freed_memory_and_leave_the_environment_as_it_was(monkeypatch):
    """The workers are spawned with the malloc settings that keep freed memory (a user's own settings after them,
    so that theirs win); this process's environment is as it was, with or without settings of its own."""
    from rlsubnet.lab.scheduler import WORKER_MALLOC, WorkerPool, worker_environment

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with worker_environment():
        assert os.environ["GLIBC_TUNABLES"] == WORKER_MALLOC
    assert "GLIBC_TUNABLES" not in os.environ
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    pool = WorkerPool(1, 1)
    try:
        seen = pool.get().submit(os.getenv, "GLIBC_TUNABLES").result()
    finally:
        pool.close()
    assert seen == f"{WORKER_MALLOC}:glibc.malloc.arena_max=2"
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"
