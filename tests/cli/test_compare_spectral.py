"""`rlsubnet compare --spectral`: the engine's streamed metrics against a direct computation, the JSON keys, the
terminal tables and figure, the default left unchanged, and bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import rlsubnet
from rlsubnet.cli.main import main
from rlsubnet.diff.names import is_norm
from rlsubnet.diff.spectral import DEFAULT_TOP_K, METRICS, spectral_stats
from rlsubnet.diff.spectral_stream import SpectralCollector
from rlsubnet.errors import UsageError

from helpers import load_dir

ISSUE_KEYS = {
    "name",
    "numerical_rank",
    "stable_rank",
    "effective_rank",
    "energy_rank_90",
    "energy_rank_99",
    "principal_energy",
    "principal_angle_left",
    "principal_angle_right",
    "spectral_drift",
}


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("rlsubnet: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def matrices_of(specs):
    return [n for n, _, shape in specs if len(shape) == 2 and not is_norm(n)]


def write_model(folder, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def assert_same_stats(got, want):
    for key in METRICS:
        a, b = getattr(got, key), getattr(want, key)
        if isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), key
        else:
            assert a == b, key


def test_streamed_metrics_equal_a_direct_computation_on_whole_matrices(sharded_pair):
    base, tuned, _, specs = sharded_pair
    # 1 KiB blocks: every matrix arrives in several blocks, from several shards
    r = rlsubnet.compare(base, tuned, spectral=True, top_k=4, block_bytes=1 << 10)
    assert r.spectral is not None and r.spectral.top_k == 4
    assert [s.name for s in r.spectral.matrices] == matrices_of(specs)
    w0, w1 = load_dir(base), load_dir(tuned)
    for got in r.spectral.matrices:
        a, b = w0[got.name], w1[got.name]
        want = spectral_stats(a, b, (b - a).float(), 4, name=got.name)
        assert_same_stats(got, want)
        assert got.numerical_rank > 0 and got.principal_angle_left > 0  # a real update to measure


@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_fp32_checkpoints_are_measured_in_the_comparison_dtype(tmp_path, mode):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(24, 16, generator=g)
    w1 = w0 + 1e-3 * torch.randn(24, 16, generator=g)
    name = "model.layers.0.mlp.down_proj.weight"
    base = write_model(tmp_path / "b", {name: w0})
    tuned = write_model(tmp_path / "t", {name: w1})
    got = rlsubnet.compare(base, tuned, mode=mode, spectral=True, top_k=3).spectral.matrices[0]
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    a, b = w0.to(dtype), w1.to(dtype)
    assert_same_stats(got, spectral_stats(a, b, (b - a).float(), 3, name=name))
    if mode == "bf16":  # the bf16 rounding matters: the fp32 answer differs
        assert got.stable_rank != pytest.approx(spectral_stats(w0, w1, top_k=3).stable_rank, rel=1e-6)


def test_spectral_is_off_by_default_and_leaves_every_other_number_alone(sharded_pair):
    base, tuned, _, _ = sharded_pair
    plain = rlsubnet.compare(base, tuned, rank=True).to_json()
    with_spectral = rlsubnet.compare(base, tuned, rank=True, spectral=True).to_json()
    assert "spectral" not in plain and "spectral" not in plain["options"] and "top_k" not in plain["options"]
    assert with_spectral["options"]["spectral"] is True and with_spectral["options"]["top_k"] == DEFAULT_TOP_K
    del with_spectral["spectral"], with_spectral["options"]["spectral"], with_spectral["options"]["top_k"]
    assert with_spectral == plain  # the ranks, taken from the spectral pass's singular values, included
    assert plain["n_rank_matrices"] > 0


def test_json_keys_and_groups_via_main(capsys, sharded_pair):
    base, tuned, _, specs = sharded_pair
    code, out, err = run_cli(capsys, "compare", base, tuned, "--spectral", "--top-k", "8", "--json", "-q")
    assert code == 0, err
    spec = json.loads(out)["spectral"]
    assert set(spec) == {"top_k", "matrices", "layers", "modules", "global", "nonfinite"}
    assert spec["top_k"] == 8 and spec["nonfinite"] == 0
    assert [m["name"] for m in spec["matrices"]] == matrices_of(specs)
    for m in spec["matrices"]:
        assert ISSUE_KEYS <= set(m) and set(METRICS) <= set(m)
        assert m["top_k"] == 8 and m["method"] == "exact" and m["nonfinite"] is False
        assert 0 < m["principal_angle_left"] < 90 and 0 < m["principal_angle_right"] < 90  # degrees
        assert m["principal_energy_chance"] == 64 / (m["shape"][0] * m["shape"][1])
    assert [g["layer"] for g in spec["layers"]] == [0, 1, 2]
    assert all(g["matrices"] == 7 and g["nonfinite"] == 0 for g in spec["layers"])
    assert [g["module"] for g in spec["modules"]] == ["q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head"]
    layer0 = [m for m in spec["matrices"] if m["layer"] == 0]
    for key in METRICS:  # the unweighted mean over the layer's matrices
        assert spec["layers"][0][key] == pytest.approx(sum(m[key] for m in layer0) / len(layer0), rel=1e-12)
    assert spec["global"]["matrices"] == len(spec["matrices"])


def test_several_tuned_checkpoints_each_get_their_own_metrics(capsys, sharded_pair):
    base, tuned, _, _ = sharded_pair
    code, out, err = run_cli(capsys, "compare", base, tuned, base, "--spectral", "--json", "-q")
    assert code == 0, err
    moved, same = (c["spectral"] for c in json.loads(out)["comparisons"])
    assert moved["global"]["numerical_rank"] > 0
    assert same["global"]["numerical_rank"] == 0 and same["global"]["principal_energy"] is None
    assert same["global"]["spectral_drift"] == 0.0


def test_terminal_tables_figure_and_stale_figure(capsys, sharded_pair, tmp_path):
    base, tuned, _, _ = sharded_pair
    out_dir = tmp_path / "report"
    code, out, err = run_cli(capsys, "compare", base, tuned, "--spectral", "--top-k", "4", "--out", out_dir, "-q")
    assert code == 0, err
    assert "Where the update points (top-k 4)" in out and "spectral.png" in out
    table = out[out.index("Where the update points") :]
    assert "Per layer" in table and "Per module kind" in table and "all matrices" in table
    assert "angle L°" in table and "principal%" in table
    from PIL import Image

    img = Image.open(out_dir / "spectral.png")
    assert "rlsubnet" in img.info["Software"] and '"top_k":4' in img.info["Description"]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["spectral"]["top_k"] == 4
    # the same folder without --spectral: no figure of the earlier run is left to mislead
    code, out, _ = run_cli(capsys, "compare", base, tuned, "--out", out_dir, "-q")
    assert code == 0 and "Where the update points" not in out and "spectral.png" not in out
    assert not (out_dir / "spectral.png").exists()
    assert "spectral" not in json.loads((out_dir / "summary.json").read_text())


def rotated_pair(theta_deg, m=40, n=30, k=4):
    """W0 with singular values 30..1 and W1 with its first left singular vector turned by theta toward the
    (k+1)-th: the top-k left subspace turns by exactly theta, the right one not at all."""
    g = torch.Generator().manual_seed(7)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    sigma = torch.diag(torch.arange(n, 0, -1, dtype=torch.float64))
    t = math.radians(theta_deg)
    u1 = u.clone()
    u1[:, 0], u1[:, k] = math.cos(t) * u[:, 0] + math.sin(t) * u[:, k], -math.sin(t) * u[:, 0] + math.cos(t) * u[:, k]
    return u[:, :n] @ sigma @ v.T, u1[:, :n] @ sigma @ v.T


def test_known_rotation_and_scale_come_out_of_the_cli_in_degrees(capsys, tmp_path):
    w0, w1 = rotated_pair(5.0)
    scaled = "model.layers.0.mlp.up_proj.weight"
    turned = "model.layers.0.self_attn.q_proj.weight"
    base = write_model(tmp_path / "b", {turned: w0, scaled: w0.clone()})
    tuned = write_model(tmp_path / "t", {turned: w1, scaled: 1.25 * w0})
    code, out, err = run_cli(
        capsys, "compare", base, tuned, "--mode", "native", "--spectral", "--top-k", "4", "--json", "-q"
    )
    assert code == 0, err
    got = {m["name"]: m for m in json.loads(out)["spectral"]["matrices"]}
    assert got[turned]["principal_angle_left"] == pytest.approx(5.0, rel=1e-9)
    assert got[turned]["principal_angle_right"] == pytest.approx(0.0, abs=1e-6)
    assert got[turned]["spectral_drift"] == pytest.approx(0.0, abs=1e-12)
    assert got[scaled]["spectral_drift"] == pytest.approx(0.25, rel=1e-9)
    assert got[scaled]["principal_angle_left"] == pytest.approx(0.0, abs=1e-5)


def test_non_finite_matrix_is_reported_skipped_and_counted(capsys, tmp_path):
    g = torch.Generator().manual_seed(1)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    w0 = {n: torch.randn(16, 16, generator=g).bfloat16() for n in names}
    w1 = {n: (t.float() * 1.01).bfloat16() for n, t in w0.items()}
    w1[names[1]][2, 3] = float("nan")
    base, tuned = write_model(tmp_path / "b", w0), write_model(tmp_path / "t", w1)
    code, out, err = run_cli(capsys, "compare", base, tuned, "--spectral", "--top-k", "2", "--json", "-q")
    assert code == 0, err
    spec = json.loads(out)["spectral"]
    assert spec["nonfinite"] == 1 and spec["layers"][0]["nonfinite"] == 1 and spec["layers"][0]["matrices"] == 1
    got = {m["name"]: m for m in spec["matrices"]}
    bad, good = got[names[1]], got[names[0]]
    assert bad["nonfinite"] is True and good["nonfinite"] is False
    assert all(bad[key] is None for key in ISSUE_KEYS - {"name"})
    assert spec["layers"][0]["stable_rank"] == good["stable_rank"] > 0  # the finite one alone
    code, out, err = run_cli(capsys, "compare", base, tuned, "--spectral", "--top-k", "2", "-q")
    assert code == 0, err
    assert f"spectral metrics skipped for 1 matrix(es) with NaN or Inf values: {names[1]}" in out
    assert "(+1 skipped)" in out


def test_all_zero_update_is_defined_without_a_division_error(capsys, sharded_pair):
    base, _, _, specs = sharded_pair
    code, out, err = run_cli(capsys, "compare", base, base, "--spectral", "--json", "-q")
    assert code == 0, err
    spec = json.loads(out)["spectral"]
    for m in spec["matrices"]:
        assert (m["numerical_rank"], m["energy_rank_90"], m["stable_rank"], m["effective_rank"]) == (0, 0, 0.0, 0.0)
        assert m["principal_energy"] is None and m["spectral_drift"] == 0.0
    assert len(spec["matrices"]) == len(matrices_of(specs))
    code, out, _ = run_cli(capsys, "compare", base, base, "--spectral", "-q")
    assert code == 0 and "Where the update points" in out


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--spectral", "--top-k", "0"], ["--top-k", "at least 1"]),
        (["--spectral", "--top-k", "-3"], ["--top-k"]),
        (["--spectral", "--top-k", "four"], ["--top-k", "integer"]),
        (["--spectral", "--top-k", "33"], ["--top-k 33", "model.embed_tokens.weight", "at most 32"]),
        (["--top-k", "4"], ["--top-k needs --spectral"]),
    ],
)
def test_bad_top_k_is_one_line_exit_2_and_writes_nothing(capsys, sharded_pair, tmp_path, args, needles):
    base, tuned, _, _ = sharded_pair
    out_dir = tmp_path / "o"
    code, out, err = run_cli(capsys, "compare", base, tuned, *args, "--out", out_dir, "-q")
    assert_one_line_error(code, err, *needles)
    assert "Traceback" not in err and out == ""
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_api_refuses_top_k_without_spectral_and_a_bad_top_k(sharded_pair):
    base, tuned, _, _ = sharded_pair
    with pytest.raises(UsageError, match="--top-k needs --spectral"):
        rlsubnet.compare(base, tuned, top_k=4)
    with pytest.raises(UsageError, match="--top-k must be a positive integer"):
        rlsubnet.compare(base, tuned, spectral=True, top_k=2.0)


def test_collector_takes_blocks_in_any_order_and_frees_its_buffers():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(12, 10, generator=g).bfloat16()
    w1 = (w0.float() + 0.05 * torch.randn(12, 10, generator=g)).bfloat16()
    name = "model.layers.1.mlp.gate_proj.weight"
    col = SpectralCollector(name, (12, 10), torch.bfloat16, [(0, torch.bfloat16, torch.bfloat16)], top_k=3)
    assert col.base is None and col.sides[0].data is None  # nothing allocated before the first block
    flat0, flat1 = w0.reshape(-1), w1.reshape(-1)
    for start in (80, 0, 40):
        col.update(start, flat0[start : start + 40], [flat1[start : start + 40]])
    [(index, stats, ranked)] = col.finish(rank=True)
    assert index == 0 and col.base is None and col.sides[0].data is None
    assert_same_stats(stats, spectral_stats(w0, w1, (w1 - w0).float(), 3, name=name))
    assert ranked == (stats.numerical_rank, stats.numerical_rank / 10)
    with pytest.raises(ValueError, match="finished twice"):
        col.finish()


def test_the_engine_holds_one_matrix_at_a_time(sharded_pair, monkeypatch):
    import rlsubnet.engine

    made, peak = [], []

    class Counting(SpectralCollector):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)

        def update(self, *args):
            super().update(*args)
            peak.append(sum(c.base is not None or any(s.data is not None for s in c.sides) for c in made))

    monkeypatch.setattr(rlsubnet.engine, "SpectralCollector", Counting)
    base, tuned, _, specs = sharded_pair
    r = rlsubnet.compare_many(base, [tuned, base], spectral=True, top_k=2, block_bytes=1 << 10)
    assert len(made) == len(matrices_of(specs)) and max(peak) == 1
    assert all(c.finished and c.base is None for c in made)
    assert all(len(x.spectral.matrices) == len(matrices_of(specs)) for x in r)


def test_help_states_the_default_top_k(capsys):
    assert main(["compare", "--help"]) == 0
    assert f"default {DEFAULT_TOP_K};" in capsys.readouterr().out
