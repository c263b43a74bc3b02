"""`rlsubnet mask` and `rlsubnet overlap` on the command line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

import rlsubnet
from rlsubnet.cli.main import main
from rlsubnet.masks import Mask, build_mask


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_mask_build_info_and_json(sharded_pair, tmp_path, capsys):
    base, tuned, _, _ = sharded_pair
    out = tmp_path / "m.safetensors"
    rc, text, _ = _run(capsys, "mask", base, tuned, "--atol", "1e-5", "-o", out, "-q")
    assert rc == 0 and "wrote" in text and "density" in text
    m = Mask.load(out)
    assert m == build_mask(base, tuned, atol=1e-5)
    assert m.density == rlsubnet.compare(base, tuned, atol=(1e-5,)).density(1e-5)
    rc, text, _ = _run(capsys, "mask", "--info", out, "--json")
    summary = json.loads(text)
    assert rc == 0 and summary["density"] == m.density and summary["atol"] == 1e-5 and summary["dtype"] == "bf16"
    assert summary["base"]["source"] == str(base) and summary["tuned"]["source"] == str(tuned)
    # refuses to overwrite unless asked
    rc, _, err = _run(capsys, "mask", base, tuned, "-o", out)
    assert rc == 2 and "exists" in err
    rc, _, _ = _run(capsys, "mask", base, tuned, "-o", out, "--overwrite", "--atol", "0", "-q")
    assert rc == 0 and Mask.load(out).atol == 0.0


def test_mask_random_and_combinations(sharded_pair, tmp_path, capsys):
    base, tuned, _, _ = sharded_pair
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    build_mask(base, tuned, atol=1e-5).save(a)
    build_mask(base, tuned, atol=0.0).save(b)
    r = tmp_path / "r.safetensors"
    assert _run(capsys, "mask", "--random", a, "--scope", "global", "--seed", "4", "-o", r)[0] == 0
    rm = Mask.load(r)
    assert rm.changed == Mask.load(a).changed and rm.meta["extra"]["random"]["scope"] == "global"
    for op in ("union", "intersection", "difference"):
        o = tmp_path / f"{op}.safetensors"
        assert _run(capsys, "mask", f"--{op}", b, a, "-o", o)[0] == 0
        expected = getattr(Mask.load(b), op)(Mask.load(a))
        assert Mask.load(o) == expected
    assert Mask.load(tmp_path / "difference.safetensors").changed == Mask.load(b).changed - Mask.load(a).changed


def test_overlap_json_and_outputs(sharded_pair, tmp_path, capsys):
    base, tuned, _, _ = sharded_pair
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ma = build_mask(base, tuned, atol=1e-5)
    ma.save(a)
    from rlsubnet.masks import random_mask

    mb = random_mask(ma, seed=2)
    mb.save(b)
    rc, text, _ = _run(capsys, "overlap", a, b, "--json")
    pairs = json.loads(text)
    assert rc == 0 and len(pairs) == 1
    p = pairs[0]
    for key in ("a", "b", "o1", "o2", "jaccard", "chance_o1", "chance_o2"):
        assert key in p
    assert p["a"] == str(a) and p["b"] == str(b)
    inter = ma.intersection_count(mb)
    assert p["o1"] == inter / ma.changed and p["o2"] == inter / mb.changed
    assert p["chance_o1"] == mb.density and p["chance_o2"] == ma.density
    assert "magnitude_chance_o1" not in p

    out = tmp_path / "ov"
    rc, text, _ = _run(capsys, "overlap", a, b, a, "--base", base, "--json", "--out", out, "-q")
    pairs = json.loads(text)
    assert rc == 0 and len(pairs) == 3
    assert all("magnitude_chance_o1" in q and "magnitude_chance_o2" in q for q in pairs)
    assert pairs[1]["o1"] == 1.0  # a against itself
    for name in ("overlap.json", "pairs.csv", "matrix_o1.csv", "heatmap_o1.png", "heatmap_o1_over_chance.png",
                 "heatmap_o1_over_magnitude_chance.png"):
        assert (out / name).is_file(), name
    full = json.loads((out / "overlap.json").read_text())
    assert full["matrix"]["o1"][0][1] == pairs[0]["o1"]
    with Image.open(out / "heatmap_o1.png") as im:
        assert "rlsubnet" in im.info.get("Software", "")
        assert str(a) in im.info["Description"]


def test_text_tables(sharded_pair, tmp_path, capsys):
    base, tuned, _, _ = sharded_pair
    a = tmp_path / "a.safetensors"
    build_mask(base, tuned).save(a)
    rc, text, _ = _run(capsys, "overlap", a, a, "--base", base, "-q")
    assert rc == 0 and "chance o1" in text and "mag. chance o1" in text and "per module" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["mask", "{base}"], "BASE and TUNED"),
        (["mask", "{base}", "{tuned}"], "-o FILE"),
        (["mask", "{base}", "{missing}", "-o", "{out}"], "no such file"),
        (["mask", "--info", "{base}"], "not a mask file"),
        (["mask", "--difference", "{mask}", "-o", "{out}"], "takes two"),
        (["overlap", "{mask}"], "at least two"),
        (["overlap", "{mask}", "{junk}"], "not a readable mask file"),
        (["overlap", "{mask}", "{other}"], "different tensors"),
        (["overlap", "{mask}", "{mask}", "--base", "{missing}"], "no such file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(sharded_pair, tmp_path, capsys, argv, message):
    base, tuned, _, _ = sharded_pair
    mask = tmp_path / "m.safetensors"
    build_mask(base, tuned).save(mask)
    other = tmp_path / "o.safetensors"
    Mask.from_bool({"w": __import__("torch").ones(3, dtype=__import__("torch").bool)}).save(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 5)
    paths = {"base": base, "tuned": tuned, "missing": tmp_path / "nope", "out": tmp_path / "x.safetensors",
             "mask": mask, "other": other, "junk": junk}
    rc, _, err = _run(capsys, *[a.format(**paths) for a in argv])
    assert rc == 2
    assert err.startswith("rlsubnet: error:") and err.count("\n") == 1 and message in err
