"""``rlsubnet predict``: the mask a run will update, predicted before the run, and its score afterwards.

rlsubnet predict theta0/ --steps 100 --lr 1e-6 -o pred.mask.safetensors                 # budget: θ0 + plan
rlsubnet predict theta0/ --steps 100 --lr 1e-6 --probe probe/probe.safetensors -o pred.mask.safetensors
rlsubnet predict theta0/ --steps 100 --lr 1e-6 --probe seed1-probe.safetensors --fit seed1.mask.safetensors -o cal.json
rlsubnet predict theta0/ --steps 100 --lr 1e-6 --probe probe.safetensors --calibration cal.json --probabilities p.safetensors -o pred.mask.safetensors
rlsubnet predict --evaluate grpo.mask.safetensors pred.mask.safetensors --json
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from rlsubnet.cli.common import Number, add_checkpoint_options, add_mode_option, add_output_options, print_json
from rlsubnet.errors import UsageError
from rlsubnet.fileio import output_lock


def add_parser(sub) -> None:
    from rlsubnet.predict.choices import OPTIMIZERS, PREDICTORS, SCHEDULES, STORAGE_DTYPES

    p = sub.add_parser(
        "predict",
        help="predict the subnetwork a training run will update, before the run (or score a prediction)",
        description="Predict, for every entry of θ0 (BASE), the probability that the planned run changes its stored "
        "value at --atol in the comparison mode, and write the predicted mask (the format of `rlsubnet mask`). "
        "Predictors: budget (θ0 and the plan: distance to the rounding boundary against the optimizer's reach), "
        "probe (K recorded steps of the real run), calibrated (a logistic rule fitted with --fit on ANOTHER run). "
        "--evaluate REALIZED PRED scores a prediction against the mask a run realized.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("inputs", nargs="*", metavar="PATH", help="BASE (θ0); with --evaluate: REALIZED PRED")
    p.add_argument(
        "-o", "--output", metavar="FILE", help="predicted mask to write (.safetensors); with --fit: calibration (.json)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    plan = p.add_argument_group("the training plan")
    plan.add_argument("--optimizer", default="adamw", help=f"one of {', '.join(OPTIMIZERS)} (default adamw)")
    plan.add_argument(
        "--lr", type=Number("--lr", float, lo_open=True), default=1e-6, help="peak learning rate (default 1e-6)"
    )
    plan.add_argument("--steps", type=Number("--steps", int, 1), help="optimizer steps of the run (required)")
    plan.add_argument(
        "--schedule", default="constant", help=f"learning-rate schedule: {', '.join(SCHEDULES)} (default constant)"
    )
    plan.add_argument("--warmup", type=Number("--warmup", int), default=0, help="warmup steps from lr 0 (default 0)")
    plan.add_argument(
        "--betas",
        type=Number("--betas", float, 0, 1),
        nargs=2,
        default=[0.9, 0.999],
        metavar="B",
        help="Adam's betas (default 0.9 0.999)",
    )
    plan.add_argument("--eps", type=Number("--eps", float), default=1e-8, help="Adam's eps (default 1e-8)")
    plan.add_argument(
        "--weight-decay",
        type=Number("--weight-decay", float),
        default=0.0,
        help="weight decay of tensors with ≥ 2 dims (default 0)",
    )
    plan.add_argument(
        "--momentum", type=Number("--momentum", float, 0, 1), default=0.0, help="SGD momentum (default 0)"
    )
    plan.add_argument(
        "--storage-dtype",
        default="bf16",
        help=f"dtype of the compared checkpoints: {', '.join(STORAGE_DTYPES)} (default bf16)",
    )
    plan.add_argument(
        "--atol", type=Number("--atol", float), default=1e-5, help="|Δ| ≤ atol counts as unchanged (default 1e-5)"
    )
    add_mode_option(plan)
    pred = p.add_argument_group("the predictor")
    pred.add_argument("--predictor", help=f"{', '.join(PREDICTORS)} (default: the most informed the inputs allow)")
    pred.add_argument(
        "--probe",
        metavar="FILE",
        help="probe statistics (probe.safetensors, from rlsubnet.predict.probe_stage or run_probe)",
    )
    pred.add_argument("--calibration", metavar="FILE", help="a calibration from --fit on another run")
    cut = pred.add_mutually_exclusive_group()
    cut.add_argument(
        "--density",
        type=Number("--density", float, 0, 1),
        help="keep this share of entries, most probable first (default: the expected density)",
    )
    cut.add_argument(
        "--threshold", type=Number("--threshold", float, 0, 1), help="keep the entries with probability ≥ P"
    )
    pred.add_argument("--probabilities", metavar="FILE", help="also write the per-entry probabilities (.safetensors)")
    pred.add_argument(
        "--probabilities-dtype", choices=("uint8", "fp16"), default="uint8", help="uint8 (p·255, default) or fp16"
    )
    act = p.add_mutually_exclusive_group()
    act.add_argument("--evaluate", action="store_true", help="score PRED (mask or probabilities) against REALIZED")
    act.add_argument(
        "--fit", metavar="REALIZED", help="fit the calibrated rule on this finished run's mask (with its --probe)"
    )
    p.add_argument("--base", metavar="BASE", help="--evaluate: θ0 for the |w| baseline (default: the one PRED records)")
    add_checkpoint_options(p)
    add_output_options(p, "print the result as JSON")
    p.set_defaults(run=run)


def _plan(args: argparse.Namespace):
    from rlsubnet.predict.plan import Plan

    return Plan(
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        betas=tuple(args.betas),
        eps=args.eps,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        schedule=args.schedule,
        warmup=args.warmup,
        storage_dtype=args.storage_dtype,
        atol=args.atol,
        mode=args.mode,
    )


def _check_output(path: str | None, what: str, overwrite: bool) -> Path:
    if not path:
        raise UsageError(f"give the {what} to write with -o FILE")
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; {what} is a file name")
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: exists (pass --overwrite to replace it)")
    return out


def run(args: argparse.Namespace) -> int:
    opts = {"allow_pickle": args.allow_pickle, "allow_download": args.allow_download}
    if args.evaluate:
        if len(args.inputs) != 2:
            raise UsageError("--evaluate takes REALIZED PRED (two files)")
        if args.output or args.probabilities:
            raise UsageError("--evaluate writes nothing: drop -o / --probabilities")
        return _evaluate(args, opts)
    if len(args.inputs) != 1:
        raise UsageError("give one BASE checkpoint (θ0) to predict from")
    plan = _plan(args)
    if args.fit:
        return _fit(args, plan, opts)
    out = _check_output(args.output, "predicted mask", args.overwrite)
    probs_out = _check_output(args.probabilities, "probabilities file", args.overwrite) if args.probabilities else None
    if probs_out is not None and probs_out.resolve() == out.resolve():
        raise UsageError("-o and --probabilities name the same file")
    from rlsubnet.predict import predict

    locks = [out] + ([probs_out] if probs_out else [])
    with contextlib.ExitStack() as stack:
        for path in locks:
            stack.enter_context(output_lock(path))
        for path in locks:
            _check_output(str(path), "output", args.overwrite)  # again, under the lock
        prediction = predict(
            args.inputs[0], plan, args.probe, predictor=args.predictor, calibration=args.calibration, **opts
        )
        mask = prediction.mask(density=args.density, threshold=args.threshold)
        if probs_out is not None:
            prediction.save_probabilities(probs_out, args.probabilities_dtype)
        try:
            mask.save(out)
        except BaseException:
            if probs_out is not None:
                probs_out.unlink(missing_ok=True)
            raise
    summary = {**mask.summary(), "path": str(out), "expected_density": prediction.expected_density}
    if probs_out is not None:
        summary["probabilities"] = str(probs_out)
    if args.json:
        print_json(summary)
    else:
        print(_prediction_text(prediction, mask, out, probs_out))
    return 0


def _prediction_text(prediction, mask, out: Path, probs_out: Path | None) -> str:
    from rlsubnet.report.tables import fmt_pct, render_table

    lines = [f"wrote {out}" + (f" and {probs_out}" if probs_out else "")]
    lines.append(
        f"{prediction.predictor} prediction for {prediction.plan.describe()}: {mask.changed:,} of {mask.numel:,} "
        f"entries (density {fmt_pct(mask.density)}%; expected density {fmt_pct(prediction.expected_density)}%)"
    )
    rows = [[r["module"], f"{r['numel']:,}", f"{r['changed']:,}", fmt_pct(r["density"])] for r in mask.modules()]
    lines += ["", render_table(["module", "params", "predicted", "density %"], rows)]
    return "\n".join(lines)


def _fit(args: argparse.Namespace, plan, opts: dict) -> int:
    from rlsubnet.predict import fit_calibration

    out = _check_output(args.output, "calibration", args.overwrite)
    with output_lock(out):
        _check_output(str(out), "calibration", args.overwrite)
        cal = fit_calibration(args.inputs[0], plan, args.fit, args.probe, **opts)
        cal.save(out)
    if args.json:
        print_json({"path": str(out), **cal.describe()})
    else:
        fit = cal.fit
        print(
            f"wrote {out}: logistic rule over {len(cal.names)} features ({'with' if cal.uses_probe else 'without'} "
            f"probe features), fitted on {fit['entries']:,} entries ({fit['positives']:,} changed) of {args.fit}; "
            f"log-loss {fit['log_loss']:.4f}. It refuses to predict or be scored on that run."
        )
    return 0


def _evaluate(args: argparse.Namespace, opts: dict) -> int:
    from rlsubnet.predict import evaluate

    result = evaluate(args.inputs[0], args.inputs[1], base=args.base, **opts)
    if args.json:
        print_json(result)
    else:
        print(_evaluation_text(result, args.inputs))
    return 0


def _evaluation_text(r: dict, inputs) -> str:
    from rlsubnet.predict.scoring import fmt
    from rlsubnet.report.tables import fmt_pct, render_table

    lines = [
        f"prediction {inputs[1]} against realized {inputs[0]}: predicted density {fmt_pct(r['density_predicted'])}%, "
        f"realized {fmt_pct(r['density_realized'])}%"
    ]
    rows = []
    for name, x in (("prediction", r), *r["baselines"].items()):
        rows.append(
            [
                name if name == "prediction" else f"{name} baseline",
                fmt(x["precision"]),
                fmt(x["recall"]),
                fmt(x["f1"]),
                fmt(x["at_realized_density"]["f1"]),
                fmt(x["average_precision"]),
            ]
        )
    lines += ["", render_table(["", "precision", "recall", "F1", "F1 at realized density", "avg precision"], rows)]
    for key in ("module", "layer"):
        rows = [
            [
                "-" if g[key] is None else g[key],
                f"{g['numel']:,}",
                fmt_pct(g["density_realized"]),
                fmt_pct(g["density_predicted"]),
                fmt(g["precision"]),
                fmt(g["recall"]),
                fmt(g["f1"]),
                fmt(g["magnitude_f1"]),
                fmt(g["random_f1"]),
            ]
            for g in r[key + "s"]
        ]
        headers = [key, "params", "realized %", "predicted %", "precision", "recall", "F1", "|w| F1", "random F1"]
        lines += ["", render_table(headers, rows)]
    return "\n".join(lines)
