"""The demo's subnetwork experiments (the paper's Tables 3 and 4 on the lab model, with baselines): which runs,
on which masks, and how a masked stage runs. Their measurements are in :mod:`rlsubnet.lab.measure`.

- **Re-runs** (Table 3): for GRPO and DPO, the full run's mask M (entries of the bf16 checkpoint that changed
  against θ0, |Δ| > 1e-5) and a re-run from θ0 with the *same spec* (seed, data seed, hence the same rows in
  the same order and the same sampling RNG), its optimizer restricted to M by :func:`attach_masked_optimizer`
  (clip the full gradient, then mask, as the paper; sparse optimizer state by default). Baselines: the same re-run with a random mask of M's
  density (per tensor: every tensor keeps M's count), and full runs with other seeds.
- **Overlap** (Table 4): masks of GRPO under 3 seeds, GRPO on the second training set, DPO (2 seeds), SFT at the
  usual and at the RL learning rate, GRPO at the SFT learning rate, and the random mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlsubnet.errors import RlsubnetError
from rlsubnet.lab import stages
from rlsubnet.lab.config import StageSpec
from rlsubnet.masks import Mask, build_mask, random_mask

MASK_ATOL = 1e-5
MASK_MODE = "bf16"
IDENTITY_ATOLS = (0.0, 1e-5, 1e-4)
RANDOM_SCOPE = "per_tensor"
RERUN_OF = ("grpo", "dpo")  # full runs re-run on their own subnetwork (and on a random mask of equal density)
PREDICTED_OF = ("grpo",)  # full runs re-run on the mask predicted before them (rlsubnet.lab.predicting)
EXTRA_SEEDS = {"grpo": 2, "dpo": 1}  # extra full runs with seeds seed + 1, seed + 2, ...
MASK_OPTIONS = {"strict": None, "mask_before_clip": False, "compare_dtype": MASK_MODE}
# Not in MASK_OPTIONS (the fingerprint): on the stages' fp32 weights, which are their own masters, sparse and dense
# state give bit-identical weights, so a finished stage stays valid whichever state trained it.
OPTIMIZER_STATES = ("sparse", "dense")
OPTIMIZER_STATE = "sparse"


def seed_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def random_mask_label(of: str) -> str:
    return f"random ({of}'s density)"


def predicted_mask_label(of: str) -> str:
    return f"predicted ({of})"


def extra_seed_specs(spec_by_name: Mapping[str, StageSpec]) -> list[StageSpec]:
    """Full runs of GRPO and DPO with other seeds (their data order follows the seed too)."""
    out = []
    for name, k in EXTRA_SEEDS.items():
        if name not in spec_by_name:
            continue
        spec = spec_by_name[name]
        for i in range(1, k + 1):
            seed = spec.seed + i
            out.append(
                dataclasses.replace(
                    spec,
                    name=seed_name(name, seed),
                    seed=seed,
                    data_seed=None,
                    description=f"`{name}` with seed {seed} (its sampling and data order), a full run",
                )
            )
    return out


def rerun_spec(spec: StageSpec, kind: str) -> StageSpec:
    """The same spec under another name: same seed and data seed, hence the same rows in the same order."""
    if kind == "subnet":
        desc = f"`{spec.name}` re-run from θ0 training only `{spec.name}`'s subnetwork (same seed and data order)"
    elif kind == "random":
        desc = (
            f"`{spec.name}` re-run from θ0 training only a random mask of the subnetwork's density "
            f"({RANDOM_SCOPE.replace('_', '-')}; same seed and data order)"
        )
    elif kind == "predicted":
        desc = (
            f"`{spec.name}` re-run from θ0 training only the subnetwork predicted before the run, from θ0, its plan "
            "and a probe of its first steps (same seed and data order)"
        )
    else:
        raise ValueError(kind)
    return dataclasses.replace(spec, name=f"{spec.name}-{kind}", description=desc)


def overlap_labels(stage_names: Sequence[str], extra_names: Sequence[str]) -> list[str]:
    """Stages whose masks enter the overlap matrix, in display order (those that exist)."""
    have = list(stage_names) + list(extra_names)
    order = [
        "grpo",
        *sorted(n for n in have if n.startswith("grpo-seed")),
        *[n for n in have if n.startswith("grpo-task-")],
        "dpo",
        *sorted(n for n in have if n.startswith("dpo-seed")),
        "sft",
        "sft-matched",
        "grpo-sftlr",
    ]
    return [n for n in order if n in have]


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


# -- masks and masked stages


def build_stage_mask(theta0: Path, stage: stages.StageResult) -> Mask:
    """The subnetwork of a finished stage: bf16 entries that changed against θ0 at atol 1e-5."""
    return build_mask(theta0, stage.model_dir, atol=MASK_ATOL, mode=MASK_MODE)


def mask_record(mask, path: Path | None = None, root: Path | None = None) -> dict:
    """What a table needs about a mask, and where its file is."""
    rec = {
        "kind": mask.kind,
        "atol": mask.atol,
        "dtype": mask.mode,
        "numel": mask.numel,
        "changed": mask.changed,
        "density": mask.density,
        "bits_sha256": mask.bits_sha256(),
        "layers": mask.layers(),
        "modules": mask.modules(),
    }
    rnd = (mask.meta.get("extra") or {}).get("random")
    if rnd:
        rec["random"] = {k: rnd.get(k) for k in ("scope", "seed", "matched")}
    if path is not None:
        rec["file"] = str(path.relative_to(root)) if root is not None else str(path)
    return rec


def mask_extra_record(mask, role: str, of: str) -> dict:
    """The fingerprinted description of a masked stage's mask (no file paths: the bits decide)."""
    rec = {
        "role": role,
        "of": of,
        "kind": mask.kind,
        "atol": mask.atol,
        "dtype": mask.mode,
        "density": mask.density,
        "bits_sha256": mask.bits_sha256(),
        "options": dict(MASK_OPTIONS),
    }
    rnd = (mask.meta.get("extra") or {}).get("random")
    if rnd:
        rec["random"] = {"scope": rnd.get("scope"), "seed": rnd.get("seed")}
    return {"mask": rec}


def attach_masked_optimizer(trainer, mask, *, allow_full: bool = False, optimizer_state: str = OPTIMIZER_STATE):
    """Restrict a stage's trainer (built by :func:`rlsubnet.lab.trainers.build_trainer`) to ``mask`` as every masked
    stage is: clip the full gradient, then mask (:data:`MASK_OPTIONS`), the trainer's AdamW hyper-parameters.

    ``optimizer_state="sparse"``: :func:`rlsubnet.train.attach_sparse` replaces the trainer's AdamW with a
    :class:`~rlsubnet.train.SparseMaskedOptimizer` of the same settings (state for the mask's entries only; it
    clips, the trainer does not). ``"dense"``: :func:`rlsubnet.train.attach_mask` wraps the AdamW in a
    :class:`~rlsubnet.train.MaskedOptimizer`. Both give bit-identical weights on the stages' fp32 masters. Returns
    the callback; its ``last_report`` (after training) is what stage.json records as ``after_train.mask``.
    """
    from rlsubnet.train import attach_mask, attach_sparse  # transformers: the train extra

    # MASK_OPTIONS is recorded (and fingerprinted) under the option's older name, compare_dtype, so that
    # stage fingerprints and results.json stay comparable across versions; the optimizers take compare_mode.
    options = {("compare_mode" if k == "compare_dtype" else k): v for k, v in MASK_OPTIONS.items()}
    if optimizer_state == "dense":
        return attach_mask(trainer, mask, allow_full=allow_full, **options)
    if optimizer_state != "sparse":
        raise RlsubnetError(f"unknown optimizer state {optimizer_state!r} (choose from {', '.join(OPTIMIZER_STATES)})")
    options.pop("strict")  # frozen entries are never written: there is nothing to restore
    return attach_sparse(trainer, mask, allow_full=allow_full, **options)


def run_masked_stage(
    spec,
    *,
    mask_path: str | Path,
    mask_sha256: str,
    allow_full: bool = False,
    optimizer_state: str = OPTIMIZER_STATE,
    **run_stage_kwargs,
):
    """:func:`rlsubnet.lab.stages.run_stage` with the optimizer restricted to the mask in ``mask_path``
    (:func:`attach_masked_optimizer`).

    The file's bits must hash to ``mask_sha256`` (what the fingerprint recorded). The masked optimizer's report
    (trainable entries, steps, order, state) is stored in stage.json as ``after_train.mask``.
    """
    mask = Mask.load(mask_path)
    if mask.bits_sha256() != mask_sha256:
        raise RlsubnetError(f"{mask_path}: its bits are not the mask this stage was planned with")
    holder = []

    def configure(trainer):
        holder.append(attach_masked_optimizer(trainer, mask, allow_full=allow_full, optimizer_state=optimizer_state))

    def after(trainer):
        return {"mask": holder[0].last_report if holder else None}

    return stages.run_stage(spec, configure_trainer=configure, after_train=after, **run_stage_kwargs)


class MaskStore:
    """The masks of the subnetwork phase, built once per run from θ0 and the finished stages, saved under
    ``OUT/masks/`` (each a ``rlsubnet mask`` file: usable with ``rlsubnet overlap`` and ``rlsubnet train --mask``)."""

    def __init__(self, out: Path, theta0: Path, seed: int):
        self.dir = out / "masks"
        self.theta0 = theta0
        self.seed = seed
        self.masks: dict = {}
        self.paths: dict[str, Path] = {}
        self.predictions: dict = {}  # stage name -> its Prediction (rlsubnet.lab.predicting.predict_stage)

    def _save(self, key: str, mask, filename: str):
        self.dir.mkdir(exist_ok=True)
        path = self.dir / filename
        mask.save(path)
        self.masks[key], self.paths[key] = mask, path
        return mask

    def changed(self, name: str, stage):
        """Entries of ``stage``'s bf16 checkpoint that differ from θ0 at atol 1e-5."""
        if name not in self.masks:
            self._save(name, build_stage_mask(self.theta0, stage), f"{name}.mask.safetensors")
        return self.masks[name]

    def random_like(self, name: str, stage):
        """A random per-tensor mask with exactly the counts of ``name``'s mask in every tensor (seed: the run's)."""
        key = random_mask_label(name)
        if key not in self.masks:
            self._save(
                key,
                random_mask(self.changed(name, stage), scope=RANDOM_SCOPE, seed=self.seed),
                f"random-like-{name}.mask.safetensors",
            )
        return self.masks[key]

    def prediction(self, name: str, stage, spec: StageSpec):
        """The prediction of ``name``'s subnetwork made before its run (:func:`rlsubnet.lab.predicting.predict_stage`:
        θ0, the stage's plan and the probe its first steps recorded), made once."""
        from rlsubnet.lab.predicting import predict_stage

        if name not in self.predictions:
            self.predictions[name] = predict_stage(self.theta0, spec, stage)
        return self.predictions[name]

    def predicted(self, name: str, stage, spec: StageSpec):
        """The predicted mask of ``name``: :meth:`prediction` cut at its expected density."""
        key = predicted_mask_label(name)
        if key not in self.masks:
            self._save(key, self.prediction(name, stage, spec).mask(), f"predicted-{name}.mask.safetensors")
        return self.masks[key]
