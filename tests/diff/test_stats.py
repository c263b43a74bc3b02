"""The engine's figures against the paper's definition and hand-made cases with known answers."""

import math

import pytest
import torch

import rlsubnet
from helpers import load_dir
from rlsubnet.diff.names import layer_of, module_kind
from rlsubnet.diff.stats import tensor_stats
from rlsubnet.testing import changed_positions


def paper_sparsity(base: dict, tuned: dict, atol: float) -> float:
    """The paper's code: fraction of torch.isclose(tuned.bfloat16() - base.bfloat16(), 0, atol) over all params."""
    close = total = 0
    for name in base:
        delta = tuned[name].bfloat16() - base[name].bfloat16()
        close += torch.isclose(delta, torch.zeros_like(delta), atol=atol).sum().item()
        total += delta.numel()
    return close / total


def test_global_sparsity_equals_paper_definition_on_random_pair():
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i, shape in enumerate([(64, 48), (48,), (33, 7), (5, 5, 5)]):
        w = torch.randn(shape, generator=g) * 10 ** torch.empty(shape).uniform_(-5, 0, generator=g)
        noise = torch.randn(shape, generator=g) * 10 ** torch.empty(shape).uniform_(-8, -3, generator=g)
        keep = torch.rand(shape, generator=g) < 0.5
        base[f"model.layers.{i}.mlp.up_proj.weight"] = w
        tuned[f"model.layers.{i}.mlp.up_proj.weight"] = torch.where(keep, w, w + noise)
    atols = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 3e-5, 1e-4, 1e-3)
    r = rlsubnet.compare(base, tuned, atol=atols)
    for atol in atols:
        assert r.sparsity(atol) == pytest.approx(paper_sparsity(base, tuned, atol), abs=1e-12), atol
    # the bf16 rounding of atol matters: a Δ of exactly bf16(1e-5) = 1.0014e-5 is "unchanged" at 1e-5, as in isclose
    b = torch.zeros(4, dtype=torch.bfloat16)
    t = torch.tensor([1e-5, 1.0014e-5, 1.01e-5, 9.9e-6], dtype=torch.bfloat16)
    s = tensor_stats("w", b, t, atols=(1e-5,))
    expected = (~torch.isclose(t - b, torch.zeros_like(b), atol=1e-5)).sum().item()
    assert s.changed == (expected,)


def test_exact_changed_counts_on_sharded_pair(sharded_pair):
    base, tuned, changed_at_0, specs = sharded_pair
    r = rlsubnet.compare(base, tuned, atol=(0, 1e-5))
    assert r.changed(0.0) == changed_at_0
    assert r.numel == sum(math.prod(s) for _, _, s in specs)
    b, t = load_dir(base), load_dir(tuned)
    expected_1e5 = sum((~torch.isclose(t[n] - b[n], torch.zeros_like(b[n]), atol=1e-5)).sum().item() for n in b)
    assert r.changed(1e-5) == expected_1e5
    assert r.changed(1e-5) < r.changed(0.0), "one-ULP changes of small weights must hide under 1e-5"
    assert r.hidden_by_atol == changed_at_0 - expected_1e5
    for s in r.tensors:
        assert s.changed[0] == len(changed_positions(s.name, s.numel, 0.2, seed=1))
    g = {rec["atol"]: rec for rec in r.to_json()["global"]}
    assert g[0.0]["changed"] == changed_at_0
    assert g[0.0]["density"] == pytest.approx(changed_at_0 / r.numel)
    assert g[0.0]["sparsity"] == pytest.approx(1 - changed_at_0 / r.numel)


def test_block_size_does_not_change_results(sharded_pair):
    base, tuned, _, _ = sharded_pair
    a = rlsubnet.compare(base, tuned, atol=(0, 1e-6, 1e-5))
    b = rlsubnet.compare(base, tuned, atol=(0, 1e-6, 1e-5), block_bytes=130)  # blocks smaller than a row
    assert len(a.tensors) == len(b.tensors)
    for x, y in zip(a.tensors, b.tensors):
        assert (x.name, x.changed, x.hidden, x.max_abs_delta) == (y.name, y.changed, y.hidden, y.max_abs_delta)
        assert (x.mean_abs_delta, x.delta_norm, x.base_norm) == pytest.approx((y.mean_abs_delta, y.delta_norm, y.base_norm))


def test_identical_checkpoints_all_zero_delta(sharded_pair):
    base = sharded_pair[0]
    r = rlsubnet.compare(base, base, atol=(0, 1e-5), rank=True)
    assert r.changed(0.0) == 0 and r.sparsity(1e-5) == 1.0
    assert r.hidden_by_atol == 0
    assert r.mean_rank_ratio == 0.0
    assert all(s.max_abs_delta == 0.0 and s.delta_norm == 0.0 for s in r.tensors)


def test_signed_zeros_are_equal():
    b = torch.tensor([0.0, -0.0, 0.0, 1.0], dtype=torch.bfloat16)
    t = torch.tensor([-0.0, 0.0, 0.0, 1.0], dtype=torch.bfloat16)
    assert b.view(torch.int16).ne(t.view(torch.int16)).sum() == 2
    s = tensor_stats("w", b, t, atols=(0.0, 1e-5))
    assert s.changed == (0, 0) and s.hidden == 0


def test_bf16_ties_fp32_changes_rounded_away():
    base = torch.tensor([1.0, 0.5, 0.001, 3.0], dtype=torch.float32)
    tuned = base + torch.tensor([1e-4, 1e-5, 1e-7, 0.5])  # only the last survives bf16 rounding
    bf = tensor_stats("w", base, tuned, atols=(0.0,), mode="bf16")
    native = tensor_stats("w", base, tuned, atols=(0.0,), mode="native")
    assert bf.changed == (1,) and bf.compare_dtype == "bfloat16"
    assert native.changed == (4,) and native.compare_dtype == "float32"


def test_bf16_cast_rounds_half_ulp_ties_to_even():
    # At 1.0 a bf16 ULP is 2^-7. Exactly half a ULP up rounds to the even neighbour: down from 1.0 (even),
    # up from 1 + 2^-7 (odd). A cast that truncated, or rounded ties away from zero, would count differently.
    half = 2.0**-8
    base = torch.tensor([1.0, 1.0 + 2 * half, 1.0, 1.0], dtype=torch.float32)
    tuned = torch.tensor([1.0 + half, 1.0 + 3 * half, 1.0 + half + 2.0**-20, 1.0 - half / 2], dtype=torch.float32)
    s = tensor_stats("w", base, tuned, atols=(0.0,), mode="bf16")
    assert s.changed == (2,)  # entries 1 (tie up to 1 + 2^-6) and 2 (just past the tie); 0 and 3 round back
    assert s.max_abs_delta == 2.0**-7


def test_rank_buffers_are_allocated_one_matrix_at_a_time():
    from rlsubnet.diff.stats import DeltaAccumulator

    accs = [DeltaAccumulator(f"m{i}", (64, 64), torch.bfloat16, torch.bfloat16, rank=True) for i in range(4)]
    assert all(a._full_delta is None for a in accs)  # nothing reserved before a matrix's first block
    b = torch.zeros(64 * 64, dtype=torch.bfloat16)
    accs[0].update(b, b + 1)
    assert accs[0]._full_delta is not None and all(a._full_delta is None for a in accs[1:])
    assert accs[0].finish().rank == 1 and accs[0]._full_delta is None


@pytest.mark.parametrize("atol", [float("inf"), 1e39, float("nan"), -1e-5])
def test_atol_that_is_not_a_finite_bf16_number_is_refused(atol):
    from rlsubnet.errors import UsageError

    with pytest.raises(UsageError, match="atol"):
        tensor_stats("w", torch.zeros(2), torch.tensor([0.0, float("inf")]), atols=(atol,))


def test_tolerance_hides_one_ulp_changes_of_small_weights():
    # |w| < 2^-9: one bf16 ULP is below 1e-5, so a real change disappears at atol 1e-5
    small = torch.tensor([0.001, -0.0015, 0.0005], dtype=torch.bfloat16)
    large = torch.tensor([0.05, -0.2], dtype=torch.bfloat16)
    base = torch.cat([small, large])
    tuned = base.clone()
    tuned.view(torch.int16).__ixor__(1)  # one ULP everywhere
    s = tensor_stats("w", base, tuned, atols=(0.0, 1e-5))
    assert s.changed == (5, 2)
    assert s.hidden == 3


def test_nan_and_inf_are_counted_not_fatal():
    base = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 4.0])
    tuned = torch.tensor([1.0, float("nan"), 2.5, float("inf"), float("nan")])
    s = tensor_stats("w", base, tuned, atols=(0.0, 1e-5), mode="native")
    # as torch.isclose: NaN deltas (nan-nan, inf-inf, x-nan) count as changed
    assert s.changed == (4, 4)
    assert s.nonfinite == {"base_nan": 1, "base_inf": 1, "tuned_nan": 2, "tuned_inf": 1, "delta_nonfinite": 3}
    assert s.max_abs_delta == 0.5
    assert math.isfinite(s.mean_abs_delta)


def test_non_float_tensors_compare_bitwise():
    b = torch.tensor([1, 2, 3, 4], dtype=torch.int64)
    t = torch.tensor([1, 2, 5, 4], dtype=torch.int64)
    s = tensor_stats("position_ids", b, t, atols=(0.0, 1e-5, 10.0))
    assert s.changed == (1, 1, 1)
    assert s.max_abs_delta is None
    s = tensor_stats("flags", torch.tensor([True, False]), torch.tensor([True, True]), atols=(0.0,))
    assert s.changed == (1,)


def test_rank_of_constructed_low_rank_update():
    g = torch.Generator().manual_seed(3)
    # small integers are exact in bf16, so Δ is exactly rank 3 after the bf16 cast
    base = torch.randint(-8, 8, (40, 24), generator=g).float()
    u = torch.randint(-2, 3, (40, 3), generator=g).float()
    v = torch.randint(-2, 3, (3, 24), generator=g).float()
    delta = u @ v
    assert torch.linalg.matrix_rank(delta) == 3
    s = tensor_stats("model.layers.0.self_attn.q_proj.weight", base, base + delta, rank=True)
    assert s.rank == 3 and s.rank_ratio == pytest.approx(3 / 24)
    full = torch.randn(30, 20, generator=g)
    s = tensor_stats("w", full, full + torch.randn(30, 20, generator=g), rank=True)
    assert s.rank == 20 and s.rank_ratio == 1.0


def test_rank_skips_norms_and_vectors_and_mean_is_unweighted(sharded_pair):
    base, tuned, _, _ = sharded_pair
    r = rlsubnet.compare(base, tuned, rank=True)
    ranked = [s for s in r.tensors if s.rank is not None]
    assert ranked and all(len(s.shape) == 2 and module_kind(s.name) != "norm" for s in ranked)
    assert r.mean_rank_ratio == pytest.approx(sum(s.rank_ratio for s in ranked) / len(ranked))
    assert "mean_rank_ratio" in r.to_json()


def test_grouping_by_layer_and_module(sharded_pair):
    base, tuned, _, specs = sharded_pair
    r = rlsubnet.compare(base, tuned, atol=(0,))
    layers = {g["layer"]: g for g in r.layers()}
    assert set(layers) == {0, 1, 2, None}
    for layer in (0, 1, 2):
        names = [n for n, _, _ in specs if layer_of(n) == layer]
        assert layers[layer]["n_tensors"] == len(names)
        expected = sum(len(changed_positions(n, math.prod(s), 0.2, 1)) for n, _, s in specs if layer_of(n) == layer)
        assert layers[layer]["by_atol"][0]["changed"] == expected
    modules = {g["module"]: g for g in r.modules()}
    assert modules["norm"]["by_atol"][0]["changed"] == 0  # the fixture never changes norms
    assert set(modules) == {"embed", "norm", "q", "k", "v", "o", "gate", "up", "down", "lm_head"}
    # unweighted mean over matrices differs from the numel-weighted figure in general, and is computed over 2-D only
    up = [s for s in r.tensors if s.module == "up"]
    assert modules["up"]["by_atol"][0]["mean_matrix_sparsity"] == pytest.approx(
        sum(1 - s.changed[0] / s.numel for s in up) / len(up)
    )
    layers_, kinds, grid = r.layer_module_grid(0.0)
    assert layers_ == [0, 1, 2] and "norm" in kinds
    assert grid[0][kinds.index("norm")] == 1.0


@pytest.mark.parametrize(
    "name,layer,kind",
    [
        ("model.layers.12.self_attn.q_proj.weight", 12, "q"),
        ("model.layers.3.self_attn.k_proj.bias", 3, "k"),
        ("model.layers.0.self_attn.o_proj.weight", 0, "o"),
        ("model.layers.7.mlp.gate_proj.weight", 7, "gate"),
        ("model.layers.7.mlp.down_proj.weight", 7, "down"),
        ("model.layers.1.input_layernorm.weight", 1, "norm"),
        ("model.layers.1.pre_feedforward_layernorm.weight", 1, "norm"),  # Gemma 2/3
        ("model.layers.1.self_attn.q_norm.weight", 1, "norm"),  # Qwen3
        ("model.norm.weight", None, "norm"),
        ("model.embed_tokens.weight", None, "embed"),
        ("lm_head.weight", None, "lm_head"),
        ("model.layers.2.block_sparse_moe.gate.weight", 2, "mlp other"),  # Mixtral router
        ("model.layers.2.block_sparse_moe.experts.3.w2.weight", 2, "down"),
        ("transformer.h.5.attn.c_attn.weight", 5, "qkv"),  # GPT-2
        ("transformer.h.5.attn.c_proj.weight", 5, "o"),
        ("transformer.h.5.mlp.c_fc.weight", 5, "up"),
        ("transformer.h.5.mlp.c_proj.bias", 5, "down"),
        ("transformer.h.5.ln_2.weight", 5, "norm"),
        ("transformer.ln_f.bias", None, "norm"),
        ("transformer.wte.weight", None, "embed"),
        ("model.layers.4.self_attn.qkv_proj.weight", 4, "qkv"),  # Phi-3
        ("model.layers.4.mlp.gate_up_proj.weight", 4, "gate_up"),
        ("something.else", None, "other"),
    ],
)
def test_name_parsing(name, layer, kind):
    assert layer_of(name) == layer
    assert module_kind(name) == kind


def test_tensors_larger_than_a_sub_block_are_reduced_in_pieces_exactly():
    """Above SUB_BLOCK entries a block is cut into pieces reduced on the thread pool: counts, non-finite counts,
    the maximum, the norms and the rank's Δ buffer must come out as for the whole tensor, wherever the cuts fall."""
    from rlsubnet._threads import single_threaded_torch
    from rlsubnet.diff.stats import SUB_BLOCK, DeltaAccumulator

    g = torch.Generator().manual_seed(8)
    rows, cols = 1031, 300  # 309,300 entries: more than one sub-block
    assert rows * cols > SUB_BLOCK
    base = torch.randint(-8, 8, (rows, cols), generator=g).to(torch.bfloat16)
    u = torch.randint(-2, 3, (rows, 2), generator=g).float()
    v = torch.randint(-2, 3, (2, cols), generator=g).float()
    tuned = (base.float() + u @ v).to(torch.bfloat16)  # small integers: Δ is exactly rank 2 in bf16
    flat_uv = (u @ v).view(-1)
    # one non-finite Δ in each sub-block, where the low-rank update is 0 (the rank zeroes non-finite entries)
    spots = [int(torch.nonzero(flat_uv[lo:] == 0)[0]) + lo for lo in (5, SUB_BLOCK + 7)]
    assert spots[0] < SUB_BLOCK <= spots[1]
    tuned.view(-1)[spots] = float("inf")
    d = tuned.float() - base.float()
    finite = torch.isfinite(d)
    want_changed = int((d != 0).sum())
    for block in (rows * cols, 100_000):  # one update, or several updates of their own sub-blocks
        acc = DeltaAccumulator("model.layers.0.mlp.up_proj.weight", (rows, cols), base.dtype, tuned.dtype, (0.0, 1.5),
                               rank=True)
        with single_threaded_torch():
            for start in range(0, rows * cols, block):
                acc.update(base.view(-1)[start : start + block], tuned.view(-1)[start : start + block])
        s = acc.finish()
        assert s.changed == (want_changed, int(((d.abs() > 1.5) | ~finite).sum())), block
        assert s.nonfinite == {"tuned_inf": 2, "delta_nonfinite": 2}, block
        assert s.max_abs_delta == float(d[finite].abs().max()), block
        assert s.delta_norm == pytest.approx(float(d[finite].double().norm()), rel=1e-6), block
        assert s.base_norm == pytest.approx(float(base.double()[finite].norm()), rel=1e-6), block
        assert s.mean_abs_delta == pytest.approx(float(d[finite].double().abs().mean()), rel=1e-6), block
        assert s.rank == 2, block  # the infinities are zeroed for the rank, the rest of Δ is in place


def test_accumulator_bookkeeping_and_messages():
    from rlsubnet.diff.changed import atol_threshold, comparison_dtype
    from rlsubnet.diff.stats import DeltaAccumulator
    from rlsubnet.errors import UsageError

    with pytest.raises(UsageError, match="^at least one atol is needed$"):
        DeltaAccumulator("w", (2,), torch.float32, torch.float32, atols=())
    acc = DeltaAccumulator("w", (2, 3), torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match=r"^w: block sizes differ \(2 vs 3\)$"):
        acc.update(torch.zeros(2), torch.zeros(3))
    acc.update(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="^w: more elements than the tensor's 6$"):
        acc.update(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="^w: saw 4 of 6 elements$"):
        acc.finish()
    acc.update(torch.zeros(2), torch.zeros(2))
    s = acc.finish()
    assert (s.base_dtype, s.tuned_dtype, s.compare_dtype, s.rank) == ("float32", "bfloat16", "bfloat16", None)
    assert tensor_stats("w", torch.zeros(4, 4), torch.ones(4, 4)).rank is None  # rank only when asked
    # integer tensors: bitwise, no hidden changes and no float figures
    s = tensor_stats("ids", torch.tensor([1, 2, 3]), torch.tensor([1, 5, 3]), atols=(0.0, 10.0))
    assert (s.changed, s.hidden, s.max_abs_delta, s.delta_norm, s.mean_abs_delta) == ((1, 1), 0, None, None, None)
    # the comparison dtype of a float/int pair is their promotion, whatever the mode
    assert comparison_dtype("bf16", torch.float32, torch.int64) == torch.float32
    with pytest.raises(UsageError, match=r"^unknown comparison mode 'fp8' \(choose from bf16, fp32, native\)$"):
        comparison_dtype("fp8", torch.float32, torch.float32)
    # the tolerance as the comparison dtype holds it, and the refusals name the reason
    assert atol_threshold(1e-5, torch.bfloat16) == 1.0013580322265625e-05
    assert atol_threshold(1e-5, torch.float32) == float(torch.tensor(1e-5, dtype=torch.float32))
    assert atol_threshold(1e-5, torch.int64) == 1e-5
    with pytest.raises(UsageError, match="^atol must be a finite, non-negative number, got inf$"):
        atol_threshold(float("inf"), torch.float32)
    with pytest.raises(UsageError, match="^atol 3.40282e\\+38 is beyond the largest bfloat16 value$"):
        atol_threshold(3.4028234663852886e38, torch.bfloat16)  # a finite fp32 value, infinite in bf16


def test_a_tolerance_of_one_subnormal_step():
    """atol = the smallest subnormal: its threshold pattern is 1, so a Δ of exactly that size is unchanged and
    only larger ones count (no shortcut may treat threshold 1 like threshold 0)."""
    for dtype, tiny in ((torch.bfloat16, 2.0**-133), (torch.float32, 2.0**-149), (torch.float16, 2.0**-24)):
        base = torch.zeros(3, dtype=dtype)
        tuned = torch.tensor([0.0, tiny, 2 * tiny], dtype=dtype)
        s = tensor_stats("w", base, tuned, atols=(0.0, tiny), mode="native")
        assert s.changed == (2, 1), dtype


def test_an_empty_tensor_has_no_changes_and_no_figures_to_fail_on():
    s = tensor_stats("w", torch.empty(0, 4), torch.empty(0, 4), atols=(0.0, 1e-5))
    assert (s.numel, s.changed, s.hidden, s.max_abs_delta, s.mean_abs_delta) == (0, (0, 0), 0, 0.0, None)
