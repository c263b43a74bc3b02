"""The demo's subnetwork phase: the paper's Table 3 and Table 4 on the lab model, with baselines.

- **Re-runs** (Table 3): for GRPO and DPO, the full run's mask M (entries of the bf16 checkpoint that changed
  against θ0, |Δ| > 1e-5) and a re-run from θ0 with the *same spec* (seed, data seed, hence the same rows in
  the same order and the same sampling RNG), its optimizer restricted to M by :func:`rlsubnet.train.attach_mask`
  (clip the full gradient, then mask, as the paper). Baselines: the same re-run with a random mask of M's
  density (per tensor: every tensor keeps M's count), and full runs with other seeds. For each, identity with
  θ_full at atol 0, 1e-5 and 1e-4, overall and inside M (bf16), held-out accuracy, and a bit-for-bit check that
  every fp32 master weight outside the mask is still θ0's value.
- **Overlap** (Table 4): masks of GRPO under 3 seeds, GRPO on the second training set, DPO (2 seeds), SFT at the
  usual and at the RL learning rate, GRPO at the SFT learning rate, and the random mask; o1, o2, Jaccard, the
  paper's density chance and the magnitude-matched chance for every pair, per layer and per module.

The pipeline (:mod:`rlsubnet.lab.pipeline`) schedules the stages; this module holds the specs, runs a masked
stage, and measures. ``benchmarks/subnetwork_rerun.py`` was the prototype of this phase; the demo replaced it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlsubnet.errors import RlsubnetError

MASK_ATOL = 1e-5
MASK_DTYPE = "bf16"
IDENTITY_ATOLS = (0.0, 1e-5, 1e-4)
RANDOM_SCOPE = "per_tensor"
RERUN_OF = ("grpo", "dpo")  # full runs re-run on their own subnetwork (and on a random mask of equal density)
EXTRA_SEEDS = {"grpo": 2, "dpo": 1}  # extra full runs with seeds seed + 1, seed + 2, ...
MASK_OPTIONS = {"strict": None, "mask_before_clip": False, "compare_dtype": MASK_DTYPE}


def seed_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def random_mask_label(of: str) -> str:
    return f"random ({of}'s density)"


def extra_seed_specs(spec_by_name: Mapping) -> list:
    """Full runs of GRPO and DPO with other seeds (their data order follows the seed too)."""
    out = []
    for name, k in EXTRA_SEEDS.items():
        if name not in spec_by_name:
            continue
        spec = spec_by_name[name]
        for i in range(1, k + 1):
            seed = spec.seed + i
            out.append(dataclasses.replace(
                spec, name=seed_name(name, seed), seed=seed, data_seed=None,
                description=f"`{name}` with seed {seed} (its sampling and data order), a full run"))
    return out


def rerun_spec(spec, kind: str):
    """The same spec under another name: same seed and data seed, hence the same rows in the same order."""
    if kind == "subnet":
        desc = f"`{spec.name}` re-run from θ0 training only `{spec.name}`'s subnetwork (same seed and data order)"
    elif kind == "random":
        desc = (f"`{spec.name}` re-run from θ0 training only a random mask of the subnetwork's density "
                f"({RANDOM_SCOPE.replace('_', '-')}; same seed and data order)")
    else:
        raise ValueError(kind)
    return dataclasses.replace(spec, name=f"{spec.name}-{kind}", description=desc)


def overlap_labels(stage_names: Sequence[str], extra_names: Sequence[str]) -> list[str]:
    """Stages whose masks enter the overlap matrix, in display order (those that exist)."""
    have = list(stage_names) + list(extra_names)
    order = ["grpo", *sorted(n for n in have if n.startswith("grpo-seed")), *[n for n in have if n.startswith("grpo-task-")],
             "dpo", *sorted(n for n in have if n.startswith("dpo-seed")), "sft", "sft-matched", "grpo-sftlr"]
    return [n for n in order if n in have]


# -- masks


def build_stage_mask(theta0: Path, stage) -> "Mask":  # noqa: F821
    """The subnetwork of a finished stage: bf16 entries that changed against θ0 at atol 1e-5."""
    from rlsubnet.masks import build_mask

    return build_mask(theta0, stage.model_dir, atol=MASK_ATOL, dtype=MASK_DTYPE)


def mask_record(mask, path: Path | None = None, root: Path | None = None) -> dict:
    """What a table needs about a mask, and where its file is."""
    rec = {
        "kind": mask.kind, "atol": mask.atol, "dtype": mask.dtype, "numel": mask.numel, "changed": mask.changed,
        "density": mask.density, "bits_sha256": mask.bits_sha256(),
        "layers": mask.layers(), "modules": mask.modules(),
    }
    rnd = (mask.meta.get("extra") or {}).get("random")
    if rnd:
        rec["random"] = {k: rnd.get(k) for k in ("scope", "seed", "matched")}
    if path is not None:
        rec["file"] = str(path.relative_to(root)) if root is not None else str(path)
    return rec


def mask_extra_record(mask, role: str, of: str) -> dict:
    """The fingerprinted description of a masked stage's mask (no file paths: the bits decide)."""
    rec = {"role": role, "of": of, "kind": mask.kind, "atol": mask.atol, "dtype": mask.dtype,
           "density": mask.density, "bits_sha256": mask.bits_sha256(), "options": dict(MASK_OPTIONS)}
    rnd = (mask.meta.get("extra") or {}).get("random")
    if rnd:
        rec["random"] = {"scope": rnd.get("scope"), "seed": rnd.get("seed")}
    return {"mask": rec}


def run_masked_stage(spec, *, mask_path: str | Path, mask_sha256: str, allow_full: bool = False, **run_stage_kwargs):
    """:func:`rlsubnet.lab.stages.run_stage` with the optimizer restricted to the mask in ``mask_path``.

    The file's bits must hash to ``mask_sha256`` (what the fingerprint recorded). The masked optimizer's report
    (trainable entries, steps, mode, order) is stored in stage.json as ``after_train.mask``.
    """
    from rlsubnet.lab import stages
    from rlsubnet.masks import Mask
    from rlsubnet.train import attach_mask

    mask = Mask.load(mask_path)
    if mask.bits_sha256() != mask_sha256:
        raise RlsubnetError(f"{mask_path}: its bits are not the mask this stage was planned with")
    holder = []

    def configure(trainer):
        holder.append(attach_mask(trainer, mask, allow_full=allow_full, **MASK_OPTIONS))

    def after(trainer):
        return {"mask": holder[0].last_report if holder else None}

    return stages.run_stage(spec, configure_trainer=configure, after_train=after, **run_stage_kwargs)


# -- measurements


def identity_table(full, other, inside=None, *, atols: Sequence[float] = IDENTITY_ATOLS, dtype: str = MASK_DTYPE) -> list[dict]:
    """Identity of two trained models (share of entries with |θ_full − θ_other| ≤ atol) per atol, overall and
    inside ``inside`` (:func:`rlsubnet.masks.identity`)."""
    from rlsubnet.masks import identity

    return identity(full, other, atols=atols, inside=inside, dtype=dtype)


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


def _stage_sparsity(theta0: Path, stage) -> dict:
    from rlsubnet.engine import compare

    bf16 = compare(str(theta0 / "model.safetensors"), str(stage.model_dir / "model.safetensors"), atol=(0.0, MASK_ATOL), dtype="bf16")
    fp32 = compare(str(theta0 / "model.safetensors"), str(stage.master_path), atol=0.0, dtype="fp32")
    return {"bf16": {"0.0": bf16.sparsity(0.0), repr(MASK_ATOL): bf16.sparsity(MASK_ATOL)}, "fp32": {"0.0": fp32.sparsity(0.0)}}


def run_record(theta0: Path, stage, spec, role: str, of: str | None) -> dict:
    rec = stage.record
    out = {
        "role": role, "of": of, "spec": rec["spec"], "settings": rec["settings"], "description": spec.description,
        "accuracy": rec["accuracy"], "train_summary": rec["train_summary"], "stage_timings": rec["timings"],
        "optimizer": rec["optimizer"], "sparsity": _stage_sparsity(theta0, stage),
    }
    if rec.get("extra"):
        out["mask"] = rec["extra"].get("mask")
    if rec.get("after_train"):
        out["masked_optimizer"] = rec["after_train"].get("mask")
    return out


def named_pairs(seed: int, second_task: str | None) -> list[tuple[str, str, str, str]]:
    """(group, a, b, what varies) of the comparisons beside the paper's Table 4; absent labels are skipped later."""
    g, d = "grpo", "dpo"
    s1, s2 = seed + 1, seed + 2
    pairs = [
        ("seeds", g, seed_name(g, s1), f"GRPO, seed {seed} vs {s1}"),
        ("seeds", g, seed_name(g, s2), f"GRPO, seed {seed} vs {s2}"),
        ("seeds", seed_name(g, s1), seed_name(g, s2), f"GRPO, seed {s1} vs {s2}"),
        ("seeds", d, seed_name(d, s1), f"DPO, seed {seed} vs {s1}"),
    ]
    if second_task:
        pairs.append(("data", g, f"grpo-task-{second_task}", f"GRPO, first vs second training set ({second_task})"))
    pairs += [
        ("algorithm", g, d, "GRPO vs DPO, both at the RL lr"),
        ("algorithm", g, "sft", "GRPO (RL lr) vs SFT (SFT lr)"),
        ("algorithm", d, "sft", "DPO (RL lr) vs SFT (SFT lr)"),
        ("algorithm", g, "sft-matched", "GRPO vs SFT, both at the RL lr"),
        ("algorithm", d, "sft-matched", "DPO vs SFT, both at the RL lr"),
        ("algorithm", "grpo-sftlr", "sft", "GRPO vs SFT, both at the SFT lr"),
        ("control", g, random_mask_label(g), "GRPO vs a random per-tensor mask of its density"),
    ]
    return pairs


PAPER_ROW = {"seeds": "seeds", "data": "data", "algorithm": "algorithm"}


def overlap_section(theta0: Path, masks: Mapping[str, object], stage_settings: Mapping[str, dict], seed: int,
                    second_task: str | None) -> dict:
    """Every pair of ``masks`` (matrix, per layer, per module) and the named comparisons beside the paper's Table 4."""
    from rlsubnet.masks import overlap_many
    from rlsubnet.report import paper_numbers as paper

    labels = list(masks)
    res = overlap_many([masks[l] for l in labels], labels, base=theta0 / "model.safetensors")
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
        row = {"group": group, "a": a, "b": b, "what": what, **{k: f[k] for k in (
            "o1", "o2", "jaccard", "chance_o1", "chance_o2", "chance_jaccard", "magnitude_chance_o1", "magnitude_chance_o2",
            "magnitude_chance_jaccard", "density_a", "density_b", "intersection", "count_a", "count_b", "numel")},
            "o1_over_chance": f["o1"] / f["chance_o1"] if f["o1"] is not None and f["chance_o1"] else None,
            "o1_over_magnitude_chance": (f["o1"] / f["magnitude_chance_o1"]
                                         if f["o1"] is not None and f["magnitude_chance_o1"] else None),
            "magnitude_explains_share_of_excess": explained,
            **reach(f["o1"], f["o2"], f["density_a"], f["density_b"]),
            "settings_a": stage_settings.get(a, {}).get("settings"), "settings_b": stage_settings.get(b, {}).get("settings"),
            "modules": p.modules if i < j else [_swap(m) for m in p.modules],
            "layers": p.layers if i < j else [_swap(m) for m in p.layers],
            "buckets": p.buckets}
        paper_row = next((r for r in paper.TABLE4 if r[0] == PAPER_ROW.get(group)), None)
        if paper_row and (group != "algorithm" or (a, b) == ("grpo", "dpo")):
            o1, o2, c1, c2 = (x / 100 for x in paper_row[2:6])
            row["paper"] = {"what": paper_row[1], "o1": o1, "o2": o2, "chance_o1": c1, "chance_o2": c2,
                            **reach(o1, o2, c2, c1)}  # the paper's chance o1 is B's density, chance o2 A's
        comparisons.append(row)
    matrix = res.to_json()
    for pr in matrix["pairs"]:
        pr.pop("buckets", None)  # the named comparisons keep theirs; the matrix keeps layers and modules
    return {"labels": labels, "settings": res.settings, "warnings": res.warnings,
            "densities": dict(zip(labels, res.densities)), "matrix": matrix["matrix"], "pairs": matrix["pairs"],
            "comparisons": comparisons}


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
    for x, y in (("o1", "o2"), ("chance_o1", "chance_o2"), ("magnitude_chance_o1", "magnitude_chance_o2"),
                 ("density_a", "density_b"), ("count_a", "count_b")):
        if x in f or y in f:
            out[x], out[y] = f.get(y), f.get(x)
    return out


def rerun_section(theta0: Path, full, mask, rows: Sequence[tuple]) -> dict:
    """Table 3 for one algorithm. ``rows``: (name, stage, role, mask it trained on or None for a full run).

    Per row: identity with θ_full per atol, overall and inside ``mask`` (the full run's subnetwork), in bf16 and
    between the fp32 masters; held-out accuracy; for masked rows, the bit-for-bit check of the fp32 masters
    outside the mask the row trained on (an error if any moved).
    """
    from rlsubnet.train import check_frozen_masters

    out_rows = []
    for name, stage, role, own in rows:
        rec = {"run": name, "role": role,
               "identity": identity_table(full.model_dir, stage.model_dir, mask),
               "identity_fp32_masters": identity_table(full.master_path, stage.master_path, mask, dtype="fp32"),
               "accuracy": stage.record["accuracy"],
               "first_step_loss_differs": first_differing_step(full.dir, stage.dir, "loss"),
               "first_step_reward_differs": first_differing_step(full.dir, stage.dir, "reward")}
        if own is not None:
            used = ((stage.record.get("extra") or {}).get("mask") or {}).get("bits_sha256")
            if used != own.bits_sha256():
                raise RlsubnetError(f"stage {name}: trained on a mask other than the one given for its check")
            check = check_frozen_masters(own, theta0, stage.master_path)
            if check["frozen_entries_moved"]:
                raise RlsubnetError(
                    f"stage {name}: {check['frozen_entries_moved']:,} fp32 master entries outside its mask differ from θ0 "
                    f"({', '.join(check['moved_by_tensor'])}): the masked run leaked")
            rec["frozen_masters"] = check
            rec["trained_mask"] = {"kind": own.kind, "density": own.density, "changed": own.changed}
            if own is not mask:
                rec["identity_inside_own_mask"] = identity_table(full.model_dir, stage.model_dir, own)
        out_rows.append(rec)
    return {"full": full.name, "mask": {"of": full.name, "atol": mask.atol, "dtype": mask.dtype, "density": mask.density,
                                         "changed": mask.changed, "numel": mask.numel},
            "full_accuracy": full.record["accuracy"], "rows": out_rows}


def measure(theta0: Path, out: Path, stages: Mapping, extra: Mapping, extra_specs: Mapping, store, skipped: Mapping,
            cfg) -> dict:
    """``results["subnetwork"]``: the new runs, the masks, Table 3 per algorithm and Table 4 (see the module doc).

    ``stages``: the finished finetuning stages; ``extra``: the extra-seed runs and the masked re-runs (finished);
    ``store``: the run's :class:`rlsubnet.lab.pipeline.MaskStore`; ``skipped``: stage name -> why it did not run.
    """
    from rlsubnet.report import paper_numbers as paper

    roles = {}
    for name in extra:
        for of in RERUN_OF:
            if name == f"{of}-subnet":
                roles[name] = ("subnetwork re-run", of)
            elif name == f"{of}-random":
                roles[name] = ("random-mask re-run", of)
            elif name.startswith(f"{of}-seed"):
                roles[name] = ("full run, another seed", of)
    runs = {name: run_record(theta0, res, extra_specs[name], *roles.get(name, ("extra", None))) for name, res in extra.items()}

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
        settings[rlabel] = {"settings": f"random {RANDOM_SCOPE.replace('_', '-')} mask with grpo's count in every tensor, "
                                        f"seed {cfg.seed}"}
    overlap = overlap_section(theta0, masks, settings, cfg.seed, cfg.second_task) if len(masks) >= 2 else None

    return {
        "settings": {
            "mask": f"entries of the bf16 checkpoint with |θ − θ0| > {MASK_ATOL:g} (compare engine's test), per stage",
            "mask_atol": MASK_ATOL, "mask_dtype": MASK_DTYPE,
            "identity": "share of entries with |θ_full − θ_other| ≤ atol, on the bf16 checkpoints (and between the fp32 "
                        "masters, identity_fp32_masters); 'inside the mask' = among the full run's subnetwork entries",
            "identity_atols": list(IDENTITY_ATOLS),
            "masked_training": "rlsubnet.train.attach_mask on the stage's TRL trainer: clip the full gradient, then mask; "
                               "AdamW (single-tensor), no weight decay; same spec, seed and data order as the full run",
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
        "paper": {"table3": {alg: {repr(a): v for a, v in d.items()} for alg, d in paper.TABLE3.items()},
                  "table3_accuracy": paper.TABLE3_ACCURACY,
                  "table4": [dict(zip(("comparison", "what", "o1", "o2", "chance_o1", "chance_o2"), r)) for r in paper.TABLE4]},
    }
