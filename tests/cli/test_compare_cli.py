"""`rlsubnet compare` as a user calls it: main([...]) -> exit code, stdout JSON, output files, one-line errors."""

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from rlsubnet.cli.main import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(code, err, *needles, out_dir=None):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("rlsubnet: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.iterdir()), "partial output written"


def test_json_schema_and_values(capsys, sharded_pair):
    base, tuned, changed, _ = sharded_pair
    code, out, err = run_cli(capsys, "compare", str(base), str(tuned), "--json", "--quiet", "--rank")
    assert code == 0, err
    doc = json.loads(out)
    assert [g["atol"] for g in doc["global"]] == [0.0, 1e-5]
    g0 = doc["global"][0]
    assert set(g0) == {"atol", "numel", "changed", "sparsity", "density"}
    assert g0["changed"] == changed
    assert g0["sparsity"] + g0["density"] == pytest.approx(1.0)
    assert doc["rlsubnet_version"] and doc["options"]["dtype"] == "bf16"
    assert 0 < doc["mean_rank_ratio"] <= 1
    assert {l["layer"] for l in doc["layers"]} == {0, 1, 2, None}


def test_out_dir_files_with_provenance(capsys, sharded_pair, tmp_path):
    base, tuned, changed, specs = sharded_pair
    out_dir = tmp_path / "report"
    code, out, _ = run_cli(capsys, "compare", str(base), str(tuned), "--out", str(out_dir), "--atol", "0", "1e-6", "1e-5", "-q")
    assert code == 0
    assert "Global sparsity" in out and "Per layer" in out and "Per module kind" in out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["heatmap.png", "layers.csv", "sparsity_vs_atol.png", "summary.json", "tensors.jsonl"]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["global"][0]["changed"] == changed and summary["base"] == str(base)
    lines = (out_dir / "tensors.jsonl").read_text().splitlines()
    meta = json.loads(lines[0])
    assert meta["kind"] == "meta" and meta["options"]["atol"] == [0.0, 1e-6, 1e-5] and meta["rlsubnet_version"]
    records = [json.loads(l) for l in lines[1:]]
    assert len(records) == len(specs) and sum(r["by_atol"][0]["changed"] for r in records) == changed
    csv_text = (out_dir / "layers.csv").read_text().splitlines()
    assert csv_text[0].startswith("# {") and '"rlsubnet_version"' in csv_text[0]
    assert csv_text[1].startswith("tuned,layer,n_tensors,numel,changed@0.0")
    from PIL import Image

    img = Image.open(out_dir / "heatmap.png")
    assert "rlsubnet" in img.info["Software"] and str(tuned) in img.info["Description"]


def test_several_tuned_in_one_table(capsys, sharded_pair, tmp_path):
    from rlsubnet.testing import write_synthetic_pair

    base, tuned, changed, specs = sharded_pair
    other_base, other = tmp_path / "b2", tmp_path / "t2"
    changed2 = write_synthetic_pair(other_base, other, specs=specs, density=0.05, seed=1)
    code, out, _ = run_cli(capsys, "compare", str(base), str(tuned), str(base), "--json", "-q")
    assert code == 0
    doc = json.loads(out)
    assert [c["global"][0]["changed"] for c in doc["comparisons"]] == [changed, 0]
    assert [c["tuned"] for c in doc["comparisons"]] == [str(tuned), str(base)]
    # Three tuned checkpoints, one table: each row is that checkpoint's own figure.
    code, out, _ = run_cli(capsys, "compare", str(other_base), str(other), str(other_base), str(tuned), "-q", "--atol", "0")
    assert code == 0, out
    numel = doc["comparisons"][0]["global"][0]["numel"]
    rows = {l.split()[0]: l.split() for l in out.splitlines() if l.startswith("[") and "tuned:" not in l}
    assert float(rows["[0]"][1]) == pytest.approx(100 * (1 - changed2 / numel), abs=0.006)
    assert rows["[1]"][1] == "100.00"
    expected_2 = run_cli(capsys, "compare", str(other_base), str(tuned), "--json", "-q", "--atol", "0")[1]
    assert float(rows["[2]"][1]) == pytest.approx(100 * json.loads(expected_2)["global"][0]["sparsity"], abs=0.006)
    assert "[2] sparsity%" in out and "[2] matrix mean%" in out


def test_nonexistent_path(capsys, tmp_path, sharded_pair):
    code, _, err = run_cli(capsys, "compare", str(tmp_path / "nope"), str(sharded_pair[1]), "--out", str(tmp_path / "o"))
    assert_clean_error(code, err, tmp_path / "nope", out_dir=tmp_path / "o")


def test_folder_without_weights(capsys, tmp_path, sharded_pair):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "compare", str(empty), str(sharded_pair[1]))
    assert_clean_error(code, err, empty, "no weights")


def test_truncated_shard(capsys, tmp_path, sharded_pair):
    base, tuned, _, _ = sharded_pair
    shard = sorted(tuned.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out_dir = tmp_path / "o"
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned), "--out", str(out_dir))
    assert_clean_error(code, err, shard, "truncated", out_dir=out_dir)


@pytest.mark.parametrize(
    "payload,needle",
    [
        (b"\x00\x01", "not a safetensors file"),
        (struct.pack("<Q", 1 << 40) + b"{}", "corrupt or truncated"),
        (struct.pack("<Q", 5) + b"{nope", "corrupt safetensors header"),
        (struct.pack("<Q", 60) + json.dumps({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}).encode().ljust(60) + b"x",
         "unsupported dtype"),
        (struct.pack("<Q", 64) + json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode().ljust(64) + b"x" * 8,
         "needs 12"),
    ],
)
def test_corrupt_safetensors(capsys, tmp_path, sharded_pair, payload, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    code, _, err = run_cli(capsys, "compare", str(bad), str(sharded_pair[1]))
    assert_clean_error(code, err, bad, needle)


def test_index_names_missing_shard(capsys, tmp_path, sharded_pair):
    base, tuned, _, _ = sharded_pair
    shard = sorted(tuned.glob("*.safetensors"))[0]
    shard.unlink()
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned))
    assert_clean_error(code, err, "model.safetensors.index.json", shard.name)


def _write(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")


def test_mismatched_tensors_stop_unless_allowed(capsys, tmp_path):
    a = {"x": torch.zeros(4, 4), "y": torch.zeros(3), "gone": torch.zeros(2)}
    b = {"x": torch.ones(4, 5), "y": torch.ones(3), "new": torch.zeros(2)}
    _write(tmp_path / "a", a)
    _write(tmp_path / "b", b)
    out_dir = tmp_path / "o"
    code, _, err = run_cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out_dir))
    assert_clean_error(code, err, "gone", "new", "x [4, 4] vs [4, 5]", "--allow-mismatch", out_dir=out_dir)
    code, out, err = run_cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--allow-mismatch", "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["n_tensors"] == 1 and doc["global"][0]["changed"] == 3
    assert sorted(s["name"] for s in doc["skipped"]) == ["gone", "new", "x"]


def test_nan_inf_reported(capsys, tmp_path):
    _write(tmp_path / "a", {"w": torch.tensor([1.0, 2.0, 3.0])})
    _write(tmp_path / "b", {"w": torch.tensor([1.0, float("nan"), float("inf")])})
    code, out, err = run_cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "-q")
    assert code == 0, err
    assert "non-finite" in out and "tuned_nan=1" in out and "tuned_inf=1" in out
    code, out, _ = run_cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "-q", "--json")
    doc = json.loads(out)
    assert doc["nonfinite"]["tuned_nan"] == 1 and doc["global"][0]["changed"] == 2


def test_non_float_tensors(capsys, tmp_path):
    _write(tmp_path / "a", {"ids": torch.arange(10), "w": torch.zeros(2)})
    _write(tmp_path / "b", {"ids": torch.arange(10).flip(0), "w": torch.zeros(2)})
    code, out, _ = run_cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "-q", "--json")
    assert code == 0 and json.loads(out)["global"][1]["changed"] == 10


def test_unreadable_file(capsys, monkeypatch, sharded_pair):
    base, tuned, _, _ = sharded_pair
    victim = sorted(tuned.glob("*.safetensors"))[2]
    real_open = os.open

    def deny(path, *a, **k):
        if os.fspath(path) == os.fspath(victim):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, *a, **k)

    real_builtin_open = open

    def deny_builtin(path, *a, **k):
        if os.fspath(path) == os.fspath(victim):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_builtin_open(path, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    monkeypatch.setattr("builtins.open", deny_builtin)
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned))
    assert_clean_error(code, err, victim, "Permission denied")


def test_pickle_flag_named(capsys, tmp_path, sharded_pair):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pt")
    code, _, err = run_cli(capsys, "compare", str(tmp_path / "model.pt"), str(tmp_path / "model.pt"))
    assert_clean_error(code, err, "--allow-pickle", "model.pt")
    code, out, _ = run_cli(capsys, "compare", str(tmp_path / "model.pt"), str(tmp_path / "model.pt"), "--allow-pickle", "--json", "-q")
    assert code == 0 and json.loads(out)["global"][0]["changed"] == 0


def test_bad_options(capsys, sharded_pair):
    base, tuned, _, _ = sharded_pair
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned), "--atol", "-1")
    assert_clean_error(code, err, "atol")
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned), "--dtype", "fp8")
    assert code == 2 and "invalid choice" in err


def test_help_is_fast_to_import():
    import subprocess
    import sys

    code = "import sys, rlsubnet.cli.main as m; m.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False", "building the CLI parser must not import torch"


@pytest.mark.parametrize(
    "header,needle",
    [
        ({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "unsupported dtype"),
        ({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, "malformed header entry"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "malformed header entry"),
    ],
)
def test_malformed_header_entries(capsys, tmp_path, sharded_pair, header, needle):
    raw = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    code, _, err = run_cli(capsys, "compare", str(bad), str(sharded_pair[1]))
    assert_clean_error(code, err, bad, needle)


@pytest.mark.parametrize(
    "raw,needle",
    [
        (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
         b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "appears twice"),
    ],
)
def test_pathological_headers(capsys, tmp_path, sharded_pair, raw, needle):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    code, _, err = run_cli(capsys, "compare", str(bad), str(sharded_pair[1]))
    assert_clean_error(code, err, bad, needle)


def test_unreadable_folder(capsys, monkeypatch, tmp_path, sharded_pair):
    # As a non-root user, a folder without the x bit fails stat() on every file inside it (root never does,
    # so the test simulates what the file system says).
    import pathlib

    base, tuned, _, _ = sharded_pair
    real_stat = pathlib.Path.stat

    def deny(self, *a, **k):
        if self.parent == tuned:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "stat", deny)
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned), "--out", str(tmp_path / "o"))
    assert_clean_error(code, err, tuned, "Permission denied", out_dir=tmp_path / "o")


def test_out_that_cannot_be_written_leaves_nothing(capsys, tmp_path, sharded_pair):
    base, tuned, _, _ = sharded_pair
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned), "-q", "--out", str(tmp_path / "afile" / "o"))
    assert_clean_error(code, err, tmp_path / "afile")
    out_dir = tmp_path / "o"
    (out_dir / "layers.csv").mkdir(parents=True)  # one of the names taken by a folder
    code, _, err = run_cli(capsys, "compare", str(base), str(tuned), "-q", "--out", str(out_dir))
    assert_clean_error(code, err, out_dir / "layers.csv", "is a folder")
    assert [p.name for p in out_dir.iterdir()] == ["layers.csv"]  # no summary.json beside it: all or none


def test_out_replaces_an_earlier_runs_files(capsys, tmp_path, sharded_pair):
    base, tuned, _, _ = sharded_pair
    out_dir = tmp_path / "o"
    assert run_cli(capsys, "compare", str(base), str(tuned), str(base), "-q", "--out", str(out_dir))[0] == 0
    assert {"heatmap-0.png", "heatmap-1.png"} <= {p.name for p in out_dir.iterdir()}
    assert run_cli(capsys, "compare", str(base), str(tuned), "-q", "--out", str(out_dir))[0] == 0
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["heatmap.png", "layers.csv", "sparsity_vs_atol.png", "summary.json", "tensors.jsonl"]


def test_no_tensor_in_common_is_an_error_not_100_percent(capsys, tmp_path):
    _write(tmp_path / "a", {"x": torch.zeros(3)})
    _write(tmp_path / "b", {"y": torch.zeros(3)})
    code, out, err = run_cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--allow-mismatch", "--json", "-q")
    assert_clean_error(code, err, "no tensor in common")
    assert out == ""


def test_pickle_folder_of_a_trainer_ignores_its_other_files(capsys, tmp_path):
    sd = {"w": torch.arange(4.0)}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torch.save(sd if name == "a" else {"w": sd["w"] + 1}, tmp_path / name / "pytorch_model.bin")
        torch.save({"lr": 1e-6, "step": 3}, tmp_path / name / "training_args.bin")
        torch.save({"state": {}}, tmp_path / name / "optimizer.pt")
        torch.save({"rng": torch.zeros(2)}, tmp_path / name / "rng_state.pth")
    code, out, err = run_cli(capsys, "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--allow-pickle", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["global"][0] == {"atol": 0.0, "numel": 4, "changed": 4, "sparsity": 0.0, "density": 1.0}
