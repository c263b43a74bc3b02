"""A probe of a lab stage: its first K steps, run by the stage's own TRL trainer.

The probe is the stage with its steps cut to K (:func:`probe_stage`): the same seed and data seed, hence the same
first K batches in the same order and the same sampling, on the same optimizer (the lab's constant schedule does
not depend on the step count). A step pre-hook on that optimizer records the gradients it is about to apply; the
stage folder gets the probe's statistics (``probe.safetensors``) inside its atomic write, so a probe folder is
complete or absent, and a finished probe with the same fingerprint is reused.

A full run can record its own probe on the way (:func:`run_stage_with_probe`, what the demo's full runs do): the
recorder stops after step K and the run goes on, so the probe costs no extra training; its statistics are those
of a separate K-step probe, bit for bit, because the first K steps are the same.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlsubnet import limits
from rlsubnet.errors import UsageError
from rlsubnet.predict.probe import GradientRecorder, ProbeError, ProbeStats, initial_hash, unique_named_parameters

PROBE_FILE = "probe.safetensors"
PROBE_SHARE = 0.1  # the longest probe the demo's predictions may use: 10% of the run's steps


def probe_steps_of(total_steps: int) -> int | None:
    """The probe length of a run of ``total_steps``: 10% of its steps, at least 2 (a probe needs two steps to tell
    steady drift from noise); None for a run shorter than 2 steps."""
    if total_steps < 2:
        return None
    return max(2, int(total_steps * PROBE_SHARE))


def full_run_extra(spec) -> dict | None:
    """What a lab full run records (and fingerprints) beyond its spec: the length of the probe it records."""
    k = probe_steps_of(spec.steps)
    return {"probe": {"steps": k}} if k is not None else None


def probe_spec(spec, steps: int):
    """The spec of the probe of ``spec``: the same stage cut to ``steps`` optimizer steps."""
    k = limits.integer(steps, "probe steps", 2, spec.steps)
    return dataclasses.replace(
        spec,
        name=f"{spec.name}-probe{k}",
        steps=k,
        snapshot_every=k,
        description=f"the first {k} of `{spec.name}`'s {spec.steps} steps: a probe for predicting its subnetwork",
    )


def full_run_id(spec, base_dir: str | Path, samples_path: str | Path | None = None) -> str:
    """The fingerprint the full (unmasked) stage ``spec`` records in its stage.json (a run of the demo's, which
    records its probe: :func:`full_run_extra`): the run a probe belongs to."""
    from rlsubnet.lab import stages

    samples_digest = stages.file_digest(samples_path) if spec.uses_own_samples and samples_path else None
    return stages.stage_fingerprint(spec, stages.model_digest(base_dir), samples_digest, full_run_extra(spec))


class _StageProbe:
    """Hooks for :func:`rlsubnet.lab.stages.run_stage` that record the first ``steps`` optimizer steps of the stage
    ``spec`` (``configure_trainer``) and write ``probe.safetensors`` into the stage folder (``extra_files``)."""

    def __init__(self, spec, steps: int, run_id: str, probe_stage_name: str):
        self.spec, self.steps, self.run_id, self.name = spec, steps, run_id, probe_stage_name
        self.recorder: GradientRecorder | None = None

    def configure_trainer(self, trainer) -> None:
        params = unique_named_parameters(trainer.model)
        source = {"kind": "lab stage", "stage": self.spec.name, "spec": self.spec.to_json(), "probe_stage": self.name}
        self.recorder = GradientRecorder(params, limit=self.steps)
        self.recorder.attach(trainer.optimizer, initial_hash=initial_hash(params), run_id=self.run_id, source=source)

    def extra_files(self, folder: Path) -> None:
        rec = self.recorder
        if rec is None or rec.final is None:
            done = 0 if rec is None else len(rec.lrs)
            raise ProbeError(
                f"stage {self.spec.name} ended after {done} optimizer steps, before its {self.steps}-step probe"
            )
        rec.detach()
        rec.final.check(f"probe of stage {self.spec.name}")
        rec.final.save(folder / PROBE_FILE)


def probe_stage(
    spec,
    steps: int,
    *,
    base_dir: str | Path,
    out_dir: str | Path,
    samples_path: str | Path | None = None,
    eval_tasks=None,
    progress: bool = False,
    overwrite: bool = False,
) -> ProbeStats:
    """Run the first ``steps`` steps of the lab stage ``spec`` from θ0 (``base_dir``) into the stage folder
    ``out_dir`` and return the probe's statistics (also in ``out_dir/probe.safetensors``). A folder that already
    holds this probe (same fingerprint) is reused. Its steps are the full run's first steps bit for bit when it
    runs with the same torch thread count (the demo's ``--threads``)."""
    from rlsubnet.lab import stages

    out_dir = Path(out_dir)
    pspec = probe_spec(spec, steps)
    if spec.uses_own_samples and samples_path is None:
        raise UsageError(f"stage {spec.name}: its probe needs θ0's own samples ({spec.data}); pass samples_path")
    run_id = full_run_id(spec, base_dir, samples_path)
    extra = {"probe": {"of": spec.name, "steps": pspec.steps, "full_steps": spec.steps, "run_id": run_id}}
    reused = _finished(out_dir, pspec, base_dir, samples_path, extra)
    if reused is not None and not overwrite:
        return reused
    hooks = _StageProbe(spec, pspec.steps, run_id, pspec.name)
    stages.run_stage(
        pspec,
        base_dir=base_dir,
        out_dir=out_dir,
        samples_path=samples_path if spec.uses_own_samples else None,
        eval_tasks=eval_tasks,
        configure_trainer=hooks.configure_trainer,
        extra_files=hooks.extra_files,
        extra_record=extra,
        progress=progress,
        overwrite=overwrite,
    )
    return ProbeStats.load(out_dir / PROBE_FILE)


def run_stage_with_probe(spec, *, base_dir, samples_path=None, extra_record=None, **run_stage_kwargs):
    """:func:`rlsubnet.lab.stages.run_stage` of the full run ``spec`` that also records its first
    :func:`probe_steps_of` steps as a probe (``probe.safetensors`` in the stage folder; run id: the stage's own
    fingerprint). ``extra_record`` must be :func:`full_run_extra` of ``spec``."""
    from rlsubnet.lab import stages

    want = full_run_extra(spec)
    if want is None or extra_record != want:
        raise UsageError(f"stage {spec.name}: a full run with a probe records {want}, not {extra_record}")
    run_id = full_run_id(spec, base_dir, samples_path)
    hooks = _StageProbe(spec, want["probe"]["steps"], run_id, spec.name)
    return stages.run_stage(
        spec,
        base_dir=base_dir,
        samples_path=samples_path,
        configure_trainer=hooks.configure_trainer,
        extra_files=hooks.extra_files,
        extra_record=extra_record,
        **run_stage_kwargs,
    )


def _finished(out_dir: Path, pspec, base_dir, samples_path, extra) -> ProbeStats | None:
    from rlsubnet.lab import stages

    if not (out_dir / "stage.json").is_file() or not (out_dir / PROBE_FILE).is_file():
        return None
    try:
        res = stages.StageResult.load(out_dir)
    except (OSError, ValueError, KeyError):
        return None
    samples_digest = stages.file_digest(samples_path) if pspec.uses_own_samples and samples_path else None
    want = stages.stage_fingerprint(pspec, stages.model_digest(base_dir), samples_digest, extra)
    return ProbeStats.load(out_dir / PROBE_FILE) if res.fingerprint == want else None
