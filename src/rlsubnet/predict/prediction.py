"""A prediction: the per-entry probability of change, cut into masks, saved compactly, read back.

Probabilities file (``format = "rlsubnet.probabilities"``): a safetensors file with one tensor per checkpoint
tensor, in its shape, either ``uint8`` (p quantised to round(255·p); read back as q / 255) or ``float16``;
metadata: ``encoding`` (``uint8/255`` or ``float16``), ``expected_density`` (of the unquantised probabilities),
``plan``, ``predictor``, ``base``, ``probe``, ``calibration`` as JSON. Reading checks every value lies in [0, 1].
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from rlsubnet.checkpoint.index import read_safetensors_header
from rlsubnet.checkpoint.reader import SafetensorsCheckpoint
from rlsubnet.checkpoint.writer import SafetensorsWriter
from rlsubnet.errors import CheckpointError, RlsubnetError, UsageError
from rlsubnet.fileio import locks_output
from rlsubnet.masks import Mask
from rlsubnet.predict.models import check_probability
from rlsubnet.predict.plan import Plan

FORMAT = "rlsubnet.probabilities"
ENCODINGS = {"uint8": "uint8/255", "fp16": "float16"}
META_KEYS = ("predictor", "plan", "base", "probe", "calibration")


class PredictionError(RlsubnetError):
    """A probabilities file that cannot be read or trusted, or probabilities out of [0, 1]."""


class Prediction:
    """Per-entry probabilities that the run changes each stored weight, with the plan and the predictor.

    >>> pred = rlsubnet.predict("base/", Plan(steps=100, lr=1e-6))
    >>> pred.expected_density, pred.mask().density, pred.mask(density=0.1).changed
    """

    def __init__(self, probabilities: Mapping[str, torch.Tensor], plan: Plan | None, meta: Mapping | None = None):
        self._p: dict[str, torch.Tensor] = {}
        for name, p in probabilities.items():
            p = torch.as_tensor(p).detach().to(torch.float32)
            bad = ~torch.isfinite(p) | (p < 0) | (p > 1)
            if bool(bad.any()):
                value = float(p.reshape(-1)[torch.nonzero(bad.reshape(-1))[0, 0]])
                raise PredictionError(f"tensor {name!r}: probability {value!r} is out of [0, 1]")
            self._p[name] = p
        self.plan = plan
        self.meta = dict(meta or {})

    # -- what is inside
    @property
    def probabilities(self) -> dict[str, torch.Tensor]:
        return dict(self._p)

    def names(self) -> list[str]:
        return list(self._p)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self._p.items()}

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self._p.values())

    @property
    def expected_changed(self) -> float:
        """Σ p: the expected number of entries the run changes."""
        return math.fsum(float(p.double().sum()) for p in self._p.values())

    @property
    def expected_density(self) -> float:
        n = self.numel
        return self.expected_changed / n if n else 0.0

    @property
    def predictor(self) -> str | None:
        return self.meta.get("predictor")

    # -- masks
    def mask(self, density: float | None = None, threshold: float | None = None) -> Mask:
        """The predicted mask: the ``density`` share of entries with the highest probabilities (default: the
        expected density), or every entry with p ≥ ``threshold``. Ties at the cut go to the earlier tensor
        (file order), then the lower flat index, so the mask has exactly round(density·n) entries."""
        if density is not None and threshold is not None:
            raise UsageError("give --density or --threshold, not both")
        flat = torch.cat([p.reshape(-1) for p in self._p.values()]) if self._p else torch.zeros(0)
        if threshold is not None:
            threshold = check_probability(threshold, "--threshold")
            chosen = flat >= threshold
            cut: dict[str, object] = {"threshold": threshold}
        else:
            d = self.expected_density if density is None else check_probability(density, "--density")
            k = min(flat.numel(), int(round(d * flat.numel())))
            chosen = top_k(flat, k)
            cut = {"density": d, "entries": k, "rule": "expected density" if density is None else "given density"}
        out, i = {}, 0
        for name, p in self._p.items():
            out[name] = chosen[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        extra = {"prediction": {**self.describe(), "cut": cut}}
        meta = {
            "kind": "predicted",
            "atol": self.plan.atol if self.plan else None,
            "dtype": self.plan.mode if self.plan else None,
            "base": self.meta.get("base"),
            "tuned": None,
            "extra": extra,
        }
        return Mask.from_bool(out, meta)

    def describe(self) -> dict:
        """How the prediction was made (what a mask cut from it records)."""
        return {
            "predictor": self.predictor,
            "plan": self.plan.to_json() if self.plan else None,
            "expected_density": self.expected_density,
            "probe": self.meta.get("probe"),
            "calibration": self.meta.get("calibration"),
        }

    def summary(self) -> dict:
        return {**self.describe(), "numel": self.numel, "n_tensors": len(self._p), "base": self.meta.get("base")}

    def evaluate(self, realized, base=None) -> dict:
        """Precision, recall, F1, average precision against the realized mask (:func:`.evaluate.evaluate`)."""
        from rlsubnet.predict.scoring import evaluate

        return evaluate(realized, self, base=base)

    # -- files
    @locks_output("path")
    def save_probabilities(self, path: str | Path, encoding: str = "uint8") -> Path:
        """Write the probabilities compactly (``uint8``: 1 byte per entry; ``fp16``: 2 bytes)."""
        if encoding not in ENCODINGS:
            raise UsageError(f"unknown probabilities encoding {encoding!r} (choose from {', '.join(ENCODINGS)})")
        dtype = torch.uint8 if encoding == "uint8" else torch.float16
        specs = [(n, dtype, tuple(p.shape)) for n, p in self._p.items()]
        dump = lambda v: json.dumps(v, sort_keys=True, default=str)  # noqa: E731
        meta = {
            "format": FORMAT,
            "encoding": ENCODINGS[encoding],
            "expected_density": repr(self.expected_density),
            "plan": dump(self.plan.to_json() if self.plan else None),
            **{k: dump(self.meta.get(k)) for k in META_KEYS if k != "plan"},
        }
        with SafetensorsWriter(path, specs, meta) as w:
            for name, p in self._p.items():
                w.write(name, encode(p, dtype))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Prediction:
        """Read a probabilities file (every value checked to lie in [0, 1])."""
        path = Path(path)
        if not path.is_file():
            raise PredictionError(f"{path}: no such probabilities file")
        try:
            infos, md = read_safetensors_header(path)
        except CheckpointError as exc:
            raise PredictionError(f"not a readable probabilities file: {exc}") from None
        if md.get("format") != FORMAT:
            raise PredictionError(f"{path}: not an rlsubnet probabilities file (format {md.get('format')!r})")
        encoding = md.get("encoding")
        if encoding not in ENCODINGS.values():
            raise PredictionError(f"{path}: unknown probabilities encoding {encoding!r}")
        try:
            meta = {k: json.loads(md.get(k, "null")) for k in META_KEYS}
            plan = Plan.from_json(meta["plan"]) if meta["plan"] else None
        except (ValueError, TypeError, UsageError) as exc:
            raise PredictionError(f"{path}: corrupt probabilities metadata ({exc})") from None
        want = torch.uint8 if encoding == "uint8/255" else torch.float16
        probs = {}
        ck = SafetensorsCheckpoint(str(path), str(path), [path])
        try:
            for name, info in infos.items():
                if info.dtype != want:
                    raise PredictionError(f"{path}: tensor {name!r} is {info.dtype}, expected {want} ({encoding})")
                probs[name] = decode(ck.read(name))
        except CheckpointError as exc:
            raise PredictionError(f"corrupt probabilities file: {exc}") from None
        finally:
            ck.close()
        meta["path"] = str(path)
        meta["encoding"] = encoding
        try:
            return cls(probs, plan, meta)
        except PredictionError as exc:
            raise PredictionError(f"{path}: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"Prediction({self.predictor}, {len(self._p)} tensors, {self.numel:,} entries, "
            f"expected density {self.expected_density:.4f})"
        )


def encode(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return torch.round(p.to(torch.float32) * 255).clamp(0, 255).to(torch.uint8)
    return p.to(torch.float16)


def decode(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 255
    return t.to(torch.float32)


def top_k(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest values; ties at the cut go to the lowest indices."""
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if k <= 0:
        return chosen
    if k >= flat.numel():
        return ~chosen
    v = torch.topk(flat, k, sorted=False).values.min()
    chosen = flat > v
    need = k - int(chosen.sum())
    if need > 0:
        ties = torch.nonzero(flat == v).reshape(-1)[:need]
        chosen[ties] = True
    return chosen


def as_prediction(spec) -> Prediction | Mask:
    """A Prediction or a Mask; a path is read as a mask file or a probabilities file by its format."""
    if isinstance(spec, (Prediction, Mask)):
        return spec
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            _, md = read_safetensors_header(path)
        except CheckpointError:
            md = {}
        if md.get("format") == FORMAT:
            return Prediction.load(path)
        return Mask.load(path)
    raise UsageError(f"expected a Prediction, a Mask or a file, got {type(spec).__name__}")


__all__ = ["Prediction", "PredictionError", "as_prediction"]
