"""Predict the subnetwork a run will update, before the run: ``rlsubnet.predict(base, plan, probe=None)``.

>>> from rlsubnet.predict import Plan, probe_stage, fit_calibration, evaluate
>>> plan = Plan(steps=100, lr=1e-6)                        # AdamW, constant schedule, bf16, atol 1e-5
>>> pred = rlsubnet.predict("theta0/", plan)                # budget predictor: θ0 and the plan only
>>> pred.expected_density, pred.mask(density=0.3).save("pred.mask.safetensors")
>>> probe = probe_stage(spec, 10, base_dir="theta0/", out_dir="probe/")   # 10 steps of a lab stage
>>> pred = rlsubnet.predict("theta0/", plan, probe)         # probe predictor
>>> cal = fit_calibration("theta0/", plan, "seed1.mask.safetensors", probe_seed1)  # on ANOTHER run
>>> pred = rlsubnet.predict("theta0/", plan, probe, calibration=cal)
>>> evaluate("grpo.mask.safetensors", pred)["f1"]

The package itself is callable: ``rlsubnet.predict(...)`` is :func:`rlsubnet.predict.core.predict`. Its names
are imported on first use. Definitions of every predictor and metric: docs/concepts.md.
"""

import sys
import types

from rlsubnet._lazy import lazy_getattr
from rlsubnet.predict.choices import OPTIMIZERS, PREDICTORS, SCHEDULES, STORAGE_DTYPES

_LAZY = {
    "Calibration": "rlsubnet.predict.calibrate",
    "CalibrationLeakError": "rlsubnet.predict.calibrate",
    "fit_calibration": "rlsubnet.predict.calibrate",
    "predict": "rlsubnet.predict.core",
    "evaluate": "rlsubnet.predict.scoring",
    "full_run_id": "rlsubnet.predict.lab_probe",
    "probe_spec": "rlsubnet.predict.lab_probe",
    "probe_stage": "rlsubnet.predict.lab_probe",
    "Plan": "rlsubnet.predict.plan",
    "plan_of_stage": "rlsubnet.predict.plan",
    "Prediction": "rlsubnet.predict.prediction",
    "PredictionError": "rlsubnet.predict.prediction",
    "ProbeError": "rlsubnet.predict.probe",
    "ProbeStats": "rlsubnet.predict.probe",
    "run_probe": "rlsubnet.predict.probe",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = ["OPTIMIZERS", "PREDICTORS", "SCHEDULES", "STORAGE_DTYPES", *_LAZY]


class _CallableModule(types.ModuleType):
    """``rlsubnet.predict`` is this package and, called, the function :func:`rlsubnet.predict.core.predict`."""

    def __call__(self, base, plan, probe=None, **kwargs):
        from rlsubnet.predict.core import predict

        return predict(base, plan, probe, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
