"""Scoring a prediction against the mask a run realized.

- precision, recall, F1 of the predicted mask (for probabilities: their cut at the expected density), overall,
  per layer and per module (:mod:`rlsubnet.diff.names`);
- the same at the realized density: the top-R entries by score, R = realized count. Entries tied at the cut
  count fractionally (the expectation over the order of the ties), so a coarse score is never flattered nor
  penalised by an arbitrary tie-break;
- average precision: Σ over distinct score levels, highest first, of (recall gained) × (precision with the
  whole level included): ties form one step, as in scikit-learn;
- baselines at equal density: *magnitude*, the global |w| threshold (smallest |θ0| first, ties fractional), and
  *random*, whose expectation is exact: precision = the realized density, recall = the predicted density.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from rlsubnet.checkpoint import open_checkpoint
from rlsubnet.checkpoint.align import layout_diff
from rlsubnet.checkpoint.hashing import combine_hashes, hash_tensor
from rlsubnet.diff.names import grouped, layer_of, module_kind
from rlsubnet.errors import MismatchError, UsageError
from rlsubnet.masks import Mask, MaskMismatchError, as_mask
from rlsubnet.predict.prediction import Prediction, as_prediction


def prf(tp: float, predicted: float, realized: float) -> dict:
    p = tp / predicted if predicted else None
    r = tp / realized if realized else None
    f1 = 2 * tp / (predicted + realized) if predicted + realized else None
    return {"precision": p, "recall": r, "f1": f1}


class Histogram:
    """Entries and realized-changed entries per distinct score key (higher key = predicted more likely)."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, keys: np.ndarray, labels: np.ndarray) -> None:
        u, inv = np.unique(keys, return_inverse=True)
        self.parts.append((u, np.bincount(inv, minlength=u.size), np.bincount(inv, weights=labels, minlength=u.size)))

    def levels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keys descending, entries, positives) per level."""
        if not self.parts:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        keys = np.concatenate([p[0] for p in self.parts])
        u, inv = np.unique(keys, return_inverse=True)
        n = np.bincount(inv, weights=np.concatenate([p[1] for p in self.parts]), minlength=u.size)
        pos = np.bincount(inv, weights=np.concatenate([p[2] for p in self.parts]), minlength=u.size)
        return u[::-1], n[::-1], pos[::-1]

    def average_precision(self) -> float | None:
        _, n, pos = self.levels()
        total = pos.sum()
        if total == 0:
            return None
        tp, seen = np.cumsum(pos), np.cumsum(n)
        return float(np.sum(pos / total * (tp / seen)))

    def cut(self, k: int) -> tuple[int, float, float]:
        """(level key, fraction of the boundary level taken, expected positives) of the top-``k`` cut."""
        keys, n, pos = self.levels()
        if k <= 0 or keys.size == 0:
            return (int(keys[0]) + 1 if keys.size else 0), 0.0, 0.0
        seen = np.cumsum(n)
        j = int(np.searchsorted(seen, k))
        j = min(j, keys.size - 1)
        before = seen[j - 1] if j else 0.0
        frac = min(1.0, (k - before) / n[j]) if n[j] else 0.0
        tp = (np.cumsum(pos)[j - 1] if j else 0.0) + frac * pos[j]
        return int(keys[j]), frac, float(tp)


def prob_keys(p: torch.Tensor) -> np.ndarray:
    # Non-negative float32 bit patterns order like their values.
    return p.detach().reshape(-1).to(torch.float32).contiguous().view(torch.int32).numpy().astype(np.int64)


def magnitude_keys(w: torch.Tensor) -> np.ndarray:
    # The smallest |w| first: minus the magnitude's bit pattern (sign cleared), which orders like |w|.
    w = w.detach().reshape(-1).contiguous()
    width = w.element_size()
    bits = w.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[width]).numpy().astype(np.int64)
    return -(bits & ((1 << (8 * width - 1)) - 1))


def _check_inputs(realized: Mask, pred: Prediction | Mask) -> None:
    diff = layout_diff(realized.shapes, pred.shapes, detail=lambda n, a, b: f"{n} {list(a)} vs {list(b)}")
    if diff:
        raise MaskMismatchError(
            "the realized mask is of another model than the prediction ("
            + diff.describe("only in the realized mask", "only in the prediction")
            + ")"
        )
    if isinstance(pred, Prediction):
        atol, mode = (pred.plan.atol, pred.plan.mode) if pred.plan else (None, None)
        cal = pred.meta.get("calibration")
    else:
        atol, mode = pred.atol, pred.mode
        cal = ((pred.meta.get("extra") or {}).get("prediction") or {}).get("calibration")
    if atol is not None and realized.atol is not None and float(atol) != float(realized.atol):
        raise UsageError(f"the realized mask is at atol {realized.atol:g}, the prediction at atol {atol:g}")
    if mode is not None and realized.mode is not None and mode != realized.mode:
        raise UsageError(f"the realized mask is in comparison mode {realized.mode}, the prediction in {mode}")
    if cal and (cal.get("fitted_on") or {}).get("realized_bits_sha256") == realized.bits_sha256():
        from rlsubnet.predict.calibrate import CalibrationLeakError

        raise CalibrationLeakError(
            "the prediction's calibration was fitted on this realized mask: a calibrated predictor is scored "
            "only on runs it did not see"
        )


def _same_content(a: dict | None, b: dict | None) -> bool:
    if not a or not b or not a.get("content_hash") or not b.get("content_hash"):
        return True
    if a.get("content_hash_scheme") != b.get("content_hash_scheme") or a.get("content_scope") != b.get("content_scope"):
        return True
    return a["content_hash"] == b["content_hash"]


def evaluate(realized, prediction, *, base=None, allow_pickle: bool = False, allow_download: bool = False) -> dict:
    """Score ``prediction`` (a :class:`Prediction`, a predicted :class:`Mask`, or either's file) against the
    ``realized`` mask; ``base`` (θ0, for the |w| baseline) defaults to the one the prediction records."""
    realized = as_mask(realized)
    pred = as_prediction(prediction)
    _check_inputs(realized, pred)
    pred_base = pred.meta.get("base")
    if base is None:
        base = (pred_base or {}).get("source") or (realized.meta.get("base") or {}).get("source")
        if base is None:
            raise UsageError("the prediction records no base checkpoint: give θ0 with --base")
    ck = open_checkpoint(base, label="base", allow_pickle=allow_pickle, allow_download=allow_download)
    try:
        shapes = {n: tuple(i.shape) for n, i in ck.infos.items()}
        if layout_diff(shapes, realized.shapes):
            raise MismatchError(f"{ck.location}: the base holds other tensors than the realized mask")
        return _score(realized, pred, ck)
    finally:
        ck.close()


def _score(realized: Mask, pred: Prediction | Mask, ck) -> dict:
    pmask = pred.mask() if isinstance(pred, Prediction) else pred
    names = realized.names()
    n_total, r_total, k_pred = realized.numel, realized.changed, pmask.changed
    score_hist, mag_hist = Histogram(), Histogram()
    rows: list[dict] = []
    hashes = {}
    for name in names:
        r = realized.numpy(name).reshape(-1)
        m = pmask.numpy(name).reshape(-1)
        if isinstance(pred, Prediction):
            score_hist.add(prob_keys(pred.probabilities[name]), r)
        else:
            score_hist.add(m.astype(np.int64), r)
        w = ck.read(name)
        hashes[name] = hash_tensor(name, w)
        mag_hist.add(magnitude_keys(w), r)
        rows.append(
            {
                "name": name,
                "layer": layer_of(name),
                "module": module_kind(name),
                "numel": r.size,
                "realized": int(r.sum()),
                "predicted": int(m.sum()),
                "true_positives": int(np.count_nonzero(r & m)),
            }
        )
    base_rec = {"content_hash": combine_hashes(hashes), "content_scope": "all tensors"}
    from rlsubnet.checkpoint.hashing import HASH_SCHEME

    base_rec["content_hash_scheme"] = HASH_SCHEME
    for what, rec in (("prediction", pred.meta.get("base")), ("realized mask", realized.meta.get("base"))):
        if not _same_content(rec, base_rec):
            raise MismatchError(f"{ck.location} holds other weights than the base the {what} was made from")
    tp = sum(row["true_positives"] for row in rows)
    out = {
        **prf(tp, k_pred, r_total),
        "average_precision": score_hist.average_precision(),
        "density_predicted": k_pred / n_total if n_total else 0.0,
        "density_realized": r_total / n_total if n_total else 0.0,
        "numel": n_total,
        "realized": r_total,
        "predicted": k_pred,
        "true_positives": tp,
    }
    if isinstance(pred, Prediction):
        out["expected_density"] = pred.expected_density
    out["at_realized_density"] = prf(score_hist.cut(r_total)[2], r_total, r_total)
    rho, delta = out["density_realized"], out["density_predicted"]
    level, frac, _ = mag_hist.cut(k_pred)
    mag_rows = _magnitude_by_tensor(ck, realized, names, level, frac)
    out["baselines"] = {
        "magnitude": {
            **prf(mag_hist.cut(k_pred)[2], k_pred, r_total),
            "average_precision": mag_hist.average_precision(),
            "at_realized_density": prf(mag_hist.cut(r_total)[2], r_total, r_total),
        },
        "random": {
            **prf(rho * k_pred, k_pred, r_total),
            "average_precision": rho if r_total else None,
            "at_realized_density": prf(rho * r_total, r_total, r_total),
        },
    }
    for row, mag in zip(rows, mag_rows):
        row.update(mag)
    out["layers"] = _groups(rows, "layer", delta)
    out["modules"] = _groups(rows, "module", delta)
    out["prediction"] = pred.describe() if isinstance(pred, Prediction) else pred.describe()
    out["realized_mask"] = realized.describe()
    out["base"] = str(ck.source)
    return out


def _magnitude_by_tensor(ck, realized: Mask, names, level: int, frac: float) -> list[dict]:
    """Expected magnitude-baseline entries and hits per tensor at the global cut (``level``, ``frac``)."""
    out = []
    for name in names:
        keys = magnitude_keys(ck.read(name))
        r = realized.numpy(name).reshape(-1)
        above, at = keys > level, keys == level
        out.append(
            {
                "mag_predicted": float(above.sum() + frac * at.sum()),
                "mag_true_positives": float(np.count_nonzero(r & above) + frac * np.count_nonzero(r & at)),
            }
        )
    return out


def _groups(rows: list[dict], key: str, delta: float) -> list[dict]:
    out = []
    total: Callable[[list[dict], str], float] = lambda g, k: sum(r[k] for r in g)  # noqa: E731
    for k, g in grouped(rows, lambda r: r[key], key):
        n, real, pr, tp = (total(g, c) for c in ("numel", "realized", "predicted", "true_positives"))
        mag = prf(total(g, "mag_true_positives"), total(g, "mag_predicted"), real)
        rho = real / n if n else 0.0
        out.append(
            {
                key: k,
                "numel": int(n),
                "realized": int(real),
                "predicted": int(pr),
                "density_realized": rho,
                "density_predicted": pr / n if n else 0.0,
                **prf(tp, pr, real),
                "magnitude_f1": mag["f1"],
                "random_f1": prf(rho * delta * n, delta * n, real)["f1"],
            }
        )
    return out


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


__all__ = ["Histogram", "evaluate", "fmt", "prf"]
