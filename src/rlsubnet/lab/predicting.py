"""The demo's predictions of each subnetwork before its run (the report's "Predicting the subnetwork").

Every full run of the demo records a probe of its first 10% of steps on the way
(:func:`rlsubnet.predict.lab_probe.run_stage_with_probe`: the statistics of a separate probe of those steps, bit for
bit, at no extra training). From θ0, the stage's plan (:func:`rlsubnet.predict.plan_of_stage`) and that probe, the
*probe* predictor, which has no fitted parameter, gives every entry a probability of changing; its mask at the
expected density is scored against the stage's realized mask (:func:`rlsubnet.predict.evaluate`), beside the |w|
and random baselines at equal density. For GRPO and DPO also: the *budget* predictor (θ0 and the plan alone), the
*calibrated* one fitted on the same stage run with seed + 1 (never on the scored run: the calibration refuses it),
and the seed ceiling (that run's realized mask used as the prediction). ``grpo-predicted`` re-runs ``grpo`` on the
probe predictor's mask (:mod:`rlsubnet.lab.subnet`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

from rlsubnet.errors import RlsubnetError
from rlsubnet.lab.config import StageSpec
from rlsubnet.lab.subnet import MASK_ATOL, MASK_MODE, MaskStore, seed_name

PREDICTOR = "probe"  # the demo's prediction: the probe predictor, chosen on runs the demo does not score
DETAILED = ("grpo", "dpo")  # stages also scored with every predictor and against the seed ceiling
SCORE_KEYS = (
    "precision",
    "recall",
    "f1",
    "average_precision",
    "density_predicted",
    "density_realized",
    "at_realized_density",
    "baselines",
    "layers",
    "modules",
)


def probe_of(stage):
    """The probe a full run recorded of its first steps."""
    from rlsubnet.predict.lab_probe import PROBE_FILE
    from rlsubnet.predict.probe import ProbeStats

    path = Path(stage.dir) / PROBE_FILE
    if not path.is_file():
        raise RlsubnetError(f"stage {stage.name}: {path} is missing: the run recorded no probe to predict from")
    return ProbeStats.load(path)


def plan_of(spec: StageSpec):
    from rlsubnet.predict.plan import plan_of_stage

    return plan_of_stage(spec, atol=MASK_ATOL, mode=MASK_MODE)


def predict_stage(theta0: Path, spec: StageSpec, stage, predictor: str = PREDICTOR, calibration=None, probe=None):
    """The prediction of ``spec``'s subnetwork from θ0, its plan and (but for the budget predictor) the probe its
    run recorded of its first steps."""
    from rlsubnet.predict.core import predict

    if predictor != "budget" and probe is None:
        probe = probe_of(stage)
    return predict(
        theta0,
        plan_of(spec),
        None if predictor == "budget" else probe,
        predictor=predictor,
        calibration=calibration,
    )


def scored(result: Mapping) -> dict:
    """The figures of :func:`rlsubnet.predict.evaluate` the report keeps."""
    return {k: result[k] for k in SCORE_KEYS if k in result}


def probe_steps_recorded(stage) -> int | None:
    return ((stage.record.get("extra") or {}).get("probe") or {}).get("steps")


def changed_by_step_k(theta0: Path, probe, realized) -> dict:
    """The entries already changed (bf16, atol 1e-5) after the probe's K steps: the probe predictor counts them as
    changed, so they are hits no predictor from θ0 alone gets. Their count, and the share of the realized mask."""
    import torch

    from rlsubnet.checkpoint import open_checkpoint
    from rlsubnet.diff.changed import ChangedTest

    test = ChangedTest(torch.bfloat16, torch.bfloat16, MASK_ATOL, MASK_MODE)
    already = hits = 0
    with open_checkpoint(str(theta0)) as ck:
        for name in ck.names():
            w0 = ck.read(name).reshape(-1)
            at_k = probe.master[name].reshape(-1).to(torch.float32).to(w0.dtype)
            a = torch.from_numpy(test.changed(w0, at_k)[0].copy())
            already += int(a.sum())
            hits += int((a & realized.tensor(name).reshape(-1)).sum())
    return {
        "changed": already,
        "share_of_realized": hits / realized.changed if realized.changed else None,
        "still_changed_at_t": hits / already if already else None,
    }


def score_stage(theta0: Path, spec: StageSpec, stage, realized=None, prediction=None) -> dict:
    """The demo's prediction of one finished stage (:data:`PREDICTOR`), scored against the mask it realized; or
    ``{"skipped": why}``. It reads θ0, the stage's plan and its probe only, so a worker process can make it right
    after the stage (``realized``: the run's mask; ``prediction()``: makes or returns the prediction, when the
    caller keeps it)."""
    from rlsubnet.lab.subnet import build_stage_mask
    from rlsubnet.predict.scoring import evaluate

    clock = time.process_time()
    k = probe_steps_recorded(stage)
    if k is None:
        return {"skipped": "its run recorded no probe (fewer than 2 steps)"}
    realized = build_stage_mask(theta0, stage) if realized is None else realized
    if realized.changed == 0:
        return {"skipped": f"it changed no bf16 entry at atol {MASK_ATOL:g}: there is nothing to predict"}
    pred = predict_stage(theta0, spec, stage) if prediction is None else prediction()
    return {
        "settings": stage.record["settings"],
        "algorithm": spec.algorithm,
        "optimizer": spec.optimizer,
        "task": spec.task,
        "learning_rate": spec.learning_rate,
        "steps": spec.steps,
        "probe_steps": k,
        "predictors": {PREDICTOR: scored(evaluate(realized, pred))},
        "changed_by_step_k": changed_by_step_k(theta0, probe_of(stage), realized),
        "cpu_s": time.process_time() - clock,
    }


def detailed_predictors(theta0: Path, spec: StageSpec, stage, twin_spec: StageSpec, twin) -> dict:
    """The other predictors of a :data:`DETAILED` stage, scored against the mask it realized: the budget predictor,
    the seed ceiling (the realized mask of ``twin``, the same stage run with seed + 1) and the predictor calibrated
    on ``twin``. It reads files only (θ0 and the two runs' folders), so a worker process can make it while the main
    process measures the subnetworks."""
    from rlsubnet.lab.subnet import build_stage_mask
    from rlsubnet.predict.calibrate import fit_calibration
    from rlsubnet.predict.scoring import evaluate

    clock = time.process_time()
    realized, other_mask = build_stage_mask(theta0, stage), build_stage_mask(theta0, twin)
    out: dict = {"predictors": {"budget": scored(evaluate(realized, predict_stage(theta0, spec, stage, "budget")))}}
    out["ceiling"] = {"run": twin.name, **scored(evaluate(realized, other_mask, base=theta0))}
    try:
        cal = fit_calibration(theta0, plan_of(twin_spec), other_mask, probe_of(twin))
    except RlsubnetError as exc:  # e.g. nothing left to fit once the probe's own changes are taken out
        out["calibration"] = {"run": twin.name, "skipped": str(exc)}
    else:
        calibrated = predict_stage(theta0, spec, stage, "calibrated", calibration=cal, probe=probe_of(stage))
        out["predictors"]["calibrated"] = scored(evaluate(realized, calibrated))
        out["calibration"] = {"run": twin.name, **cal.describe()}
    out["cpu_s"] = time.process_time() - clock
    return out


def start_detailed(
    theta0: Path, stages: Mapping, extra: Mapping, specs: Mapping[str, StageSpec], seed: int, pool
) -> dict[str, Future]:
    """:func:`detailed_predictors` of every :data:`DETAILED` stage whose seed + 1 run exists, submitted to ``pool``
    (an executor; none without one: :func:`measure_predictions` then makes them itself)."""
    if pool is None:
        return {}
    out = {}
    for name in DETAILED:
        twin = seed_name(name, seed + 1)
        if name in stages and twin in extra:
            out[name] = pool.submit(detailed_predictors, theta0, specs[name], stages[name], specs[twin], extra[twin])
    return out


def measure_predictions(
    theta0: Path,
    stages: Mapping,
    extra: Mapping,
    specs: Mapping[str, StageSpec],
    store: MaskStore,
    seed: int,
    prescored: Mapping[str, dict] | None = None,
    detailed: Mapping[str, Future] | None = None,
) -> dict:
    """``results["prediction"]``: every finetuning stage in ``stages`` predicted and scored (see the module
    docstring); ``extra``: the extra-seed runs (their probes and masks fit the calibrations and make the ceiling);
    ``specs``: every stage's spec; ``store``: the run's masks (and the predictions already made); ``prescored``:
    :func:`score_stage` of the stages a worker already scored; ``detailed``: :func:`start_detailed`'s futures."""
    rows: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name, stage in stages.items():
        spec = specs[name]
        row = (prescored or {}).get(name)
        realized = store.changed(name, stage)  # every stage's mask is saved, whichever process scored it
        if row is None:
            row = score_stage(
                theta0, spec, stage, realized, lambda n=name, st=stage, sp=spec: store.prediction(n, st, sp)
            )
        if "skipped" in row:
            skipped[name] = row["skipped"]
            continue
        twin = seed_name(name, seed + 1)
        if name in DETAILED and twin in extra:
            store.changed(twin, extra[twin])  # the seed + 1 run's mask is saved too (the overlap has made it already)
            future = (detailed or {}).get(name)
            more = None
            if future is not None:
                try:
                    more = future.result()
                except Exception:  # noqa: BLE001 - a worker that failed (a broken pool): made here instead
                    more = None
            if more is None:
                more = detailed_predictors(theta0, spec, stage, specs[twin], extra[twin])
            row["predictors"].update(more["predictors"])
            row["ceiling"], row["calibration"] = more["ceiling"], more["calibration"]
            row["cpu_s"] += more["cpu_s"]
        rows[name] = row
    return {
        "settings": {
            "predictor": PREDICTOR,
            "probe": "the run's own first steps (10%, at least 2), recorded on the way: the same statistics as a "
            "separate probe of those steps run before it",
            "cut": "the predicted mask keeps the entries with the highest probabilities, as many as the expected "
            "density predicts",
            "mask_atol": MASK_ATOL,
            "mask_dtype": MASK_MODE,
            "calibration": "logistic rule fitted on the same stage run with seed + 1 (its probe and realized mask)",
            "ceiling": "the seed + 1 run's realized mask used as the prediction",
            "baselines": "magnitude: the entries with the smallest |θ0| at the same count; random: a random mask of "
            "the predicted density (exact expectation)",
        },
        "stages": rows,
        "skipped": skipped,
    }
