"""Every measurement of the demo, made from the files of a finished run: each stage against θ0 (sparsity from the
compare engine; the per-entry views of ``rlsubnet.diff.dynamics``, checked against the engine to the entry), the
subnetwork re-runs against their full runs (the paper's Table 3), the overlap of the subnetworks (Table 4), and
the facts about the tasks that the report states. The report renders these records and measures nothing itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.diff.dynamics import decompose, magnitude_profile
from rlsubnet.engine import compare, compare_many
from rlsubnet.errors import RlsubnetError
from rlsubnet.lab import paper_numbers as paper
from rlsubnet.lab.config import DemoConfig, StageSpec
from rlsubnet.lab.stages import StageResult
from rlsubnet.lab.subnet import (
    IDENTITY_ATOLS,
    MASK_ATOL,
    MASK_MODE,
    MASK_OPTIONS,
    RANDOM_SCOPE,
    RERUN_OF,
    MaskStore,
    mask_record,
    named_pairs,
    overlap_labels,
    predicted_mask_label,
    random_mask_label,
)
from rlsubnet.lab.tasks import get_task
from rlsubnet.masks import Mask, identity, overlap_many
from rlsubnet.report.overlap_outputs import MAGNITUDE_CHANCE_FIGURES, PAIR_FIGURES
from rlsubnet.train import check_frozen_masters

TABLE6_ATOLS = (0.0, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3)  # the paper's sparsity-vs-tolerance table, plus 0 and above
DYNAMICS_ATOLS = (0.0, 1e-5)


# -- one stage against θ0


def _global(result, atol: float) -> dict:
    return next(g for g in result.global_stats if g["atol"] == atol)


def _read_all(path: Path) -> dict:
    with open_checkpoint(str(path)) as ck:
        return {n: ck.read(n) for n in ck.names()}


def measure_stage(theta0_dir: Path, stage: StageResult, *, atols: Sequence[float] = TABLE6_ATOLS) -> dict:
    """Everything the report shows about one stage (JSON-ready)."""
    theta0 = str(theta0_dir / "model.safetensors")
    bf16 = compare(theta0, str(stage.model_dir / "model.safetensors"), atol=atols, mode="bf16", rank=True)
    fp32 = compare(theta0, str(stage.master_path), atol=atols, mode="fp32")
    layers, kinds, grid = bf16.layer_module_grid(1e-5)
    _, _, grid0 = bf16.layer_module_grid(0.0)

    snaps = stage.snapshots
    snap_paths = [str(p) for _, p in snaps]
    vs_theta0 = compare_many(theta0, snap_paths, atol=DYNAMICS_ATOLS, mode="bf16") if snaps else []
    consecutive = []
    prev = theta0
    for step, p in snaps:
        r = compare(prev, str(p), atol=DYNAMICS_ATOLS, mode="bf16")
        consecutive.append({"step": step, "sparsity": {repr(a): r.sparsity(a) for a in DYNAMICS_ATOLS}})
        prev = str(p)
    sparsity_vs_step = [{"step": 0, "sparsity": {repr(a): 1.0 for a in DYNAMICS_ATOLS}}] + [
        {"step": s, "sparsity": {repr(a): r.sparsity(a) for a in DYNAMICS_ATOLS}} for (s, _), r in zip(snaps, vs_theta0)
    ]

    # Per-entry views: read θ0, the final model and the snapshots (bf16, a few MB for the lab models).
    base = _read_all(Path(theta0))
    final = _read_all(stage.model_dir / "model.safetensors")
    masters = _read_all(stage.master_path)
    snapshot_tensors = [_read_all(Path(p)) for p in snap_paths]
    decomposition = []
    if snapshot_tensors:
        decomposition = [c.to_record() for c in decompose(base, snapshot_tensors, DYNAMICS_ATOLS)]
        # The last snapshot is the final model: the decomposition's final share must be the engine's density.
        for rec in decomposition:
            engine_changed = _global(bf16, rec["atol"])["changed"]
            if rec["final"] != engine_changed:
                raise RlsubnetError(
                    f"stage {stage.name}: snapshot decomposition counts {rec['final']} changed entries at atol "
                    f"{rec['atol']} but the compare engine counts {engine_changed}: the last snapshot is not the final model"
                )
    magnitude = magnitude_profile(base, final, DYNAMICS_ATOLS, mode="bf16").to_record()
    magnitude_fp32 = magnitude_profile(base, masters, (0.0, 1e-5), mode="fp32").to_record()

    steps_file = stage.dir / "steps.json"
    steps = json.loads(steps_file.read_text()) if steps_file.is_file() else None

    return {
        "bf16": bf16.to_json(),
        "bf16_rank": {
            "mean_rank_ratio": bf16.mean_rank_ratio,
            "per_matrix": [
                {"name": t.name, "rank": t.rank, "rank_ratio": t.rank_ratio} for t in bf16.tensors if t.rank is not None
            ],
        },
        "matrices": [
            {
                "name": t.name,
                "module": t.module,
                "layer": t.layer,
                "shape": list(t.shape),
                "sparsity": 1 - t.density(1e-5),
                "sparsity_0": 1 - t.density(0.0),
                "rank_ratio": t.rank_ratio,
            }
            for t in bf16.tensors
            if len(t.shape) == 2 and t.module not in ("norm", "embed", "lm_head")
        ],
        "fp32": fp32.to_json(),
        "sparsity": {
            "bf16": {repr(a): bf16.sparsity(a) for a in atols},
            "fp32": {repr(a): fp32.sparsity(a) for a in atols},
        },
        "grid": {"layers": layers, "modules": kinds, "sparsity_1e-05": grid, "sparsity_0": grid0},
        "sparsity_vs_step": sparsity_vs_step,
        "consecutive_snapshots": consecutive,
        "snapshot_every": stage.record["spec"].get("snapshot_every"),
        "decomposition_snapshots": decomposition,
        "step_to_step": steps["steps"] if steps else [],
        "decomposition_every_step": steps["decomposition_every_step"] if steps else [],
        "magnitude_bf16": magnitude,
        "magnitude_fp32": magnitude_fp32,
    }


# -- the subnetwork re-runs and their overlap


def _identity(full: Path, other: Path, inside: Mask | None, *, mode: str = MASK_MODE) -> list[dict]:
    """Share of entries with |θ_full − θ_other| ≤ atol per identity atol, overall and inside ``inside``."""
    return identity(full, other, atols=IDENTITY_ATOLS, inside=inside, mode=mode)


def first_differing_step(full_dir: Path, other_dir: Path, key: str) -> int | None:
    """First optimizer step whose logged ``key`` differs between two stages' log.jsonl (None: never)."""

    def series(d):
        out = {}
        p = Path(d) / "log.jsonl"
        if p.is_file():
            for line in p.read_text().splitlines():
                r = json.loads(line)
                if key in r and "train_runtime" not in r:
                    out[r["step"]] = r[key]
        return out

    a, b = series(full_dir), series(other_dir)
    for step in sorted(set(a) & set(b)):
        if a[step] != b[step]:
            return step
    return None


def _stage_sparsity(theta0: Path, stage: StageResult) -> dict:
    bf16 = compare(
        str(theta0 / "model.safetensors"),
        str(stage.model_dir / "model.safetensors"),
        atol=(0.0, MASK_ATOL),
        mode="bf16",
    )
    fp32 = compare(str(theta0 / "model.safetensors"), str(stage.master_path), atol=0.0, mode="fp32")
    return {
        "bf16": {"0.0": bf16.sparsity(0.0), repr(MASK_ATOL): bf16.sparsity(MASK_ATOL)},
        "fp32": {"0.0": fp32.sparsity(0.0)},
    }


def run_record(theta0: Path, stage: StageResult, spec: StageSpec, role: str, of: str | None) -> dict:
    rec = stage.record
    out = {
        "role": role,
        "of": of,
        "spec": rec["spec"],
        "settings": rec["settings"],
        "description": spec.description,
        "accuracy": rec["accuracy"],
        "train_summary": rec["train_summary"],
        "stage_timings": rec["timings"],
        "optimizer": rec["optimizer"],
        "sparsity": _stage_sparsity(theta0, stage),
    }
    if rec.get("extra"):
        out["mask"] = rec["extra"].get("mask")
    if rec.get("after_train"):
        out["masked_optimizer"] = rec["after_train"].get("mask")
    return out


def overlap_section(
    theta0: Path, masks: Mapping[str, Mask], stage_settings: Mapping[str, dict], seed: int, second_task: str | None
) -> dict:
    """Every pair of ``masks`` (matrix, per layer, per module) and the named comparisons beside the paper's Table 4."""
    labels = list(masks)
    res = overlap_many([masks[label] for label in labels], labels, base=theta0 / "model.safetensors")
    comparisons = []
    for group, a, b, what in named_pairs(seed, second_task):
        if a not in labels or b not in labels:
            continue
        i, j = labels.index(a), labels.index(b)
        p = res.pairs[[(x.a, x.b) for x in res.pairs].index((a, b) if i < j else (b, a))]
        f = dict(p.figures)
        if i > j:  # report as (a, b) in the order named
            f = _swap(f)
        excess = (f["o1"] - f["chance_o1"]) if f["o1"] is not None else None
        explained = ((f["magnitude_chance_o1"] - f["chance_o1"]) / excess) if excess else None
        row = {
            "group": group,
            "a": a,
            "b": b,
            "what": what,
            **{
                k: f[k]
                for k in (
                    *PAIR_FIGURES,
                    *MAGNITUDE_CHANCE_FIGURES,
                    "density_a",
                    "density_b",
                    "intersection",
                    "count_a",
                    "count_b",
                    "numel",
                )
            },
            "o1_over_chance": f["o1"] / f["chance_o1"] if f["o1"] is not None and f["chance_o1"] else None,
            "o1_over_magnitude_chance": (
                f["o1"] / f["magnitude_chance_o1"] if f["o1"] is not None and f["magnitude_chance_o1"] else None
            ),
            "magnitude_explains_share_of_excess": explained,
            **reach(f["o1"], f["o2"], f["density_a"], f["density_b"]),
            "settings_a": stage_settings.get(a, {}).get("settings"),
            "settings_b": stage_settings.get(b, {}).get("settings"),
            "modules": p.modules if i < j else [_swap(m) for m in p.modules],
            "layers": p.layers if i < j else [_swap(m) for m in p.layers],
            "buckets": p.buckets,
        }
        paper_row = next((r for r in paper.TABLE4 if r[0] == group), None)
        if paper_row and (group != "algorithm" or (a, b) == ("grpo", "dpo")):
            o1, o2, c1, c2 = (x / 100 for x in paper_row[2:6])
            row["paper"] = {
                "what": paper_row[1],
                "o1": o1,
                "o2": o2,
                "chance_o1": c1,
                "chance_o2": c2,
                **reach(o1, o2, c2, c1),
            }  # the paper's chance o1 is B's density, chance o2 A's
        comparisons.append(row)
    matrix = res.to_json()
    for pr in matrix["pairs"]:
        pr.pop("buckets", None)  # the named comparisons keep theirs; the matrix keeps layers and modules
    return {
        "labels": labels,
        "settings": res.settings,
        "warnings": res.warnings,
        "densities": dict(zip(labels, res.densities)),
        "matrix": matrix["matrix"],
        "pairs": matrix["pairs"],
        "comparisons": comparisons,
    }


def reach(o1: float | None, o2: float | None, d_a: float, d_b: float) -> dict:
    """How far each overlap sits between the density chance (0) and the most the two densities allow (1).

    |A∩B| ≤ min(|A|, |B|), so o1 can reach at most min(1, d_B / d_A) and o2 at most min(1, d_A / d_B); with a
    dense mask (SFT at its usual lr) the raw excess over chance is small because there is little room, and this
    share says how much of that room is used. Both equal (|A∩B| − n·d_A·d_B) / (min(|A|, |B|) − n·d_A·d_B), so
    ``reach`` is one number per pair (``reach_o1`` and ``reach_o2`` are kept as computed)."""

    def one(o, chance, top):
        if o is None or top - chance <= 0:
            return None
        return (o - chance) / (top - chance)

    top1 = min(1.0, d_b / d_a) if d_a else None
    top2 = min(1.0, d_a / d_b) if d_b else None
    r1 = one(o1, d_b, top1) if top1 is not None else None
    r2 = one(o2, d_a, top2) if top2 is not None else None
    return {"max_o1": top1, "max_o2": top2, "reach_o1": r1, "reach_o2": r2, "reach": r1 if r1 is not None else r2}


def _swap(f: dict) -> dict:
    out = dict(f)
    for x, y in (
        ("o1", "o2"),
        ("chance_o1", "chance_o2"),
        ("magnitude_chance_o1", "magnitude_chance_o2"),
        ("density_a", "density_b"),
        ("count_a", "count_b"),
    ):
        if x in f or y in f:
            out[x], out[y] = f.get(y), f.get(x)
    return out


def rerun_section(theta0: Path, full: StageResult, mask: Mask, rows: Sequence[tuple]) -> dict:
    """Table 3 for one algorithm. ``rows``: (name, stage, role, mask it trained on or None for a full run).

    Per row: identity with θ_full per atol, overall and inside ``mask`` (the full run's subnetwork), in bf16 and
    between the fp32 masters; held-out accuracy; for masked rows, the bit-for-bit check of the fp32 masters
    outside the mask the row trained on (an error if any moved).
    """
    out_rows = []
    for name, stage, role, own in rows:
        rec = {
            "run": name,
            "role": role,
            "identity": _identity(full.model_dir, stage.model_dir, mask),
            "identity_fp32_masters": _identity(full.master_path, stage.master_path, mask, mode="fp32"),
            "accuracy": stage.record["accuracy"],
            "first_step_loss_differs": first_differing_step(full.dir, stage.dir, "loss"),
            "first_step_reward_differs": first_differing_step(full.dir, stage.dir, "reward"),
        }
        if own is not None:
            used = ((stage.record.get("extra") or {}).get("mask") or {}).get("bits_sha256")
            if used != own.bits_sha256():
                raise RlsubnetError(f"stage {name}: trained on a mask other than the one given for its check")
            check = check_frozen_masters(own, theta0, stage.master_path)
            if check["frozen_entries_moved"]:
                raise RlsubnetError(
                    f"stage {name}: {check['frozen_entries_moved']:,} fp32 master entries outside its mask differ from θ0 "
                    f"({', '.join(check['moved_by_tensor'])}): the masked run leaked"
                )
            rec["frozen_masters"] = check
            rec["trained_mask"] = {"kind": own.kind, "density": own.density, "changed": own.changed}
            if own is not mask:
                rec["identity_inside_own_mask"] = _identity(full.model_dir, stage.model_dir, own)
        out_rows.append(rec)
    return {
        "full": full.name,
        "mask": {
            "of": full.name,
            "atol": mask.atol,
            "dtype": mask.dtype,
            "density": mask.density,
            "changed": mask.changed,
            "numel": mask.numel,
        },
        "full_accuracy": full.record["accuracy"],
        "rows": out_rows,
    }


def measure_subnetwork(
    theta0: Path,
    out: Path,
    stages: Mapping[str, StageResult],
    extra: Mapping[str, StageResult],
    extra_specs: Mapping[str, StageSpec],
    store: MaskStore,
    skipped: Mapping[str, str],
    cfg: DemoConfig,
) -> dict:
    """``results["subnetwork"]``: the new runs, the masks, Table 3 per algorithm and Table 4 (see
    :mod:`rlsubnet.lab.subnet`).

    ``stages``: the finetuning stages that start from θ0 (finished); ``extra``: the extra-seed runs and the masked
    re-runs (finished); ``store``: the run's masks; ``skipped``: stage name -> why it did not run.
    """
    roles = {}
    for name in extra:
        for of in RERUN_OF:
            if name == f"{of}-subnet":
                roles[name] = ("subnetwork re-run", of)
            elif name == f"{of}-random":
                roles[name] = ("random-mask re-run", of)
            elif name == f"{of}-predicted":
                roles[name] = ("predicted-mask re-run", of)
            elif name.startswith(f"{of}-seed"):
                roles[name] = ("full run, another seed", of)
    runs = {
        name: run_record(theta0, res, extra_specs[name], *roles.get(name, ("extra", None)))
        for name, res in extra.items()
    }

    reruns = {}
    for of in RERUN_OF:
        if of not in stages:
            continue
        full = stages[of]
        mask = store.changed(of, full)
        rows = []
        if f"{of}-subnet" in extra:
            rows.append((f"{of}-subnet", extra[f"{of}-subnet"], "subnetwork re-run", mask))
        if f"{of}-random" in extra:
            rows.append((f"{of}-random", extra[f"{of}-random"], "random-mask re-run", store.random_like(of, full)))
        if f"{of}-predicted" in extra:
            predicted = store.masks.get(predicted_mask_label(of))
            if predicted is None:
                raise RlsubnetError(f"stage {of}-predicted: the predicted mask it trained on was not made in this run")
            rows.append((f"{of}-predicted", extra[f"{of}-predicted"], "predicted-mask re-run", predicted))
        for name in sorted(n for n in extra if roles.get(n) == ("full run, another seed", of)):
            rows.append((name, extra[name], "full run, another seed", None))
        if rows:
            reruns[of] = rerun_section(theta0, full, mask, rows)

    everything = {**stages, **extra}
    labels = overlap_labels(list(stages), [n for n in extra if roles.get(n, ("",))[0] == "full run, another seed"])
    masks = {label: store.changed(label, everything[label]) for label in labels}
    settings = {label: {"settings": everything[label].record["settings"]} for label in labels}
    if "grpo" in stages:
        rlabel = random_mask_label("grpo")
        masks[rlabel] = store.random_like("grpo", stages["grpo"])
        settings[rlabel] = {
            "settings": f"random {RANDOM_SCOPE.replace('_', '-')} mask with grpo's count in every tensor, "
            f"seed {cfg.seed}"
        }
    overlap = overlap_section(theta0, masks, settings, cfg.seed, cfg.second_task) if len(masks) >= 2 else None

    return {
        "settings": {
            "mask": f"entries of the bf16 checkpoint with |θ − θ0| > {MASK_ATOL:g} (compare engine's test), per stage",
            "mask_atol": MASK_ATOL,
            "mask_dtype": MASK_MODE,
            "identity": "share of entries with |θ_full − θ_other| ≤ atol, on the bf16 checkpoints (and between the fp32 "
            "masters, identity_fp32_masters); 'inside the mask' = among the full run's subnetwork entries",
            "identity_atols": list(IDENTITY_ATOLS),
            "masked_training": "rlsubnet.train.attach_sparse on the stage's TRL trainer (sparse optimizer state; "
            "bit-identical to attach_mask's dense state on these fp32 masters): clip the full gradient, then mask; "
            "AdamW (single-tensor arithmetic), no weight decay; same spec, seed and data order as the full run",
            "mask_options": dict(MASK_OPTIONS),
            "random_mask": f"{RANDOM_SCOPE.replace('_', '-')}: every tensor gets exactly the full run's count there "
            f"(so norms stay frozen), uniformly placed, seed {cfg.seed} (numpy PCG64)",
            "extra_seeds": "another seed changes the trainer seed (GRPO's sampling) and the data order (data_seed = seed)",
            "magnitude_chance": "parameters bucketed by the bf16 exponent of |w| in θ0 (one bucket per octave); chance "
            "intersection Σ_b n_b·p_A,b·p_B,b with p estimated from the masks",
        },
        "runs": runs,
        "skipped": dict(skipped),
        "masks": {label: mask_record(m, store.paths.get(label), out) for label, m in store.masks.items()},
        "reruns": reruns,
        "overlap": overlap,
        "paper": {
            "table3": {alg: {repr(a): v for a, v in d.items()} for alg, d in paper.TABLE3.items()},
            "table3_accuracy": paper.TABLE3_ACCURACY,
            "table4": [
                {
                    **dict(zip(("comparison", "what", "o1", "o2", "chance_o1", "chance_o2"), r)),
                    # the paper's chance o1 is B's density, chance o2 A's
                    "reach": reach(r[2] / 100, r[3] / 100, r[5] / 100, r[4] / 100)["reach"],
                }
                for r in paper.TABLE4
            ],
        },
    }


# -- the tasks


def commuted_twins(tasks: Sequence[str]) -> dict:
    """How 'held out' the held-out addition problems are: a+b is never trained on, but b+a may be. For the run's
    addition task, the held-out problems a+b with a ≠ b and how many of them have b+a in the training split."""
    if "add" not in tasks:
        return {}
    add = get_task("add")
    train = {p.prompt for p in add.split("train")}
    held = [p.prompt for p in add.split("heldout")]
    asym = [q for q in held if q.split("+")[0] != q.split("+")[1].rstrip("=")]
    twins = sum(1 for q in asym if f"{q.split('+')[1].rstrip('=')}+{q.split('+')[0]}=" in train)
    return {"add": {"heldout_asymmetric": len(asym), "commuted_twin_in_train": twins}}
