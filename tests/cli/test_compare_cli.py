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
    doc = json.loads(out)
    assert [c["global"][0]["changed"] for c in doc["comparisons"]] == [changed, 0]
    code, out, _ = run_cli(capsys, "compare", str(other_base), str(other), str(other_base), "-q")
    assert code == 0 and "[0]" in out and "[1]" in out and "[1] sparsity%" in out
    assert changed2 < changed


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
