"""Accessors and formatting over the results dict (results.json): what every part of the report reads through."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

RL_ALGOS = ("grpo", "dpo")


def sp(stage: dict, atol: float = 1e-5, dtype: str = "bf16") -> float:
    """Sparsity (fraction) of a stage against θ0."""
    return stage["sparsity"][dtype][repr(float(atol))]


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.{digits}f}%"


def pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def acc(stage_or_theta0: dict, task: str, which: str = "bf16") -> dict:
    return stage_or_theta0["accuracy"][task][which]


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n) if n else float("nan")


def two_se(a: dict, b: dict) -> float:
    """Two standard errors of the difference of two accuracy records ({"accuracy", "n"}), independent binomials."""
    return 2 * math.sqrt(se(a["accuracy"], a["n"]) ** 2 + se(b["accuracy"], b["n"]) ** 2)


def trained(stage: dict) -> bool:
    """Whether any fp32 master weight moved at all (a GRPO run whose groups all had equal rewards does not)."""
    return sp(stage, 0.0, "fp32") < 1.0


def rl_stages(results: dict, lr: str = "rl") -> list[str]:
    """RL stages that trained, at the RL learning rate (``lr="rl"``), at any other (``"other"``) or all (``"any"``)."""
    rl_lr = results["config"]["rl_lr"]
    out = []
    for n, s in results["stages"].items():
        if s["spec"]["algorithm"] not in RL_ALGOS or not trained(s):
            continue
        at_rl = s["spec"]["learning_rate"] == rl_lr
        if lr == "any" or (lr == "rl") == at_rl:
            out.append(n)
    return out


def optimizer_of(stage: dict) -> str:
    """The stage's optimizer ("adamw" when its spec names none: the specs of AdamW stages leave it out)."""
    return stage["spec"].get("optimizer", "adamw")


def adamw_view(results: dict) -> dict:
    """``results`` with only the AdamW stages: the paper's claims, and the figures and summary around them, are
    about AdamW runs (its drift bound of ~lr per step, for one); the SGD stages have a section of their own."""
    return {**results, "stages": {n: s for n, s in results["stages"].items() if optimizer_of(s) == "adamw"}}


COMPARABLE_KEYS = ("task", "learning_rate", "steps", "batch_size", "data_seed")


def comparable(a: dict, b: dict) -> bool:
    """Two stage specs that differ only in algorithm and training rows: same task, lr, steps, batch and data seed."""
    return all(a.get(k) == b.get(k) for k in COMPARABLE_KEYS)


def at_atol(stage: dict, key: str, atol: float = 1e-5) -> float:
    return next(r[key] for r in stage["by_atol"] if r["atol"] == atol)


def settings_of(results: dict, names: Sequence[str] | None = None, extra: str = "") -> str:
    """One line: the settings a figure was produced with."""
    c = results["config"]
    st = results["stages"]
    lrs = sorted({st[n]["spec"]["learning_rate"] for n in (names or st)})
    return (
        f"size {c['size']} ({results['theta0']['parameters']:,} params), {c['steps']} steps, batch {c['batch_size']}, "
        f"lr {', '.join(f'{x:g}' for x in lrs)}, seed {c['seed']}, fp32 masters" + (f"; {extra}" if extra else "")
    )


ROLE_LABEL = {
    "subnetwork re-run": "θ_sub: its own subnetwork",
    "random-mask re-run": "random mask, equal density",
    "predicted-mask re-run": "predicted mask (θ0, plan, first steps)",
    "full run, another seed": "full run, another seed",
}


def ident(row: dict, atol: float, inside: bool = False, key: str = "identity") -> float | None:
    """Identity of a Table 3 row at ``atol`` (overall, or inside the full run's mask)."""
    rec = next((r for r in row[key] if r["atol"] == atol), None)
    if rec is None:
        return None
    return rec["identity_in_mask"] if inside else rec["identity"]


def ident_at(row: dict, atol: float, key: str = "identity") -> float:
    """Identity of a Table 3 row overall at ``atol``, one of the atols the subnetwork measurement records."""
    value = ident(row, atol, key=key)
    if value is None:
        raise KeyError(f"{row.get('run')}: no {key} record at atol {atol:g}")
    return value


def rows_of(section: dict, role: str) -> list[dict]:
    return [r for r in section["rows"] if r["role"] == role]


def acc_diff(section: dict, row: dict, task: str) -> tuple[float, float, dict] | None:
    full = section["full_accuracy"].get(task, {}).get("bf16")
    mine = row["accuracy"].get(task, {}).get("bf16")
    if not full or not mine:
        return None
    noise = two_se(full, mine)
    return mine["accuracy"] - full["accuracy"], noise, mine


def spec_of(results: dict, name: str) -> dict | None:
    sub = results.get("subnetwork") or {}
    if name in results["stages"]:
        return results["stages"][name]["spec"]
    if name in (sub.get("runs") or {}):
        return sub["runs"][name]["spec"]
    return None


def short_settings(results: dict, name: str) -> str:
    sp_ = spec_of(results, name)
    if sp_ is None:
        return ""
    bits = [sp_["algorithm"].upper(), f"lr {sp_['learning_rate']:g}", f"seed {sp_['seed']}", sp_["task"]]
    return ", ".join(bits)


def algo_of(results: dict, name: str) -> str | None:
    return (spec_of(results, name) or {}).get("algorithm")


def full_gain(results: dict, sec: dict, task: str) -> tuple[float, float, float] | None:
    """θ_full's held-out accuracy minus θ0's (bf16), two standard errors of that difference, and θ_full's lr."""
    full = sec["full_accuracy"].get(task, {}).get("bf16")
    base = results["theta0"]["accuracy"].get(task, {}).get("bf16")
    spec = spec_of(results, sec["full"])
    if not full or not base or spec is None:
        return None
    noise = two_se(full, base)
    return full["accuracy"] - base["accuracy"], noise, spec["learning_rate"]


def sub_settings(results: dict, names: Sequence[str] | None = None) -> str:
    """Settings line of a subnetwork figure: every learning rate, step count and seed among ``names``' runs."""
    c = results["config"]
    specs = [x for x in (spec_of(results, n) for n in (names or [])) if x is not None]
    if not specs:
        specs = [{"learning_rate": c["rl_lr"], "steps": c["steps"], "batch_size": c["batch_size"], "seed": c["seed"]}]

    def vals(key):
        return ", ".join(f"{v:g}" for v in sorted({x[key] for x in specs}))

    return (
        f"size {c['size']} ({results['theta0']['parameters']:,} params), {vals('steps')} steps, batch "
        f"{vals('batch_size')}, lr {vals('learning_rate')}, seed {vals('seed')};\nbf16 checkpoints, masks at atol 1e-5 "
        "against θ0"
    )


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
