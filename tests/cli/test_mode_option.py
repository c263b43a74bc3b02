"""`--mode` names the comparison mode in compare and mask; `--dtype`, its documented first name, still works."""

from __future__ import annotations

import json

import pytest

from rlsubnet.cli.main import main


def _json(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("mode", ["fp32", "native"])
def test_mode_and_dtype_are_one_option(capsys, sharded_pair, tmp_path, mode):
    base, tuned, _, _ = sharded_pair
    by_mode = _json(capsys, "compare", base, tuned, "--mode", mode, "--json", "-q")
    by_dtype = _json(capsys, "compare", base, tuned, "--dtype", mode, "--json", "-q")
    assert by_mode == by_dtype and by_mode["options"]["dtype"] == mode  # the key the JSON has always used
    m1 = _json(capsys, "mask", base, tuned, "--mode", mode, "-o", tmp_path / "a.safetensors", "--json", "-q")
    m2 = _json(capsys, "mask", base, tuned, "--dtype", mode, "-o", tmp_path / "b.safetensors", "--json", "-q")
    assert m1["dtype"] == m2["dtype"] == mode and m1["bits_sha256"] == m2["bits_sha256"]


def test_default_mode_is_bf16_and_bad_modes_are_refused(capsys, sharded_pair):
    base, tuned, _, _ = sharded_pair
    assert _json(capsys, "compare", base, tuned, "--json", "-q")["options"]["dtype"] == "bf16"
    code = main(["compare", str(base), str(tuned), "--mode", "fp8"])
    assert code == 2 and "invalid choice" in capsys.readouterr().err
